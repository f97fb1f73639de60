"""Robustness, as separate processes on real Kafka and Redis: bad input, and servers that restart.

- 1,000 malformed messages among 50 goals: each is dead-lettered once on its own topic's `.dlq`,
  every goal completes, and every service is still running.
- Kafka, then Redis, restarted mid-run (on a private pair of servers, never the shared ones):
  every goal completes and no side effect happens twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from schemas.events import EVENT_TYPES, GoalCompleted, GoalFailed, GoalSubmitted
from schemas.topics import Topics
from services.runtime.pipeline import MAX_MESSAGE_BYTES
from tests.support.deployment import Deployment, make_deployment
from tests.support.infra import PrivateInfra
from tests.support.kafka import RawProducer, Seen, TopicWatch, eventually, uncommitted

# Starting five processes and their consumer groups alone can take a minute on a busy machine.
pytestmark = pytest.mark.timeout(600)

KINDS = ("researcher", "writer")
SEED = 20_240_611
BROKER_MESSAGE_LIMIT = 1_048_576
"""The smaller of the broker's message.max.bytes and a producer's max.request.size (defaults)."""
DLQ_HEADER_ROOM = 16_384
"""What a dead-letter record adds to the original message (its x-dlq-* headers)."""


def goal(prefix: str, i: int) -> GoalSubmitted:
    return GoalSubmitted(tenant="default", goal_id=f"g-{prefix}-{i}", text=f"What is {i}*3 and what is {i}+4")


def answered_right(done: GoalCompleted, i: int) -> bool:
    return f"{i}*3 = {i * 3}" in done.answer and f"{i}+4 = {i + 4}" in done.answer


def start_roles(d: Deployment, **env: str) -> None:
    d.start("orchestrator", "orchestrator", **env)
    for kind in KINDS:
        d.start(kind, "agent", "--kind", kind, **env)
    d.start("tools", "tools", **env)
    d.start("memory", "memory", **env)
    d.wait_for_members({"orchestrator": 1, "agent.researcher": 1, "agent.writer": 1, "tools": 1, "memory": 1, "memory-recorder": 1})


# Fuzzing


@dataclass(frozen=True)
class BadMessage:
    topic: str
    key: str
    value: bytes | None
    kind: str
    reason: str
    """The x-dlq-reason a user should find on its dead-letter record."""


class MalformedMessages:
    """Seeded generators of the ways a message can be wrong, each with the reason it is rejected."""

    REASONS = {
        "not_json": "poison",
        "random_bytes": "poison",
        "not_an_object": "schema_invalid",
        "unknown_event_type": "unknown_event",
        "broken_schema": "schema_invalid",
        "oversize": "poison",
    }
    WEIGHTS = {kind: 20 for kind in REASONS} | {"oversize": 1}
    """Oversize messages are few: each is half a megabyte or more."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def make(self, kind: str, topic: str, key: str) -> BadMessage:
        value: bytes | None = getattr(self, kind)(key)
        return BadMessage(topic, key, value, kind, self.REASONS[kind])

    def some_kind(self) -> str:
        return self.rng.choices(list(self.WEIGHTS), weights=list(self.WEIGHTS.values()))[0]

    def not_json(self, key: str) -> bytes | None:
        valid = goal("fuzz-bad", self.rng.randrange(1000)).to_bytes()
        return self.rng.choice([
            b"",
            None,  # a tombstone
            b"{not json " + key.encode(),
            valid[: self.rng.randrange(1, len(valid) - 1)],  # cut short: a JSON object never ends early
            ("~" + "".join(chr(self.rng.randrange(32, 127)) for _ in range(self.rng.randrange(1, 200)))).encode(),
            f"{{'event_type': 'goal.submitted', 'goal_id': '{key}'}}".encode(),
        ])

    def random_bytes(self, _: str) -> bytes:
        return b"\xff" + self.rng.randbytes(self.rng.randrange(0, 512))  # 0xff is never UTF-8, so never JSON

    def not_an_object(self, key: str) -> bytes:
        return json.dumps(self.rng.choice([
            [], [{"event_type": "goal.submitted", "goal_id": key}], 42, -0.5, "goal.submitted", None, True,
        ])).encode()

    def unknown_event_type(self, key: str) -> bytes:
        doc: dict[str, object] = {"tenant": "default", "goal_id": key}
        variant = self.rng.randrange(3)
        if variant == 0:
            doc["event_type"] = f"fuzz.{self.rng.choice(['created', 'goal.deleted', 'Goal.Submitted', ''])}"
        elif variant == 1:
            doc["event_type"] = self.rng.choice([7, None, ["goal.submitted"]])
        return json.dumps(doc).encode()

    def broken_schema(self, key: str) -> bytes:
        event_type = self.rng.choice(sorted(EVENT_TYPES))
        base = {"event_type": event_type, "tenant": "default", "goal_id": key}
        variant = self.rng.randrange(4)
        if variant == 0:
            doc = {**base, "fuzz_field": self.rng.random()}  # events forbid unknown fields
        elif variant == 1:
            doc = {**base, "goal_id": self.rng.randrange(10**6), "tenant": "no such tenant!"}
        elif variant == 2:
            doc = {**json.loads(goal("fuzz-bad", 1).to_bytes()), "goal_id": key, "text": ""}
        else:
            doc = {**json.loads(goal("fuzz-bad", 2).to_bytes()), "goal_id": key, "schema_version": "one"}
        return json.dumps(doc).encode()

    def oversize(self, key: str) -> bytes:
        size = MAX_MESSAGE_BYTES + self.rng.randrange(1, 8_192)
        assert size + DLQ_HEADER_ROOM < BROKER_MESSAGE_LIMIT, "an oversize test message must still fit the broker"
        if self.rng.random() < 0.5:
            return b"x" * size
        head = json.dumps({"event_type": "goal.submitted", "tenant": "default", "goal_id": key, "text": ""}).encode()
        return head[:-2] + b"y" * (size - len(head)) + b'"}'


def fuzz_plan(t: Topics, goals: list[GoalSubmitted], count: int, rng: random.Random) -> list[GoalSubmitted | BadMessage]:
    """`count` bad messages, every kind on every consumed topic at least once, shuffled among the goals."""
    topics = [t.goals, *(t.agent(k) for k in KINDS), t.tools, t.memory]
    make = MalformedMessages(rng)
    pairs = [(kind, topic) for kind in make.REASONS for topic in topics]
    pairs += [(make.some_kind(), rng.choice(topics)) for _ in range(count - len(pairs))]
    plan: list[GoalSubmitted | BadMessage] = [make.make(kind, topic, f"fuzz-{i:04d}") for i, (kind, topic) in enumerate(pairs)]
    plan += goals
    rng.shuffle(plan)
    return plan


def sample(items: Iterable[str], limit: int = 10) -> str:
    listed = sorted(items)
    return f"{len(listed)}: {listed[:limit]}{' ...' if len(listed) > limit else ''}"


def test_a_thousand_malformed_messages_are_each_dead_lettered_once_while_fifty_goals_complete(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    d = make_deployment(tmp_path)
    t = Topics(d.namespace, KINDS)
    owners = {t.goals: "orchestrator", t.agent("researcher"): "agent.researcher", t.agent("writer"): "agent.writer", t.tools: "tools", t.memory: "memory"}
    goals = [goal("fuzz", i) for i in range(50)]
    goal_ids = {g.goal_id for g in goals}
    plan = fuzz_plan(t, goals, 1_000, rng)
    bad = {m.key: m for m in plan if isinstance(m, BadMessage)}
    assert len(bad) == 1_000 and Counter(m.kind for m in bad.values()).keys() == MalformedMessages.REASONS.keys()
    try:
        start_roles(d)

        async def run() -> tuple[dict[str, GoalCompleted], list[Seen], dict[str, int]]:
            dead_letter_topics = [Topics.dlq(topic) for topic in owners]
            async with TopicWatch(d.kafka, [t.progress, *dead_letter_topics]) as watch, RawProducer(d.kafka) as send:
                for item in plan:
                    if isinstance(item, BadMessage):
                        await send.send(item.topic, item.value, key=item.key)
                    else:
                        await send.event(t.goals, item)

                def settled(seen: list[Seen]) -> bool:
                    ended = {s.event.goal_id for s in seen if isinstance(s.event, GoalCompleted)}
                    return goal_ids <= ended and sum(s.topic in dead_letter_topics for s in seen) >= len(bad)

                # If this times out, the assertions below say what is missing.
                with contextlib.suppress(TimeoutError):
                    await watch.until(settled, timeout=240)

                # Quiet: each owning group has committed everything on its topic, so nothing can
                # be redelivered and dead-lettered again. Then read the dead-letter topics to the end.
                lags: dict[str, int] = {}

                async def all_committed() -> bool:
                    for topic, group in owners.items():
                        lags[group] = await uncommitted(d.kafka, f"{d.namespace}.{group}", [topic])
                    return not any(lags.values())

                with contextlib.suppress(TimeoutError):
                    await eventually(all_committed, timeout=60, interval=0.5)
                seen = await watch.caught_up()
                done = {s.event.goal_id: s.event for s in seen if isinstance(s.event, GoalCompleted)}
                return done, [s for s in seen if s.topic in dead_letter_topics], lags

        done, dead, lags = asyncio.run(run())
        d.assert_alive()

        assert not (unfinished := goal_ids - done.keys()), f"goals that did not complete: {sample(unfinished)}"
        for i, g in enumerate(goals):
            assert answered_right(done[g.goal_id], i), done[g.goal_id].answer

        keys = Counter((s.key or b"").decode() for s in dead)
        missing = [f"{k} {bad[k].kind} on {bad[k].topic}: {bad[k].value!r:.60}" for k in bad.keys() - keys.keys()]
        assert not missing, f"never dead-lettered: {sample(missing)}"
        assert not (extra := keys.keys() - bad.keys()), f"dead-lettered but never sent as bad: {sample(extra)}"
        assert not (twice := {k for k, n in keys.items() if n > 1}), f"dead-lettered more than once: {sample(twice)}"
        sent_per_topic = Counter(Topics.dlq(m.topic) for m in bad.values())
        assert Counter(s.topic for s in dead) == sent_per_topic, "one dead letter per bad message, per topic"
        wrong = []
        for s in dead:
            m = bad[(s.key or b"").decode()]
            h = s.headers
            found = (s.topic, s.value or b"", h["x-dlq-reason"], h["x-dlq-original-topic"], h["x-dlq-consumer-group"])
            if found != (Topics.dlq(m.topic), m.value or b"", m.reason, m.topic, f"{d.namespace}.{owners[m.topic]}"):
                wrong.append(
                    f"{m.key} ({m.kind} {m.value!r:.60} on {m.topic}): {h['x-dlq-reason']} from "
                    f"{h['x-dlq-consumer-group']} ({h['x-dlq-exception-class']}: {h['x-dlq-exception-message']:.80})"
                )
        assert not wrong, f"dead letters that are not the original message with the expected reason: {sample(wrong, 5)}"
        assert not any(lags.values()), f"messages left uncommitted, per group: {lags}"
    finally:
        d.stop()


# Servers restarting mid-run, on a private Kafka and Redis


@pytest.fixture(scope="module")
def private_infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateInfra]:
    """A Kafka and a Redis of this module's own: restarting them disturbs no other test."""
    infra = PrivateInfra(tmp_path_factory.mktemp("infra"))
    try:
        infra.up()
        yield infra
    finally:
        infra.down()


def notes(root: Path) -> list[dict[str, str]]:
    path = root / "data" / "sandbox" / "default" / "notes.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_through_restart(d: Deployment, restart: Callable[[], None], prefix: str) -> None:
    """Goals in flight, some past their side effect, when `restart` runs; more goals right after."""
    t = Topics(d.namespace, KINDS)
    before, after = [goal(prefix, i) for i in range(24)], [goal(prefix, i) for i in range(24, 30)]
    goal_ids = {g.goal_id for g in before + after}
    dead_letter_topics = [Topics.dlq(topic) for topic in t.work_topics()]

    def settled(seen: list[Seen]) -> bool:
        """Every goal ended, or some work was dead-lettered (then its goal would wait for ever)."""
        ended = {s.event.goal_id for s in seen if isinstance(s.event, GoalCompleted | GoalFailed)}
        return goal_ids <= ended or any(s.topic in dead_letter_topics for s in seen)

    async def run() -> tuple[int, list[Seen]]:
        async with TopicWatch(d.kafka, [t.progress, *dead_letter_topics]) as watch, RawProducer(d.kafka) as send:
            for g in before:
                await send.event(t.goals, g)
            await eventually(lambda: notes(d.root), timeout=120, interval=0.05)
            noted = len(notes(d.root))
            await asyncio.to_thread(restart)
            for g in after:
                await send.event(t.goals, g)
            return noted, await watch.until(settled, timeout=240)

    noted, seen = asyncio.run(run())
    assert noted < len(before), "the restart came while goals were still in flight"
    dead = [
        f"{s.headers['x-dlq-original-topic']} ({s.headers['x-dlq-consumer-group']}): "
        f"{s.headers['x-dlq-reason']}: {s.headers['x-dlq-exception-message']}"
        for s in seen if s.topic in dead_letter_topics
    ]
    assert not dead, f"work was dead-lettered: {dead}"
    assert not [s.event for s in seen if isinstance(s.event, GoalFailed)]
    done = {s.event.goal_id: s.event for s in seen if isinstance(s.event, GoalCompleted)}
    for i, g in enumerate(before + after):
        assert answered_right(done[g.goal_id], i), done[g.goal_id].answer
    written = notes(d.root)
    keys = Counter(n["idempotency_key"] for n in written)
    assert not {k for k, n in keys.items() if n > 1}, f"side effects repeated: {keys.most_common(3)}"
    assert Counter(n["task_id"] for n in written) == {f"{g}.w1": 1 for g in goal_ids}, "one note per writer task"
    d.assert_alive()


def test_every_goal_completes_without_repeated_side_effects_when_kafka_restarts_mid_run(
    private_infra: PrivateInfra, tmp_path: Path
) -> None:
    d = make_deployment(tmp_path, kafka=private_infra.kafka, redis=private_infra.redis)
    try:
        start_roles(d, LLM_OFFLINE_LATENCY_MS="uniform:100:600")
        run_through_restart(d, private_infra.restart_kafka, "kafka")
    finally:
        d.stop()


def test_every_goal_completes_without_repeated_side_effects_when_redis_restarts_mid_run(
    private_infra: PrivateInfra, tmp_path: Path
) -> None:
    d = make_deployment(tmp_path, kafka=private_infra.kafka, redis=private_infra.redis)
    try:
        start_roles(d, LLM_OFFLINE_LATENCY_MS="uniform:100:600")
        run_through_restart(d, private_infra.restart_redis, "redis")
    finally:
        d.stop()
