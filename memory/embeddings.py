"""Text embedders: LiteLLM's embedding API in production; offline, WordLlama, else hashing.

Offline default: WordLlama's `l2_supercat` 256-d static token embeddings, whose weights and
tokenizer ship inside the `wordllama` wheel, so nothing is downloaded. It knows that "port" and
"listens" are related; it is far weaker than a transformer embedder but needs no network and
embeds thousands of texts per second on a CPU. The hashing embedder is the last resort (if
wordllama cannot be imported): the same vector in every process, shared words only, no meaning.
`make bench-memory` prints the quality of each.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from functools import cache
from pathlib import Path
from typing import Any, Protocol

_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    "a an and are as at be by for from how in is it of on or the to what which who why with".split()
)


class Embedder(Protocol):
    name: str
    dim: int

    async def embed(self, texts: list[str]) -> list[list[float]]: ...


class HashingEmbedder:
    """Signed feature hashing of words and word bigrams, L2-normalised."""

    def __init__(self, dim: int = 384) -> None:
        self.dim = dim
        self.name = f"hashing-{dim}"

    def _features(self, text: str) -> list[str]:
        words = [w for w in _WORD.findall(text.lower()) if w not in _STOP]
        stems = [w[:6] for w in words]
        return stems + [f"{a}_{b}" for a, b in zip(stems, stems[1:], strict=False)]

    def embed_one(self, text: str) -> list[float]:
        vector = [0.0] * self.dim
        for feature in self._features(text):
            digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
            index = int.from_bytes(digest[:4], "little") % self.dim
            vector[index] += 1.0 if digest[4] & 1 else -1.0
        norm = math.sqrt(sum(v * v for v in vector))
        return [v / norm for v in vector] if norm else vector

    async def embed(self, texts: list[str]) -> list[list[float]]:
        return [self.embed_one(t) for t in texts]


@cache
def _wordllama() -> Any:
    """WordLlama's packaged model, loaded from the files inside the wheel.

    Own loader, not `WordLlama.load()`: in wordllama 0.4 `load()` looks for the tokenizer under
    `wordllama/tokenizer/` while the wheel ships it under `wordllama/tokenizers/`, so it tries to
    download it from Hugging Face, which fails offline.
    """
    import wordllama  # imported here: only the offline embedder needs it
    from safetensors import safe_open
    from wordllama.inference import WordLlamaInference
    from wordllama.wordllama import WordLlama

    root = Path(wordllama.__file__).parent
    with safe_open(str(root / "weights" / "l2_supercat_256.safetensors"), framework="np") as weights:
        embedding = weights.get_tensor("embedding.weight")
    tokenizer = WordLlama.load_tokenizer(root / "tokenizers" / "l2_supercat_tokenizer_config.json")
    return WordLlamaInference(embedding, tokenizer, binary=False)


class WordLlamaEmbedder:
    """Static word embeddings shipped in the wordllama wheel (256-d, mean-pooled, L2-normalised)."""

    def __init__(self) -> None:
        self.dim = 256
        self.name = "wordllama-l2-supercat-256"
        self._model = _wordllama()

    async def embed(self, texts: list[str]) -> list[list[float]]:
        vectors = self._model.embed(texts, norm=True)
        return [[float(v) for v in row] for row in vectors]


def offline_embedder() -> Embedder:
    """WordLlama when it can be loaded, else the hashing embedder."""
    try:
        return WordLlamaEmbedder()
    except (ImportError, OSError) as exc:  # a broken install: say so, keep working
        logging.getLogger("switchboard.memory").warning("wordllama unavailable (%s); using the hashing embedder", exc)
        return HashingEmbedder()


class LiteLLMEmbedder:
    def __init__(self, model: str, dim: int) -> None:
        self.model = model
        self.dim = dim
        self.name = model.replace("/", "-")

    async def embed(self, texts: list[str]) -> list[list[float]]:
        import litellm  # imported here: it is slow to import and only production embeddings need it

        response = await litellm.aembedding(model=self.model, input=texts)
        return [list(item["embedding"]) for item in response.data]
