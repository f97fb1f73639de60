"""Text embedders: LiteLLM's embedding API in production, a deterministic hashing embedder offline.

The hashing embedder is the last-resort offline default: it needs no download and gives the same
vector in every process. It captures shared words, not meaning.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Protocol

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


class LiteLLMEmbedder:
    def __init__(self, model: str, dim: int) -> None:
        self.model = model
        self.dim = dim
        self.name = model.replace("/", "-")

    async def embed(self, texts: list[str]) -> list[list[float]]:
        import litellm  # imported here: it is slow to import and only production embeddings need it

        response = await litellm.aembedding(model=self.model, input=texts)
        return [list(item["embedding"]) for item in response.data]
