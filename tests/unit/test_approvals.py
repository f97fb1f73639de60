"""The approval gate: a tool that needs approval runs only once a person approves the call."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
from redis.asyncio import Redis

from memory.keys import RedisKeys
from schemas.events import (
    ApprovalDecided,
    ApprovalRequested,
    AuditRecorded,
    ToolCallCompleted,
)
from services.runtime.approvals import ApprovalBook
from services.runtime.errors import Permanent, ToolDenied
from services.tools import logic
from tests.unit.test_tool_executor import deps, notes, request

NOTE = {"title": "t", "body": "b"}


def gated(redis: Redis, keys: RedisKeys, sandbox: Path, timeout_s: float = 60.0) -> logic.ToolsDeps:
    return dataclasses.replace(
        deps(redis, keys, sandbox), approvals=ApprovalBook(redis, keys), needs_approval=frozenset({"save_note"}),
        approval_timeout_s=timeout_s, approvals_topic="unit.approvals",
    )


def decision(asked: ApprovalRequested, approved: bool, by: str = "alice", reason: str = "") -> ApprovalDecided:
    return ApprovalDecided(**asked.caused(), approval_id=asked.approval_id, approved=approved, decided_by=by, reason=reason)


def actions(outputs: list) -> list[str]:  # type: ignore[type-arg]
    return [o.event.action for o in outputs if isinstance(o.event, AuditRecorded)]


async def test_a_call_that_needs_approval_waits_without_running_and_is_announced(
    redis: Redis, keys: RedisKeys, tmp_path: Path
) -> None:
    d = gated(redis, keys, tmp_path)
    outputs = await logic.execute(d, request("save_note", NOTE))
    [asked] = [o.event for o in outputs if isinstance(o.event, ApprovalRequested)]
    assert [o.topic for o in outputs if o.event is asked] == ["unit.approvals"]
    assert (asked.tool, asked.arguments, asked.agent_kind) == ("save_note", NOTE, "writer")
    assert actions(outputs) == ["approval.requested"]
    assert notes(tmp_path) == []
    assert await logic.execute(d, request("save_note", NOTE)) == []  # a redelivery: still waiting, announced once
    assert [a.approval_id for a in await ApprovalBook(redis, keys).pending()] == [asked.approval_id]
    assert [a.approval_id for a in await ApprovalBook(redis, keys).pending(asked.tenant)] == [asked.approval_id]
    assert await ApprovalBook(redis, keys).pending("another-tenant") == []


async def test_an_approved_call_runs_once_and_answers_the_agent(redis: Redis, keys: RedisKeys, tmp_path: Path) -> None:
    d = gated(redis, keys, tmp_path)
    [asked] = [o.event for o in await logic.execute(d, request("save_note", NOTE)) if isinstance(o.event, ApprovalRequested)]
    outputs = await logic.decide(d, decision(asked, approved=True))
    [reply] = [o.event for o in outputs if isinstance(o.event, ToolCallCompleted)]
    assert reply.ok and "saved note" in reply.output
    audit = [o.event for o in outputs if isinstance(o.event, AuditRecorded)]
    assert [(a.action, a.actor) for a in audit] == [("approval.approved", "alice"), ("tool.executed", "writer")]
    await logic.decide(d, decision(asked, approved=True))  # the decision redelivered
    assert len(notes(tmp_path)) == 1
    assert await ApprovalBook(redis, keys).pending() == []


async def test_a_denied_call_is_dead_lettered_as_approval_denied_with_who_and_why(
    redis: Redis, keys: RedisKeys, tmp_path: Path
) -> None:
    d = gated(redis, keys, tmp_path)
    [asked] = [o.event for o in await logic.execute(d, request("save_note", NOTE)) if isinstance(o.event, ApprovalRequested)]
    with pytest.raises(Permanent) as denied:
        await logic.decide(d, decision(asked, approved=False, by="bob", reason="not this note"))
    assert denied.value.reason == "approval_denied" and "bob" in str(denied.value) and "not this note" in str(denied.value)
    [audit] = [o.event for o in denied.value.outputs]
    assert (audit.action, audit.actor, audit.detail["reason"]) == ("approval.denied", "bob", "not this note")
    with pytest.raises(Permanent, match="not approved"):  # the request redelivered stays denied
        await logic.execute(d, request("save_note", NOTE))
    with pytest.raises(Permanent, match="not approved"):  # a late approval does not undo the denial
        await logic.decide(d, decision(asked, approved=True))
    assert notes(tmp_path) == []


async def test_an_approval_nobody_decides_in_time_is_claimed_once_for_denial(
    redis: Redis, keys: RedisKeys, tmp_path: Path
) -> None:
    d = gated(redis, keys, tmp_path, timeout_s=0.01)
    await logic.execute(d, request("save_note", NOTE))
    book = ApprovalBook(redis, keys)
    [expired] = await book.claim_expired(time.time() + 1)
    assert await book.claim_expired(time.time() + 1) == []  # another replica gets nothing
    assert expired.request.call_id == "g1.w1:0:0"


async def test_a_decision_for_no_waiting_approval_is_refused(redis: Redis, keys: RedisKeys, tmp_path: Path) -> None:
    d = gated(redis, keys, tmp_path)
    forged = ApprovalDecided(tenant="acme", goal_id="g1", task_id="g1.w1", approval_id="nope", approved=True, decided_by="mallory")
    with pytest.raises(ToolDenied, match="no approval 'nope'"):
        await logic.decide(d, forged)


async def test_tools_that_need_no_approval_run_at_once(redis: Redis, keys: RedisKeys, tmp_path: Path) -> None:
    outputs = await logic.execute(gated(redis, keys, tmp_path), request("calculator", {"expression": "2+2"}, kind="researcher"))
    assert [type(o.event) for o in outputs] == [ToolCallCompleted, AuditRecorded]
