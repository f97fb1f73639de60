"""Signed tool requests on real Kafka: a forged or tampered request put straight on a tool topic is
refused before it runs, dead-lettered as tool_denied and audited; a signed one runs and is audited.
`switchboard audit` shows both."""

from __future__ import annotations

import json
from typing import Any

from schemas.events import ToolCallCompleted, ToolCallRequested
from schemas.topics import Topics
from services.runtime.host import ServiceSpec, Settings
from services.runtime.signing import SIGNATURE
from tests.integration.conftest import serving
from tests.integration.test_dlq_cli import ok, switchboard
from tests.support.kafka import RawProducer, TopicWatch


def request(t: Topics, call_id: str, tool: str, arguments: dict[str, Any], goal: str = "g-sig") -> ToolCallRequested:
    return ToolCallRequested(
        tenant="acme", goal_id=goal, task_id=f"{goal}.r1", call_id=call_id, step_id=f"{goal}.r1:{call_id}",
        tool=tool, arguments=arguments, agent_kind="researcher", reply_to=t.agent("researcher"),
    )


async def audited(settings: Settings, *args: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads(ok(await switchboard(settings, "audit", "--json", *args)).stdout)
    return entries


async def test_forged_and_tampered_requests_are_refused_dead_lettered_and_audited(settings: Settings) -> None:
    t = Topics(settings.platform.namespace, ("researcher", "writer"))
    tools_dlq, memory_dlq = Topics.dlq(t.tools), Topics.dlq(t.memory)
    forged = request(t, "forged", "calculator", {"expression": "6*7"})
    original = request(t, "tampered", "calculator", {"expression": "1+1"})
    tampered = original.model_copy(update={"arguments": {"expression": "2**10"}})
    signed = request(t, "signed", "calculator", {"expression": "12*7"})
    forged_search = request(t, "forged-kb", "kb_search", {"query": "what is Apache Kafka"}, goal="g-kb")
    signed_search = request(t, "signed-kb", "kb_search", {"query": "what is Apache Kafka"}, goal="g-kb")
    async with (
        serving([ServiceSpec("tools"), ServiceSpec("memory")], settings),
        TopicWatch(settings.kafka, [t.agent("researcher"), tools_dlq, memory_dlq]) as watch,
        RawProducer(settings.kafka) as send,
    ):
        await send.event(t.tools, forged)  # no signature at all, as anyone with access to the topic could
        stolen = send.signer.sign(original.to_bytes())
        await send.send(t.tools, tampered.to_bytes(), tampered.task_id or "", extra_headers={SIGNATURE: stolen})
        await send.event(t.memory, forged_search)
        # Same task and key as the refused ones: once these are answered, those were handled.
        await send.event(t.tools, signed, signed=True)
        await send.event(t.memory, signed_search, signed=True)
        replies = {r.call_id: r for r in await watch.events(ToolCallCompleted, 2)}
        dead = await watch.wait_for(lambda s: Topics.is_dlq(s.topic), count=3)

    assert replies["signed"].ok and replies["signed"].output == "12*7 = 84"
    assert replies["signed-kb"].ok
    answered = {s.event.call_id for s in watch.seen if isinstance(s.event, ToolCallCompleted)}
    assert answered == {"signed", "signed-kb"}, "a refused request gets no reply"

    by_call = {d.event.call_id: d for d in dead if isinstance(d.event, ToolCallRequested)}
    assert set(by_call) == {"forged", "tampered", "forged-kb"}
    for call_id, topic in (("forged", tools_dlq), ("tampered", tools_dlq), ("forged-kb", memory_dlq)):
        record = by_call[call_id]
        assert record.topic == topic
        assert record.headers["x-dlq-reason"] == "tool_denied"
        assert record.headers["x-dlq-exception-class"] == "ToolDenied"
        assert record.headers["x-dlq-goal-id"] in {"g-sig", "g-kb"}
    assert "no x-signature" in by_call["forged"].headers["x-dlq-exception-message"]
    assert "does not match" in by_call["tampered"].headers["x-dlq-exception-message"]
    assert by_call["tampered"].value == tampered.to_bytes(), "the dead letter is the message as it came"

    denials = await audited(settings, "--action", "tool.denied")
    assert {(e["subject"], e["actor"], e["detail"]["policy"], e["detail"]["reason"]) for e in denials} == {
        ("forged", "researcher", "signature", "tool_denied"),
        ("tampered", "researcher", "signature", "tool_denied"),
        ("forged-kb", "researcher", "signature", "tool_denied"),
    }
    assert all(e["detail"]["tool"] in {"calculator", "kb_search"} and e["detail"]["goal"] == e["goal_id"] for e in denials)
    executions = await audited(settings, "--action", "tool.executed")
    assert {(e["subject"], e["actor"], e["detail"]["tool"], e["detail"]["ok"]) for e in executions} == {
        ("signed", "researcher", "calculator", True), ("signed-kb", "researcher", "kb_search", True),
    }
    assert [e["subject"] for e in await audited(settings, "--goal", "g-kb", "--action", "tool.denied")] == ["forged-kb"]
    assert await audited(settings, "--actor", "writer") == []
    assert len(await audited(settings, "--since", "1h", "--limit", "2")) == 2

    table = ok(await switchboard(settings, "audit", "--action", "tool.denied")).stdout
    assert "3 audit entries" in table and "forged-kb" in table and "policy=signature" in table
