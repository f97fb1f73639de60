"""Trust at the tool boundary: the producing service signs each message's value with HMAC-SHA256,
and a consumer refuses a request whose signature does not verify.

The signature covers the value bytes only: a retry, a dead letter and a redrive carry the value
and the original headers unchanged, so the signature still verifies wherever the message goes.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from schemas.envelope import Envelope

from pydantic import SecretStr

SIGNATURE = "x-signature"
"""The header that carries `v1=<hex HMAC-SHA256 of the value>`."""
SCHEME = "v1"
DEVELOPMENT_KEY = "switchboard-development-signing-key-do-not-deploy"
"""Used when SWITCHBOARD_SIGNING_KEY is unset, so the embedded run and the tests need no set-up.
Anyone can read it here: a deployment must set its own key (`switchboard serve` warns)."""


class Signer:
    """Signs and verifies message values with one key."""

    def __init__(self, key: str | bytes) -> None:
        self._key = key.encode() if isinstance(key, str) else key
        if not self._key:
            raise ValueError("a signing key must not be empty")

    @classmethod
    def from_setting(cls, key: SecretStr | None) -> Signer:
        """The signer of SWITCHBOARD_SIGNING_KEY, or of the development key when it is unset."""
        return cls(key.get_secret_value() if key is not None else DEVELOPMENT_KEY)

    def sign(self, value: bytes) -> str:
        return f"{SCHEME}={hmac.new(self._key, value, hashlib.sha256).hexdigest()}"

    def verify(self, value: bytes, signature: str | None) -> bool:
        """True when `signature` is this key's signature of `value`; compared in constant time."""
        if not signature:
            return False
        return hmac.compare_digest(self.sign(value).encode(), signature.strip().encode())

    def problem(self, value: bytes, headers: Mapping[str, str]) -> str | None:
        """Why the message's signature does not verify, or None when it does."""
        signature = headers.get(SIGNATURE)
        if not signature:
            return f"the request has no {SIGNATURE} header"
        if not signature.startswith(f"{SCHEME}="):
            return f"the request's signature is not a {SCHEME} signature"
        if not self.verify(value, signature):
            return "the request's signature does not match its content (tampered, or signed with another key)"
        return None


def event_headers(event: Envelope, value: bytes, signer: Signer, traceparent: str | None = None) -> dict[str, str]:
    """The headers every event the platform produces carries: its type, its signature (consumers
    that require one verify it), and its trace when given (`value` is `event.to_bytes()`)."""
    headers = {"event_type": event.event_type, SIGNATURE: signer.sign(value)}
    if traceparent:
        headers["traceparent"] = traceparent
    return headers
