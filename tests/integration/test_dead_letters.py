"""Bad input on a real topic: dead-lettered with its reason, and the partition keeps flowing."""

from __future__ import annotations

from schemas.events import GoalPlanned, GoalSubmitted
from schemas.topics import Topics
from services.runtime.host import ServiceSpec, Settings
from tests.integration.conftest import serving
from tests.support.kafka import RawProducer, TopicWatch


async def test_poison_and_schema_invalid_goals_are_dead_lettered_and_valid_goals_still_run(settings: Settings) -> None:
    t = Topics(settings.platform.namespace, ("researcher", "writer"))
    async with serving([ServiceSpec("orchestrator")], settings), TopicWatch(settings.kafka, [t.progress, Topics.dlq(t.goals)]) as watch, RawProducer(settings.kafka) as send:
        # Same key, so all land on one partition: the bad ones sit between the good ones.
        await send.event(t.goals, GoalSubmitted(tenant="acme", goal_id="g-1", text="What is 1+1"), key="same")
        await send.send(t.goals, b"\x00\x01 definitely not json", key="same")
        await send.send(t.goals, b'{"event_type": "goal.submitted", "tenant": "acme", "goal_id": "g-x"}', key="same")
        await send.event(t.goals, GoalSubmitted(tenant="acme", goal_id="g-2", text="What is 2+2"), key="same")
        dead = await watch.wait_for(lambda s: s.topic == Topics.dlq(t.goals), count=2)
        await watch.event(GoalPlanned, goal_id="g-1")
        await watch.event(GoalPlanned, goal_id="g-2")
    reasons = {d.value[:8]: d.headers for d in dead}
    poison = reasons[b"\x00\x01 defin"]
    invalid = next(h for v, h in reasons.items() if v.startswith(b"{"))
    assert poison["x-dlq-reason"] == "poison"
    assert invalid["x-dlq-reason"] == "schema_invalid"
    for headers in (poison, invalid):
        assert headers["x-dlq-original-topic"] == t.goals
        assert headers["x-dlq-consumer-group"] == f"{settings.platform.namespace}.orchestrator"
        assert int(headers["x-dlq-original-offset"]) in (1, 2)
        assert headers["x-dlq-exception-class"] in ("ValidationError", "JSONDecodeError", "ValueError")
    assert invalid["x-dlq-goal-id"] == "g-x"
    assert all(d.key == b"same" for d in dead)
