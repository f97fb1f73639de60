"""A goal that failed on a tool is redriven after the tool is fixed. It completes, and the side-effect count is 1."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from click.testing import Result
from typer.testing import CliRunner

from schemas.events import AuditRecorded, GoalCompleted, GoalFailed, GoalSubmitted, ToolCallRequested
from schemas.topics import Topics
from services.ops.cli import app
from services.runtime.host import ServiceSpec, Settings
from tests.integration.conftest import serving
from tests.support.kafka import RawProducer, TopicWatch


async def switchboard(settings: Settings, *args: str) -> Result:
    """The command as an operator runs it, on this test's namespace (in a thread: it runs its own loop)."""
    env = {
        "SWITCHBOARD_NAMESPACE": settings.platform.namespace,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers or "",
        "REDIS_URL": settings.redis.url or "",
    }
    result = await asyncio.to_thread(CliRunner().invoke, app, list(args), env=env)
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    return result


async def test_a_goal_that_failed_on_a_tool_completes_after_a_redrive_with_its_side_effect_done_once(settings: Settings, tmp_path: Path) -> None:
    t = Topics(settings.platform.namespace, ("researcher", "writer"))
    tools_dlq = Topics.dlq(t.tools)
    specs = [ServiceSpec("orchestrator"), ServiceSpec("agent", {"kind": "researcher"}), ServiceSpec("agent", {"kind": "writer"}), ServiceSpec("tools"), ServiceSpec("memory")]
    goal = GoalSubmitted(tenant="default", goal_id="g-redrive", text="What is 12*7 and what is Apache Kafka?")
    # The breakage: a file where save_note must create the tenant's directory.
    blocker = tmp_path / "sandbox" / goal.tenant
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a directory")
    notes = blocker / "notes.jsonl"

    async with serving(specs, settings), TopicWatch(settings.kafka, [*t.work_topics(), tools_dlq, t.audit]) as watch, RawProducer(settings.kafka) as send:
        await send.event(t.goals, goal)
        [failed] = await watch.wait_for(lambda s: s.topic == t.progress and isinstance(s.event, GoalFailed), timeout=90)
        assert failed.event.goal_id == goal.goal_id and failed.event.reason == "tool_failed"
        [dead] = await watch.wait_for(lambda s: s.topic == tools_dlq)
        assert dead.headers["x-dlq-reason"] == "tool_failed"
        assert dead.headers["x-dlq-goal-id"] == goal.goal_id
        assert isinstance(dead.event, ToolCallRequested) and dead.event.tool == "save_note"

        blocker.unlink()  # the fix
        await switchboard(settings, "dlq", "redrive", "--goal", goal.goal_id, "--yes", "--actor", "ops@test")

        [done] = await watch.wait_for(lambda s: s.topic == t.progress and isinstance(s.event, GoalCompleted), timeout=90)
        assert done.event.goal_id == goal.goal_id
        assert "84" in done.event.answer and "distributed event log" in done.event.answer
        [redriven] = await watch.wait_for(lambda s: s.topic == t.tools and "x-redriven-from" in s.headers)
        # The audit trail also records the tool executions; this is the redrive's record.
        [audit] = await watch.wait_for(lambda s: s.topic == t.audit and getattr(s.event, "action", None) == "dlq.redrive")

    assert redriven.value == dead.value, "the same event, with the same event_id"
    assert redriven.key == dead.key
    assert not [h for h in redriven.headers if h.startswith(("x-dlq-", "x-retry-", "x-origin-")) or h == "x-attempt"]
    assert redriven.headers["traceparent"] == dead.headers["traceparent"]
    assert isinstance(audit.event, AuditRecorded)
    assert (audit.event.action, audit.event.actor) == ("dlq.redrive", "ops@test")
    assert audit.event.subject == redriven.headers["x-redriven-from"] and audit.event.subject.startswith(f"{tools_dlq}:")
    assert audit.event.detail == {
        "target_topic": t.tools, "reason": "tool_failed", "goal_id": goal.goal_id,
        "event_type": "tool.requested", "event_id": dead.event.event_id, "dry_run": False,
    }
    saved = [json.loads(line) for line in notes.read_text().splitlines()]
    assert [n["goal_id"] for n in saved] == [goal.goal_id], "the note was saved exactly once"

    listed = json.loads((await switchboard(settings, "dlq", "list", "--goal", goal.goal_id, "--json")).stdout)
    assert [(r["id"], r["redriven"]) for r in listed] == [(audit.event.subject, True)]
    again = json.loads((await switchboard(settings, "dlq", "redrive", "--goal", goal.goal_id, "--yes", "--json")).stdout)
    assert again["redriven"] == [] and again["skipped_redriven_before"] == [audit.event.subject]
