"""`switchboard dlq` on dead letters the real pipeline wrote: list and its filters, show, stats, and
a dry-run redrive that changes nothing."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiokafka import AIOKafkaConsumer
from click.testing import Result
from redis.asyncio import Redis
from typer.testing import CliRunner

from memory.keys import RedisKeys
from schemas.events import GoalFailed, ToolCallRequested
from schemas.topics import Topics
from services.ops.cli import app
from services.runtime.host import ServiceSpec, Settings
from services.runtime.kafka_bus import topic_partitions
from tests.integration.conftest import serving
from tests.support.kafka import RawProducer, TopicWatch, eventually


async def switchboard(settings: Settings, *args: str, redis: bool = True) -> Result:
    """The command as a user runs it, pointed at this test's namespace (in a thread: it runs its own loop)."""
    env = {
        "SWITCHBOARD_NAMESPACE": settings.platform.namespace,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers or "",
        "REDIS_URL": (settings.redis.url or "") if redis else "",
        "COLUMNS": "250",
    }
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env=env)


def ok(result: Result) -> Result:
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    return result


async def listed(settings: Settings, *args: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = json.loads(ok(await switchboard(settings, "dlq", "list", "--json", *args)).stdout)
    return records


async def end_offsets(settings: Settings, topics: list[str]) -> dict[Any, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.require(), group_id=None)
    await consumer.start()
    try:
        ends: dict[Any, int] = await consumer.end_offsets(await topic_partitions(settings.kafka, topics))
        return ends
    finally:
        await consumer.stop()


async def test_operators_find_inspect_and_count_dead_letters_and_a_dry_run_changes_nothing(settings: Settings, redis: Redis) -> None:
    t = Topics(settings.platform.namespace, ("researcher", "writer"))
    tools_dlq, goals_dlq = Topics.dlq(t.tools), Topics.dlq(t.goals)
    base = dict(tenant="acme", agent_kind="researcher", reply_to=t.agent("researcher"), step_id="s:0")
    denied = ToolCallRequested(**base, goal_id="g-denied", task_id="g-denied.r1", call_id="c1", tool="http_get", arguments={"url": "https://example.com"})
    bad_args = ToolCallRequested(**{**base, "agent_kind": "writer"}, goal_id="g-args", task_id="g-args.w1", call_id="c2", tool="save_note", arguments={"title": 7})
    specs = [ServiceSpec("orchestrator"), ServiceSpec("tools"), ServiceSpec("memory")]
    async with serving(specs, settings), TopicWatch(settings.kafka, [*t.dlq_topics(), t.progress]) as watch, RawProducer(settings.kafka) as send:
        await send.send(t.goals, b"\xff\xfe not json", key="k-poison")
        await send.send(t.goals, b'{"event_type": "goal.submitted", "tenant": "acme", "goal_id": "g-bad"}', key="g-bad")
        await send.event(t.tools, denied, signed=True)  # a researcher may not use http_get: tool_denied
        await send.event(t.tools, bad_args, signed=True)  # save_note without a body: schema_invalid
        await watch.wait_for(lambda s: Topics.is_dlq(s.topic), count=4)
        await watch.event(GoalFailed, goal_id="g-denied")
        await watch.event(GoalFailed, goal_id="g-args")
        stream = RedisKeys(settings.platform.namespace).goal_stream("acme", "g-denied")

        async def recorded() -> bool:  # the recorder reads each topic on its own: any order
            return {b"tool.requested", b"work.dead_lettered", b"goal.failed"} <= {f[b"event_type"] for _, f in await redis.xrange(stream)}

        await eventually(recorded)
    # Everything below runs with the services stopped, so nothing but the CLI could change a topic.

    everything = await listed(settings)
    assert {(r["original_topic"], r["reason"], r["goal_id"]) for r in everything} == {
        (t.goals, "poison", ""), (t.goals, "schema_invalid", "g-bad"),
        (t.tools, "tool_denied", "g-denied"), (t.tools, "schema_invalid", "g-args"),
    }
    assert all(r["attempts"] == 1 and not r["redriven"] for r in everything)
    assert {r["id"].rsplit(":", 2)[0] for r in everything} == {goals_dlq, tools_dlq}

    assert {r["goal_id"] for r in await listed(settings, "--reason", "schema_invalid")} == {"g-bad", "g-args"}
    assert [r["goal_id"] for r in await listed(settings, "--reason", "schema_invalid", "--topic", "tools")] == ["g-args"]
    [only] = await listed(settings, "--goal", "g-denied")
    assert (only["reason"], only["exception_class"], only["event_id"]) == ("tool_denied", "ToolDenied", denied.event_id)
    assert only["consumer_group"] == f"{settings.platform.namespace}.tools"
    assert {r["reason"] for r in await listed(settings, "--topic", goals_dlq)} == {"poison", "schema_invalid"}
    assert len(await listed(settings, "--since", "1h")) == 4
    assert await listed(settings, "--until", "2000-01-01T00:00:00Z") == []
    assert len(await listed(settings, "--limit", "1")) == 1

    table = ok(await switchboard(settings, "dlq", "list")).stdout
    assert all(r["id"] in table for r in everything) and "tool_denied" in table

    wrong_reason = await switchboard(settings, "dlq", "list", "--reason", "exploded")
    assert wrong_reason.exit_code == 2 and "tool_failed" in wrong_reason.output and "retries_exhausted" in wrong_reason.output
    wrong_topic = await switchboard(settings, "dlq", "list", "--topic", "nowhere")
    assert wrong_topic.exit_code == 2 and "agent.writer" in wrong_topic.output

    shown = json.loads(ok(await switchboard(settings, "dlq", "show", only["id"], "--json")).stdout)
    assert shown["headers"]["x-dlq-reason"] == "tool_denied"
    assert shown["headers"]["x-dlq-original-topic"] == t.tools
    assert shown["value"]["event_id"] == denied.event_id and shown["value"]["tool"] == "http_get"
    assert shown["key"] == "g-denied.r1"
    steps = [s["event_type"] for s in shown["timeline"]]
    assert {"tool.requested", "work.dead_lettered", "goal.failed"} <= set(steps)
    human = ok(await switchboard(settings, "dlq", "show", only["id"])).stdout
    assert "x-dlq-exception-message" in human and "goal.failed" in human and "this record" in human
    no_redis = ok(await switchboard(settings, "dlq", "show", only["id"], redis=False)).stdout
    assert "REDIS_URL is not set" in no_redis and "tool_denied" in no_redis
    poison = next(r for r in everything if r["reason"] == "poison")
    poison_shown = json.loads(ok(await switchboard(settings, "dlq", "show", poison["id"], "--json")).stdout)
    assert poison_shown["value_encoding"] == "base64" and poison_shown["event_type"] is None
    missing = await switchboard(settings, "dlq", "show", f"{tools_dlq}:0:9999")
    assert missing.exit_code == 1 and "no record" in missing.output

    stats = json.loads(ok(await switchboard(settings, "dlq", "stats", "--json", "--window", "1h")).stdout)
    assert {k: v["depth"] for k, v in stats["topics"].items() if v["depth"]} == {goals_dlq: 2, tools_dlq: 2}
    assert set(stats["topics"]) == set(t.dlq_topics())
    assert {k: v["depth"] for k, v in stats["reasons"].items()} == {"schema_invalid": 2, "poison": 1, "tool_denied": 1}
    assert (stats["depth"], stats["added"], stats["per_hour"]) == (4, 4, 4.0)

    budget_key = RedisKeys(settings.platform.namespace).goal_budget("acme", "g-denied")
    before = (await end_offsets(settings, t.all_topics()), await redis.hgetall(budget_key))
    assert before[1][b"stopped"] == b"tool_denied"

    refused = await switchboard(settings, "dlq", "redrive")
    assert refused.exit_code == 2 and "--all" in refused.output
    dry = json.loads(ok(await switchboard(settings, "dlq", "redrive", "--reason", "tool_denied", "--dry-run", "--json")).stdout)
    assert dry["selected"] == [only["id"]] and dry["redriven"] == []
    assert dry["would_reopen"] == [{"tenant": "acme", "goal_id": "g-denied"}]
    dry_table = ok(await switchboard(settings, "dlq", "redrive", "--topic", "goals", "--dry-run")).stdout
    assert "dry run: nothing was changed" in dry_table and "g-bad" in dry_table
    assert "dead-lettered again" in ok(await switchboard(settings, "dlq", "redrive", "--reason", "poison", "--dry-run")).output
    unconfirmed = await switchboard(settings, "dlq", "redrive", "--goal", "g-denied")
    assert unconfirmed.exit_code == 2 and "--yes" in unconfirmed.output

    assert (await end_offsets(settings, t.all_topics()), await redis.hgetall(budget_key)) == before
