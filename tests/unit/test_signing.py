"""Signed requests: a signature verifies only for the same value and the same key."""

from __future__ import annotations

import logging

import pytest
from pydantic import SecretStr

from schemas.events import ToolCallRequested
from services.runtime.audit import tool_audit
from services.runtime.host import ServiceSpec, Settings, kafka_app
from services.runtime.settings import KafkaSettings, PlatformSettings, RedisSettings
from services.runtime.signing import DEVELOPMENT_KEY, SIGNATURE, Signer

REQUEST = ToolCallRequested(
    tenant="acme", goal_id="g1", task_id="g1.r1", call_id="c1", step_id="g1.r1:0", tool="calculator",
    arguments={"expression": "1+1"}, agent_kind="researcher", reply_to="unit.agent.researcher",
)


def test_a_signature_verifies_for_the_value_it_signed() -> None:
    signer = Signer("k1")
    value = REQUEST.to_bytes()
    signature = signer.sign(value)
    assert signature.startswith("v1=") and len(signature) == 3 + 64
    assert signer.verify(value, signature)
    assert signer.problem(value, {SIGNATURE: signature}) is None


def test_a_tampered_value_does_not_verify() -> None:
    signer = Signer("k1")
    signature = signer.sign(REQUEST.to_bytes())
    tampered = REQUEST.model_copy(update={"tool": "save_note"}).to_bytes()
    assert not signer.verify(tampered, signature)
    assert "does not match" in (signer.problem(tampered, {SIGNATURE: signature}) or "")
    flipped = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    assert not signer.verify(REQUEST.to_bytes(), flipped)


def test_another_keys_signature_does_not_verify() -> None:
    value = REQUEST.to_bytes()
    assert not Signer("k1").verify(value, Signer("k2").sign(value))
    assert not Signer("k1").verify(value, Signer(DEVELOPMENT_KEY).sign(value))


@pytest.mark.parametrize(
    ("headers", "problem"),
    [({}, "no x-signature"), ({SIGNATURE: ""}, "no x-signature"), ({SIGNATURE: "sha1=abc"}, "not a v1")],
)
def test_a_missing_or_unknown_signature_is_a_problem(headers: dict[str, str], problem: str) -> None:
    assert problem in (Signer("k1").problem(REQUEST.to_bytes(), headers) or "")
    assert not Signer("k1").verify(REQUEST.to_bytes(), headers.get(SIGNATURE))


def test_the_key_comes_from_configuration_else_the_development_key(monkeypatch: pytest.MonkeyPatch) -> None:
    value = b"payload"
    monkeypatch.delenv("SWITCHBOARD_SIGNING_KEY", raising=False)
    assert PlatformSettings().signing_key is None
    assert Signer.from_setting(None).sign(value) == Signer(DEVELOPMENT_KEY).sign(value)
    monkeypatch.setenv("SWITCHBOARD_SIGNING_KEY", "s3cret-key")
    configured = PlatformSettings().signing_key
    assert isinstance(configured, SecretStr) and "s3cret" not in repr(PlatformSettings())
    assert Signer.from_setting(configured).sign(value) == Signer("s3cret-key").sign(value)
    with pytest.raises(ValueError, match="empty"):
        Signer("")


def test_a_tool_audit_names_the_agent_kind_and_the_call() -> None:
    record = tool_audit(REQUEST, "tool.executed", ok=True)
    assert (record.action, record.actor, record.subject) == ("tool.executed", "researcher", "c1")
    assert record.detail == {"tool": "calculator", "goal": "g1", "task": "g1.r1", "ok": True}
    assert (record.goal_id, record.tenant, record.causation_id) == ("g1", "acme", REQUEST.event_id)


def test_serving_on_kafka_warns_when_signing_with_the_development_key(caplog: pytest.LogCaptureFixture) -> None:
    kafka, redis = KafkaSettings(bootstrap_servers="127.0.0.1:1"), RedisSettings(url="redis://127.0.0.1:1/0")
    with caplog.at_level(logging.WARNING, logger="switchboard.host"):
        kafka_app([ServiceSpec("tools")], Settings(platform=PlatformSettings(signing_key=None), kafka=kafka, redis=redis))
    assert any("development key" in r.getMessage() for r in caplog.records)
    caplog.clear()
    keyed = PlatformSettings(signing_key=SecretStr("deployment key"))
    with caplog.at_level(logging.WARNING, logger="switchboard.host"):
        kafka_app([ServiceSpec("tools")], Settings(platform=keyed, kafka=kafka, redis=redis))
    assert not any("development key" in r.getMessage() for r in caplog.records)
