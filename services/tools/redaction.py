"""Keeping the executor's configured secrets out of what it returns and what it logs.

A page may echo the Authorization header it was sent, and an error message may quote it: the
executor's answer to the agent, and every log line, pass through the Redactor first.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable

REDACTED = "[REDACTED]"
MIN_CREDENTIAL_CHARS = 8
"""A header value such as `Bearer <token>` is also redacted by its credential alone, when that
part is at least this long (shorter parts would redact ordinary words)."""


class Redactor:
    """Replaces every configured secret value in a text with `[REDACTED]`."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        found: set[str] = set()
        for raw in secrets:
            secret = raw.strip()
            if not secret:
                continue
            found.add(secret)
            scheme, _, credential = secret.partition(" ")
            if scheme and len(credential.strip()) >= MIN_CREDENTIAL_CHARS:
                found.add(credential.strip())
        # Longest first, so that a secret containing another is replaced whole.
        ordered = sorted(found, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def __bool__(self) -> bool:
        return self._pattern is not None

    def __call__(self, text: str) -> str:
        if self._pattern is None or not text:
            return text
        return self._pattern.sub(REDACTED, text)


class RedactingFilter(logging.Filter):
    """A handler filter that redacts the formatted message, the traceback and the stack of a record."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self.redact = redact

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            # Formatters reuse exc_text when it is set, so the traceback is printed redacted.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


def install_log_redaction(redact: Redactor, logger: logging.Logger | None = None) -> Callable[[], None]:
    """Adds a RedactingFilter to every handler of `logger` (the root logger: every record reaches
    its handlers); returns what removes it again. Without secrets, nothing is installed."""
    if not redact:
        return lambda: None
    target = logger or logging.getLogger()
    handlers = list(target.handlers)
    log_filter = RedactingFilter(redact)
    for handler in handlers:
        handler.addFilter(log_filter)

    def uninstall() -> None:
        for handler in handlers:
            handler.removeFilter(log_filter)

    return uninstall
