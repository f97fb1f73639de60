"""`switchboard replay`: a recorded goal run again in an isolated embedded deployment, answered from
its record (a deterministic replay), or with another model or prompt version (a what-if run); and
the comparison of the two runs."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import tempfile
from collections import Counter, defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from memory.timeline import GoalTimeline
from schemas.envelope import Envelope, new_id, utcnow
from schemas.events import (
    GoalAnswered,
    GoalCompleted,
    GoalEscalated,
    GoalFailed,
    GoalPlanned,
    GoalSubmitted,
    LLMCallRecorded,
    MemoryRecallCompleted,
    MemoryRecallRequested,
    TaskAssigned,
    TaskCompleted,
    TaskFailed,
    ToolCallCompleted,
    ToolCallRequested,
    WorkDeadLettered,
    decode_event,
    goal_end,
)
from services.ops.trace_view import build_trace, recorded_events
from services.runtime.bus import Delivery
from services.runtime.catalogue import AgentCatalogue
from services.runtime.errors import ConfigurationError, Permanent
from services.runtime.host import ServiceSpec, Settings, run_embedded
from services.runtime.prompts import PromptLibrary, pinned
from services.runtime.settings import QdrantSettings, RedisSettings
from services.runtime.tracecontext import new_traceparent

ORCHESTRATOR = "orchestrator"
"""The `agent` of the orchestrator's model calls (planning and the answer)."""


def canonical(arguments: dict[str, Any]) -> str:
    return json.dumps(arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def response_key(purpose: str, agent: str, goal_id: str, step_id: str | None) -> str:
    """What a model call is matched on: an agent's step by its id (`<task>:<n>`), the
    orchestrator's planning and answer by the goal."""
    return f"{purpose} {agent} {step_id or goal_id}"


class GoalRecord:
    """A goal's recorded events, answering a rerun's model calls, tool calls and recalls: the
    `Replay` the services of the isolated deployment are given (services/runtime/host.py)."""

    def __init__(self, events: Iterable[Envelope], what_if: bool = False) -> None:
        self.events = list(events)
        self.what_if = what_if
        submitted = [e for e in self.events if isinstance(e, GoalSubmitted)]
        if not submitted:
            raise ValueError("the record holds no submission (goal.submitted): it cannot be run again")
        self.submission = submitted[0]
        self.answer = next((e for e in self.events if isinstance(e, GoalAnswered)), None)
        """A person's answer to the goal, when it escalated: the rerun is given it again."""
        self._responses: dict[str, deque[LLMCallRecorded]] = defaultdict(deque)
        for call in sorted((e for e in self.events if isinstance(e, LLMCallRecorded)), key=lambda e: e.ts):
            self._responses[response_key(call.purpose, call.agent, call.goal_id, call.step_id)].append(call)
        requests = {e.call_id: e for e in self.events if isinstance(e, ToolCallRequested)}
        self._tools = {
            self._tool_key(r.tool, r.call_id, r.arguments): c
            for c in self.events
            if isinstance(c, ToolCallCompleted) and (r := requests.get(c.call_id)) is not None
        }
        recalls = {e.request_id: e for e in self.events if isinstance(e, MemoryRecallRequested)}
        self._recalls = {
            self._recall_key(q.request_id, q.query): c
            for c in self.events
            if isinstance(c, MemoryRecallCompleted) and (q := recalls.get(c.request_id)) is not None
        }
        self.answered: Counter[str] = Counter()
        """What the record answered: `model`, `tool`, `recall`."""
        self.live: Counter[str] = Counter()
        """What ran live in a what-if run: `tool`, `recall` (model calls are the gateway's count)."""
        self.withheld: list[str] = []
        """Calls with a side effect that a what-if run asked for with new arguments: not run."""
        self.diverged: list[str] = []
        """What a deterministic replay asked for that the record does not hold."""
        self.changed_inputs: list[str] = []
        """Model calls answered from the record whose messages differ from the recorded ones (the
        prompt files or the context assembly changed since)."""

    def _tool_key(self, tool: str, call_id: str, arguments: dict[str, Any]) -> str:
        # A what-if run may plan other tasks, so ids say nothing there: the call itself does.
        return f"{tool} {canonical(arguments)}" if self.what_if else call_id

    def _recall_key(self, request_id: str, query: str) -> str:
        return query if self.what_if else request_id

    def _diverged(self, what: str) -> Permanent:
        self.diverged.append(what)
        return Permanent(
            f"replay diverged at {what}: the record holds no (further) answer for it", reason="replay_diverged"
        )

    def model_response(
        self, purpose: str, agent: str, goal_id: str, step_id: str | None, messages: list[dict[str, Any]]
    ) -> LLMCallRecorded:
        key = response_key(purpose, agent, goal_id, step_id)
        recorded = self._responses.get(key)
        if not recorded:
            raise self._diverged(f"model call {key}")
        past = recorded.popleft()
        if messages != past.messages:
            self.changed_inputs.append(key)
        self.answered["model"] += 1
        return past

    def tool_result(
        self, request: ToolCallRequested, arguments: dict[str, Any], side_effect: bool
    ) -> ToolCallCompleted | None:
        past = self._tools.get(self._tool_key(request.tool, request.call_id, arguments))
        reply = dict(call_id=request.call_id, step_id=request.step_id, tool=request.tool)
        if past is not None:
            self.answered["tool"] += 1
            return ToolCallCompleted(
                **request.caused(), **reply, ok=past.ok, output=past.output, error=past.error, replayed=True
            )
        if not self.what_if:
            raise self._diverged(f"tool call {request.call_id} ({request.tool})")
        if side_effect:
            self.withheld.append(f"{request.tool} {canonical(arguments)}")
            return ToolCallCompleted(
                **request.caused(), **reply, ok=False, output="",
                error=f"not run: {request.tool} has a side effect, and a what-if run never repeats side effects; "
                "the recorded run made no call with these arguments",
            )
        self.live["tool"] += 1
        return None

    def recall(self, request: MemoryRecallRequested) -> MemoryRecallCompleted | None:
        past = self._recalls.get(self._recall_key(request.request_id, request.query))
        if past is not None:
            self.answered["recall"] += 1
            return MemoryRecallCompleted(**request.caused(), request_id=request.request_id, hits=past.hits)
        if not self.what_if:
            raise self._diverged(f"memory recall {request.request_id}")
        self.live["recall"] += 1
        return None

    def models(self) -> dict[str, str]:
        """The model each agent kind (and the orchestrator) used, by the first call it made."""
        used: dict[str, str] = {}
        for call in self._calls():
            used.setdefault(call.agent, call.model)
        return used

    def prompt_versions(self) -> dict[str, str]:
        """The version of each prompt the record used: `{"researcher": "v2"}`."""
        labels = [c.prompt_version for c in self._calls()] + [
            e.prompt_version for e in self.events if isinstance(e, GoalPlanned)
        ]
        versions: dict[str, str] = {}
        for label in labels:
            name, _, version = label.rpartition(".")
            if name:
                versions.setdefault(name, version)
        return versions

    def _calls(self) -> list[LLMCallRecorded]:
        return sorted((e for e in self.events if isinstance(e, LLMCallRecorded)), key=lambda e: e.ts)


# ---- comparing two runs -----------------------------------------------------------------------------

GOAL = "goal"
"""The key of the goal's own events (submission, planning, its answer, its end) in `causal_order`."""


def _last_number(text: str | None) -> int:
    """The last part of an id such as `<task>:<step>` or `<task>:<step>:<call>`; 0 if not a number."""
    last = (text or "").rpartition(":")[2]
    return int(last) if last.isdigit() else 0


def _rank(event: Envelope) -> tuple[int, ...]:
    """Where the event comes in its goal's or task's causal order. The recorder reads each topic on
    its own, and tasks run concurrently, so neither the stream's order nor time says it."""
    if event.task_id is None:
        goal_ranks = {GoalSubmitted: 0, GoalPlanned: 2, GoalCompleted: 5, GoalFailed: 5}
        if isinstance(event, LLMCallRecorded):
            return (1,) if event.purpose == "plan" else (4,)
        return (goal_ranks.get(type(event), 3),)
    match event:
        case TaskAssigned():
            return (0,)
        case MemoryRecallRequested():
            return (1,)
        case MemoryRecallCompleted():
            return (2,)
        case LLMCallRecorded():
            return (3, _last_number(event.step_id), 0, 0)
        case ToolCallRequested():
            return (3, _last_number(event.step_id), 1, _last_number(event.call_id))
        case ToolCallCompleted():
            return (3, _last_number(event.step_id), 2, _last_number(event.call_id))
        case WorkDeadLettered():
            return (8,)
        case TaskCompleted() | TaskFailed():
            return (9,)
    return (5,)


def label(event: Envelope) -> str:
    """The event's type, with what tells two of its kind apart: `tool.requested calculator`."""
    match event:
        case LLMCallRecorded():
            return f"{event.event_type} {event.purpose}"
        case ToolCallRequested() | ToolCallCompleted():
            return f"{event.event_type} {event.tool}"
        case TaskFailed() | GoalFailed() | WorkDeadLettered():
            return f"{event.event_type} {event.reason}"
    return event.event_type


def causal_order(events: Iterable[Envelope], goal_id: str) -> dict[str, list[str]]:
    """The goal's events as labels in causal order: `goal` for its own, then one list per task
    (by planned id, `r1`), in the plan's order."""
    mine = [e for e in events if e.goal_id == goal_id]
    plan = next((e.plan for e in mine if isinstance(e, GoalPlanned)), None)
    order: dict[str, list[str]] = {GOAL: []}
    order.update({t.id: [] for t in plan.tasks} if plan else {})
    for event in sorted(mine, key=lambda e: (e.task_id or "", _rank(e), e.ts)):
        key = event.task_id.removeprefix(f"{goal_id}.") if event.task_id else GOAL
        order.setdefault(key, []).append(label(event))
    return order


def outcome(events: Iterable[Envelope]) -> dict[str, Any]:
    """How the goal ended, by its last end (a failed goal may be reopened and complete):
    `{"status": "completed", "answer": ...}`, `failed` with its reason, `cancelled`,
    `waiting_for_human` (escalated, not answered), or `running`."""
    last: dict[str, Any] = {"status": "running"}
    for event in sorted(events, key=lambda e: e.ts):
        if isinstance(event, GoalCompleted):
            last = {"status": "completed", "answer": event.answer}
        elif isinstance(event, GoalFailed):
            last = {"status": "failed", "reason": event.reason, "detail": event.detail}
        elif goal_end(event) == "cancelled":
            last = {"status": "cancelled"}
        elif isinstance(event, GoalEscalated):
            last = {"status": "waiting_for_human", "reason": event.reason}
    return last


@dataclass(frozen=True)
class Comparison:
    identical: bool
    events: int
    """Events compared: the record's."""
    tasks: int
    difference: str | None
    """The first difference, in words; None when identical."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def compare(recorded: list[Envelope], replayed: list[Envelope], goal_id: str) -> Comparison:
    """The replay against the record: the same events in the same causal order, goal and task by
    task, and the same end (the same answer)."""
    before, after = causal_order(recorded, goal_id), causal_order(replayed, goal_id)
    count = sum(len(labels) for labels in before.values())
    tasks = len(before) - 1

    def differs(what: str) -> Comparison:
        return Comparison(False, count, tasks, what)

    for key in [*before, *(k for k in after if k not in before)]:
        where = "the goal" if key == GOAL else f"task {key}"
        was, now = before.get(key, []), after.get(key, [])
        for i in range(max(len(was), len(now))):
            a = was[i] if i < len(was) else "nothing more"
            b = now[i] if i < len(now) else "nothing more"
            if a != b:
                return differs(f"{where}, event {i + 1}: the record has {a}, the replay {b}")
    first, second = outcome(recorded), outcome(replayed)
    if first != second:
        return differs(f"the end differs: the record {_ending(first)}, the replay {_ending(second)}")
    return Comparison(True, count, tasks, None)


def _ending(end: dict[str, Any]) -> str:
    if end["status"] == "completed":
        return f"answered {json.dumps(end['answer'][:200])}"
    return f"failed ({end['reason']})" if end["status"] == "failed" else "did not end"


def run_summary(events: list[Envelope], goal_id: str, tenant: str) -> dict[str, Any]:
    """What a what-if run is compared on: plan, models and prompts, tool calls, tokens, cost, answer."""
    trace = build_trace(goal_id, tenant, events, []).to_json()
    steps = trace["steps"] + [s for t in trace["tasks"] for s in t["steps"]]
    calls = [s for s in steps if s["type"] == "llm_call"]
    totals = trace["totals"]
    end = outcome(events)
    return {
        "plan": [f"{t['id']} ({t['kind']}): {t['instruction']}" for t in (trace["plan"] or {}).get("tasks", [])],
        "models": sorted({c["model"] for c in calls}),
        "prompt_versions": sorted({c["prompt_version"] for c in calls}),
        "tool_calls": [
            f"{s['tool']} {canonical(s['arguments'] or {})} -> {'ok' if s['ok'] else 'error'}"
            for s in sorted((s for s in steps if s["type"] == "tool_call"), key=lambda s: s["call_id"])
        ],
        "llm_calls": totals["llm_calls"],
        "input_tokens": totals["input_tokens"],
        "output_tokens": totals["output_tokens"],
        "cost_usd": totals["cost_usd"],
        "status": end["status"],
        "answer": end.get("answer") or end.get("reason"),
    }


def diff(recorded: dict[str, Any], what_if: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Field by field, both runs' values and whether they differ."""
    return {k: {"recorded": v, "what_if": what_if.get(k), "changed": v != what_if.get(k)} for k, v in recorded.items()}


# ---- running a recorded goal again ------------------------------------------------------------------


@dataclass
class Rerun:
    """One run of a recorded goal in an isolated embedded deployment."""

    namespace: str
    events: list[Envelope]
    model_calls: int
    """Calls made to a model through LiteLLM: 0 in a deterministic replay."""
    models: dict[str, str]
    prompt_versions: dict[str, str]
    answered: dict[str, int] = field(default_factory=dict)
    live: dict[str, int] = field(default_factory=dict)
    withheld: list[str] = field(default_factory=list)
    diverged: list[str] = field(default_factory=list)
    changed_inputs: list[str] = field(default_factory=list)
    failures: int = 0
    """Messages the in-process bus could not handle (logged)."""

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in dataclasses.asdict(self).items() if k != "events"}
        data["events"] = len(self.events)
        return data


def pins(record: GoalRecord, library: PromptLibrary, prompt_version: str | None) -> dict[str, str]:
    """The prompt versions of the rerun: the recorded ones, and `prompt_version` for every prompt
    that has a file of that version. ConfigurationError when none has."""
    versions = record.prompt_versions()
    if prompt_version is None:
        return versions
    wanted = f"v{prompt_version.strip().lower().removeprefix('v')}"
    having = [n for n in library.names() if any(p.version == wanted for p in library.versions(n))]
    if not having:
        known = "; ".join(f"{n}: {', '.join(p.version for p in library.versions(n))}" for n in library.names())
        raise ConfigurationError(f"no prompt has a version {wanted} (known: {known})")
    return versions | dict.fromkeys(having, wanted)


async def run_again(
    record: GoalRecord, base: Settings, *, model: str | None = None, prompt_version: str | None = None,
    timeout: float = 120.0,
) -> Rerun:
    """Runs the recorded goal again: the same tenant, goal id, text and budget, in its own namespace
    with in-process stores and a temporary data directory, so nothing of the recorded run (or of
    any deployment) is touched. Raises TimeoutError when it does not end within `timeout`."""
    catalogue = AgentCatalogue.load(base.platform.agents_dir)
    recorded_models = record.models()
    models = {name: model or recorded_models.get(name) or catalogue.get(name).model for name in catalogue.names}
    models[ORCHESTRATOR] = model or recorded_models.get(ORCHESTRATOR) or base.llm.default_model
    versions = pins(record, PromptLibrary.configured(base.platform.agents_dir), prompt_version)
    goal = record.submission
    namespace = f"{'whatif' if record.what_if else 'replay'}-{new_id()[:8]}"
    with tempfile.TemporaryDirectory(prefix="switchboard-replay-") as data_dir:
        settings = dataclasses.replace(
            base,
            platform=base.platform.model_copy(update={
                "namespace": namespace, "data_dir": Path(data_dir),
                "instance": "what-if" if record.what_if else "replay",
            }),
            kafka=base.kafka.model_copy(update={"bootstrap_servers": None}),
            redis=RedisSettings(url=None),
            qdrant=QdrantSettings(path=":memory:"),
            llm=base.llm.model_copy(update={"default_model": models[ORCHESTRATOR]}),
        )
        specs = [
            ServiceSpec(ORCHESTRATOR),
            *(ServiceSpec("agent", {"kind": k, "model": models[k]}) for k in catalogue.names),
            ServiceSpec("tools"),
            ServiceSpec("memory"),  # its recorder keeps the rerun's record, as it kept the original's
        ]
        # A new submission of the same goal: its deadline counts from now, not from the original's.
        again = goal.model_copy(update={"event_id": new_id(), "ts": utcnow(), "causation_id": None})
        with pinned(versions):
            async with run_embedded(specs, settings, replay=record) as (bus, runtime):
                ended = asyncio.Event()

                async def observe(delivery: Delivery) -> None:
                    if delivery.topic != runtime.topics.progress:
                        return
                    try:
                        event = decode_event(delivery.value)
                    except (ValidationError, ValueError):
                        return
                    if event.goal_id != goal.goal_id:
                        return
                    if goal_end(event) is not None:
                        ended.set()
                    elif isinstance(event, GoalEscalated):
                        # A person answered the original; the rerun gets the same answer. Unanswered
                        # in the record, the goal waits there too: that is where the rerun ends.
                        answer = record.answer
                        if answer is None:
                            ended.set()
                            return
                        given = answer.model_copy(update={"event_id": new_id(), "ts": utcnow(), "causation_id": None})
                        await bus.send(runtime.topics.goals, goal.goal_id.encode(), given.to_bytes(),
                                       {"traceparent": new_traceparent(), "event_type": given.event_type})

                bus.observe(observe)
                headers = {"traceparent": new_traceparent(), "event_type": again.event_type}
                await bus.send(runtime.topics.goals, goal.goal_id.encode(), again.to_bytes(), headers)
                async with asyncio.timeout(timeout):
                    await ended.wait()
                    await bus.wait_idle()  # the recorder has the rest of the goal's events
                timeline = GoalTimeline(runtime.redis, runtime.keys, 0, 0)
                events = await recorded_events(timeline, goal.tenant, goal.goal_id) or []
                return Rerun(
                    namespace=namespace, events=events, model_calls=runtime.llm.model_calls,
                    models=models, prompt_versions=versions, answered=dict(record.answered),
                    live=dict(record.live), withheld=list(record.withheld), diverged=list(record.diverged),
                    changed_inputs=list(record.changed_inputs), failures=len(bus.failures),
                )
