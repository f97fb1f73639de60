"""Injection markers in untrusted data (tool output, memories, earlier tasks' results): find and defuse.

Findings are evidence for the record, not a defence: what an agent may do is fixed by the
platform whatever the data says. `neutralize` only makes sure data cannot hide characters from a
reader or close the block it is delimited in.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from dataclasses import dataclass
from functools import cache
from typing import Literal

MAX_FINDINGS = 12
"""Findings kept per piece of data: enough to show what it tried, bounded for the record."""

DELIMITER_TAGS = ("untrusted", "tool_output", "inputs", "results")
"""The tags the platform marks data with (agents) and hands results over in (the editor)."""

_INVISIBLE_EXTRA = frozenset(
    [0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x2800, 0x3164, 0xFFA0, 0xE0000]
    + list(range(0xFE00, 0xFE10))  # variation selectors: they can smuggle bytes after a visible character
    + list(range(0xE0100, 0xE01F0))  # variation selectors supplement
)
"""Invisible characters that are not in Unicode's format category (Cf): the combining grapheme
joiner, Hangul and Khmer fillers, the blank Braille pattern, variation selectors."""



def _lookalikes(char: str) -> str:
    """A regex class for an ASCII character and its full-width forms (U+FF01-FF5E)."""
    forms = {char.lower(), char.upper()}
    forms |= {chr(ord(f) + 0xFEE0) for f in set(forms)}
    return "[" + "".join(re.escape(f) for f in sorted(forms)) + "]"


# `<`, and characters a reader (or a model) may take for one; the tag names in ASCII or full width.
_OPENERS = "<\uff1c\ufe64\u2039\u2329\u27e8\u3008"
_DELIMITER = re.compile(
    rf"[{_OPENERS}]\s*[/\uff0f]?\s*"
    rf"(?:{'|'.join(''.join(_lookalikes(c) for c in tag) for tag in DELIMITER_TAGS)})"
    r"(?![A-Za-z0-9_-])"
)

_INSTRUCTIONS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern, re.IGNORECASE | re.MULTILINE))
    for name, pattern in (
        ("override", r"\b(?:ignore|forget|override)\s+(?:all\s+|any\s+|the\s+|your\s+)*"
                     r"(?:previous|prior|above|earlier|preceding|system)\s+(?:instructions?|prompts?|rules|messages?)"),
        ("override", r"\bdisregard\b[^\n.]{0,40}?\b(?:instructions?|prompts?|rules|task|above|guidelines)\b"),
        ("persona", r"\byou\s+are\s+now\b"),
        ("persona", r"\bsystem\s+prompt\b"),
        ("persona", r"\bnew\s+instructions?\b"),
        ("tool", r"\b(?:call|invoke|execute)\s+(?:the\s+)?(?:tool|function)\b"),
        ("tool", r"\b(?:call|invoke|execute)\s+(?:the\s+)?(?:calculator|kb_search|remember_fact|http_get|save_note)\b"),
        ("budget", r"\b(?:raise|increase|extend|lift|remove|disable)\s+(?:your\s+|the\s+|my\s+|its\s+)?"
                   r"(?:token\s+|cost\s+|step\s+|tool\s+)?(?:budgets?|limits?|quotas?)\b"),
        ("role", r"^[ \t>*#-]*(?:system|assistant|developer|user|tool)\s*:"),
        ("role", r"<\|[a-z_]{2,20}\|>|\[/?INST\]|<</?SYS>>"),
    )
)
"""A small, deliberately plain set: phrases that address the model instead of informing it.
They are markers for the record; a miss costs nothing, because nothing depends on them."""

Kind = Literal["invisible", "instruction", "delimiter"]
_LABELS: dict[Kind, str] = {
    "invisible": "invisible characters",
    "instruction": "instruction-like text",
    "delimiter": "imitates a delimiter",
}


@dataclass(frozen=True)
class Finding:
    kind: Kind
    detail: str

    def describe(self, source: str) -> str:
        """As recorded on the model call, e.g. `tool:calculator: instruction-like text 'you are now'`."""
        return f"{source}: {_LABELS[self.kind]} {self.detail}"


def is_invisible(char: str) -> bool:
    code = ord(char)
    if char in "\n\r\t":
        return False
    category = unicodedata.category(char)
    # Cf: zero-width space/joiners, bidi embeddings, overrides and isolates, tag characters, BOM,
    # soft hyphen... Cc: control characters such as ESC, which terminals act on.
    return category in ("Cf", "Cc") or code in _INVISIBLE_EXTRA


@cache
def _invisible_table() -> dict[int, None]:
    """Every character `is_invisible` calls invisible, as a `str.translate` table that deletes it:
    built once, on first use (a pass over every code point, about 0.2 s), so dropping them from a
    text runs in C, not in a Python loop over its characters (that loop ran on every agent step)."""
    return {c: None for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF and is_invisible(chr(c))}


def _quote(text: str) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= 60 else flat[:57] + "...")


def scan(text: str) -> list[Finding]:
    """The injection markers in `text`, each kind of thing once, at most MAX_FINDINGS."""
    findings: list[Finding] = []
    invisible: dict[str, int] = {}
    table = _invisible_table()
    visible = text.translate(table)
    if len(visible) != len(text):  # only then is there anything to count
        for char in text:
            if ord(char) in table:
                invisible[char] = invisible.get(char, 0) + 1
    if invisible:
        parts = []
        for char, count in list(invisible.items())[:6]:
            name = unicodedata.name(char, "").lower() or "unnamed"
            parts.append(f"U+{ord(char):04X} ({name}) x{count}")
        more = f" and {len(invisible) - 6} more kinds" if len(invisible) > 6 else ""
        findings.append(Finding("invisible", ", ".join(parts) + more))
    # Invisible characters can split a phrase ("ig\u200bnore") and full-width forms imitate ASCII:
    # the patterns look at what a reader would read.
    seen: set[str] = set()
    for match in _DELIMITER.finditer(visible):
        tag = " ".join(match.group(0).lower().split())
        if tag not in seen:
            seen.add(tag)
            findings.append(Finding("delimiter", repr(tag)))
    readable = unicodedata.normalize("NFKC", visible)
    for _name, pattern in _INSTRUCTIONS:
        for match in pattern.finditer(readable):
            detail = _quote(match.group(0))
            if detail.lower() not in seen:
                seen.add(detail.lower())
                findings.append(Finding("instruction", detail))
    return findings[:MAX_FINDINGS]


def neutralize(text: str) -> str:
    """`text` without invisible characters, and with every look-alike of a delimiter tag defused
    (its `<` written as `&lt;`), so that data can never close, or open, a block of its own."""
    visible = text.translate(_invisible_table())
    return _DELIMITER.sub(lambda m: "&lt;" + m.group(0)[1:], visible)
