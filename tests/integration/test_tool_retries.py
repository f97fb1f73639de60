"""The tool executor's failure paths on the real broker: a flaky tool is retried through the retry
topics with a real backoff, and a denied call is dead-lettered once, with no reply."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from schemas.events import ToolCallCompleted, ToolCallRequested
from schemas.topics import Topics
from services.runtime.host import ServiceSpec, Settings
from services.runtime.kafka_bus import topic_partitions
from services.runtime.settings import KafkaSettings, PlatformSettings
from tests.integration.conftest import serving
from tests.support.http import loopback_server
from tests.support.kafka import RawProducer, TopicWatch

BACKOFF_S = 0.3

BROWSER = """
name = "browser"
description = "Reads pages from allowlisted hosts."
prompt = "researcher"
tools = ["http_get", "calculator"]
"""


@pytest.fixture
def browser_settings(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The test's settings with one agent kind, `browser`, that may call http_get; a short backoff;
    and http_get enabled for the loopback host, all set as an operator would: in the environment."""
    kinds = tmp_path / "kinds"
    kinds.mkdir()
    (kinds / "browser.toml").write_text(BROWSER)
    monkeypatch.setenv("SWITCHBOARD_AGENTS_DIR", str(kinds))
    monkeypatch.setenv("SWITCHBOARD_RETRY_BACKOFF_S", str(BACKOFF_S))
    monkeypatch.setenv("TOOLS_HTTP_ENABLED", "true")
    monkeypatch.setenv("TOOLS_HTTP_ALLOWED_HOSTS", "127.0.0.1")
    monkeypatch.setenv("TOOLS_LIMITS", '{"http_get": {"timeout_s": 5, "concurrency": 2}}')
    platform = settings.platform
    settings.platform = PlatformSettings(namespace=platform.namespace, data_dir=platform.data_dir, partitions=platform.partitions)
    assert settings.platform.retry_backoff_s == BACKOFF_S and settings.platform.retry_attempts == 4
    return settings


async def records_on(kafka: KafkaSettings, topic: str) -> int:
    """How many records a topic of this test's namespace holds (its end offsets, from 0)."""
    reader = AIOKafkaConsumer(bootstrap_servers=kafka.require(), group_id=None)
    await reader.start()
    try:
        return sum((await reader.end_offsets(await topic_partitions(kafka, [topic]))).values())
    finally:
        await reader.stop()


def call(t: Topics, call_id: str, tool: str, arguments: dict[str, object]) -> ToolCallRequested:
    return ToolCallRequested(
        tenant="acme", goal_id="g-flaky", task_id="g-flaky.b1", call_id=call_id, step_id=f"g-flaky.b1:{call_id}",
        tool=tool, arguments=arguments, agent_kind="browser", reply_to=t.agent("browser"),
    )


async def test_a_flaky_tool_is_retried_through_the_retry_topics_and_answers(browser_settings: Settings) -> None:
    settings = browser_settings
    t = Topics(settings.platform.namespace, ("browser",))
    retry_1, retry_2 = Topics.retry(t.tools, 1), Topics.retry(t.tools, 2)
    with loopback_server([503, 503]) as (base, hits):
        async with (
            serving([ServiceSpec("tools")], settings),
            TopicWatch(settings.kafka, [t.agent("browser"), retry_1, retry_2]) as watch,
            RawProducer(settings.kafka) as send,
        ):
            await send.event(t.tools, call(t, "c1", "http_get", {"url": f"{base}/report"}), signed=True)
            reply = await watch.event(ToolCallCompleted, call_id="c1")
            [first_retry] = await watch.wait_for(lambda s: s.topic == retry_1)
            [second_retry] = await watch.wait_for(lambda s: s.topic == retry_2)
        requests = [hit.at for hit in hits]

    assert reply.ok and reply.output == "HTTP 200\nfetched on attempt 3"
    assert len(requests) == 3, "two 503s, then the answer"
    assert first_retry.headers["x-attempt"] == "2" and second_retry.headers["x-attempt"] == "3"
    for parked in (first_retry, second_retry):
        assert isinstance(parked.event, ToolCallRequested) and parked.event.call_id == "c1"
        assert parked.headers["x-retry-exception-class"] == "Retryable"
        assert "answered 503" in parked.headers["x-retry-exception-message"]
    # Backoff n waits at least BACKOFF_S * 2**(n-1) (plus jitter); its due time is in whole ms.
    waited = [later - earlier for earlier, later in zip(requests, requests[1:], strict=False)]
    assert waited[0] >= BACKOFF_S - 0.001
    assert waited[1] >= 2 * BACKOFF_S - 0.001


async def test_a_denied_tool_call_is_dead_lettered_once_and_gets_no_reply(browser_settings: Settings) -> None:
    settings = browser_settings
    t = Topics(settings.platform.namespace, ("browser",))
    dlq = Topics.dlq(t.tools)
    async with (
        serving([ServiceSpec("tools")], settings),
        TopicWatch(settings.kafka, [t.agent("browser"), dlq]) as watch,
        RawProducer(settings.kafka) as send,
    ):
        await send.event(t.tools, call(t, "denied", "save_note", {"title": "t", "body": "b"}), signed=True)
        # Same task, so same key and partition: once this one is answered, the denied call,
        # which came first, has been handled completely.
        await send.event(t.tools, call(t, "after", "calculator", {"expression": "6*7"}), signed=True)
        [dead] = await watch.wait_for(lambda s: s.topic == dlq)
        after = await watch.event(ToolCallCompleted, call_id="after")
        dead_letters = await records_on(settings.kafka, dlq)

    assert after.ok and after.output == "6*7 = 42"
    assert dead_letters == 1
    assert dead.headers["x-dlq-reason"] == "tool_denied"
    assert dead.headers["x-dlq-exception-class"] == "ToolDenied"
    assert "not allowed for agent kind 'browser'" in dead.headers["x-dlq-exception-message"]
    assert dead.headers["x-dlq-goal-id"] == "g-flaky"
    assert isinstance(dead.event, ToolCallRequested) and dead.event.call_id == "denied"
    replies = [s.event for s in watch.seen if isinstance(s.event, ToolCallCompleted)]
    assert [r.call_id for r in replies] == ["after"], "the denied call got no reply"
    assert not (settings.platform.data_dir / "sandbox").exists(), "no note was written"
