"""Versioned prompt files (`<name>.<version>.md`); every model call records the version it used."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from services.runtime.errors import ConfigurationError

_FILE = re.compile(r"^(?P<name>[a-z0-9_-]+)\.v(?P<version>\d+)\.md$")


@dataclass(frozen=True)
class Prompt:
    name: str
    version: str
    text: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


class PromptLibrary:
    def __init__(self, *directories: Path) -> None:
        self._prompts: dict[str, dict[int, Prompt]] = {}
        for directory in directories:
            for path in sorted(directory.glob("*.md")):
                match = _FILE.match(path.name)
                if match:
                    version = int(match["version"])
                    prompt = Prompt(match["name"], f"v{version}", path.read_text())
                    self._prompts.setdefault(match["name"], {})[version] = prompt

    def latest(self, name: str) -> Prompt:
        versions = self._prompts.get(name)
        if not versions:
            raise ConfigurationError(f"no prompt file named {name}.v<N>.md (known: {sorted(self._prompts)})")
        return versions[max(versions)]
