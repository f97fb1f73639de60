"""Curated semantic memory through the memory service's own events, on real Kafka and Redis with
Qdrant in local mode and the offline embedder: the test plays a researcher agent (signed
`remember_fact` calls, recalls) and the orchestrator (task assignments, completions, failures).

Outcomes and lessons are written by the recorder, a consumer group of its own, so a test waits
until such a write is visible (a recall that shows it, or the recorder's committed offsets)
before it asserts on what is not there.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from schemas.envelope import utcnow
from schemas.events import (
    MemoryHit,
    MemoryRecallCompleted,
    MemoryRecallRequested,
    TaskAssigned,
    TaskCompleted,
    TaskFailed,
    ToolCallCompleted,
    ToolCallRequested,
)
from schemas.topics import Topics
from services.runtime.host import ServiceSpec, Settings
from services.runtime.settings import QdrantSettings
from tests.integration.conftest import serving
from tests.support.kafka import RawProducer, TopicWatch, eventually, uncommitted, unique

AGENT = "researcher"


@dataclass
class PlayedAgent:
    """The test in a researcher's place: it sends to the memory topic and reads its own inbox."""

    settings: Settings
    topics: Topics
    send: RawProducer
    inbox: TopicWatch

    async def remember(self, tenant: str, subject: str, fact: str, *, at: datetime | None = None) -> str:
        """A signed remember_fact call, made at `at` (the fact's valid_from); the tool's reply."""
        call_id = unique("call")
        task_id = f"g-facts.{call_id}"
        request = ToolCallRequested(
            tenant=tenant, goal_id="g-facts", task_id=task_id, call_id=call_id, step_id=f"{task_id}:0",
            tool="remember_fact", arguments={"subject": subject, "fact": fact}, agent_kind=AGENT,
            reply_to=self.topics.agent(AGENT), ts=at or utcnow(),
        )
        await self.send.event(self.topics.memory, request, signed=True)
        reply: ToolCallCompleted = await self.inbox.event(ToolCallCompleted, call_id=call_id, timeout=30)
        assert reply.ok, reply.error
        return reply.output

    async def recall(self, tenant: str, query: str, *, task_id: str | None = None, k: int = 10) -> list[MemoryHit]:
        """What the memory service serves for `query`; with `task_id`, as served to that task."""
        request_id = unique("ask")
        await self.send.event(
            self.topics.memory,
            MemoryRecallRequested(
                tenant=tenant, goal_id="g-ask", task_id=task_id, request_id=request_id, query=query, k=k,
                reply_to=self.topics.agent(AGENT),
            ),
        )
        reply: MemoryRecallCompleted = await self.inbox.event(MemoryRecallCompleted, request_id=request_id, timeout=30)
        return reply.hits

    async def recall_until(self, tenant: str, query: str, shown: Callable[[list[MemoryHit]], bool]) -> list[MemoryHit]:
        """Recall again until `shown` holds: how a test waits for a write made by the recorder."""

        async def hits() -> list[MemoryHit] | None:
            found = await self.recall(tenant, query)
            return found if shown(found) else None

        found: list[MemoryHit] = await eventually(hits, timeout=30)
        return found

    async def complete(self, tenant: str, goal: str, task_id: str, result: str) -> None:
        """The orchestrator's inbox receives a task's result, keyed by goal as the agents send it."""
        done = TaskCompleted(tenant=tenant, goal_id=goal, task_id=task_id, kind=AGENT, result=result, steps=1)
        await self.send.event(self.topics.goals, done, key=goal)


@pytest.fixture
async def agent(settings: Settings, tmp_path: Path) -> AsyncIterator[PlayedAgent]:
    """The memory service on its own Qdrant directory (local mode) and the offline embedder."""
    local = replace(settings, qdrant=QdrantSettings(path=str(tmp_path / "qdrant")))
    topics = Topics(local.platform.namespace, (AGENT, "writer"))
    async with (
        serving([ServiceSpec("memory")], local),
        TopicWatch(local.kafka, [topics.agent(AGENT)]) as inbox,
        RawProducer(local.kafka) as send,
    ):
        yield PlayedAgent(local, topics, send, inbox)


def texts(hits: list[MemoryHit]) -> list[str]:
    return [h.text for h in hits]


async def test_a_tenant_never_recalls_another_tenants_memories(agent: PlayedAgent) -> None:
    acme_fact = "The staging cluster runs 5 Kafka brokers in the Lisbon region."
    globex_fact = "The staging cluster runs 3 Kafka brokers in the Oslo region."
    acme_outcome = "The quarterly invoice export for Acme finished with 1204 rows."
    assert (await agent.remember("acme", "staging cluster", acme_fact)).startswith("stored as a new fact")
    # The same subject in another tenant is a fact of its own, not a newer version of acme's.
    assert (await agent.remember("globex", "staging cluster", globex_fact)).startswith("stored as a new fact")
    await agent.complete("acme", "g-export", "g-export.r1", acme_outcome)
    acme = await agent.recall_until("acme", acme_outcome, lambda hits: acme_outcome in texts(hits))

    acme_staging = await agent.recall("acme", acme_fact)
    assert texts(acme_staging)[0] == acme_fact and acme_staging[0].version == 1
    globex_staging = await agent.recall("globex", acme_fact)
    globex_export = await agent.recall("globex", acme_outcome)
    assert texts(globex_staging) == [globex_fact], "globex is served its own fact, never acme's"
    assert acme_outcome not in texts(globex_export)
    acme_ids = {h.memory_id for h in [*acme, *acme_staging]}
    assert acme_ids.isdisjoint(h.memory_id for h in [*globex_staging, *globex_export])
    # The knowledge base is seeded for tenant `default` only (MEMORY_SEED_TENANTS).
    assert "distributed event log" in texts(await agent.recall("default", "what is Apache Kafka"))[0]
    assert not any("distributed event log" in t for t in texts(await agent.recall("acme", "what is Apache Kafka")))


async def test_a_newer_version_of_a_fact_replaces_the_old_one_in_recall(agent: PlayedAgent) -> None:
    old, new = "The billing service listens on port 8080.", "The billing service listens on port 9090."
    now = utcnow()
    await agent.remember("acme", "billing service port", old, at=now - timedelta(minutes=5))
    reply = await agent.remember("acme", "Billing service: port", new, at=now)
    assert reply.startswith("stored; it replaces the previous version")

    for query in ("which port does the billing service listen on", old):
        hits = await agent.recall("acme", query)
        assert texts(hits)[0] == new and hits[0].version == 2, f"query {query!r}: {texts(hits)}"
        assert old not in texts(hits), f"query {query!r}: the superseded version was served"


async def test_an_older_version_arriving_late_never_displaces_the_current_one(agent: PlayedAgent) -> None:
    # The two phrasings are far apart (cosine about 0 with the offline embedder): the current version
    # is served for the old phrasing only because a match on a superseded version maps to its successor.
    current = "Database outages now go to the SRE rota through the PagerDuty schedule DB-Primary."
    older = "Page Dana Whitfield on extension 4471 for database outages."
    now = utcnow()
    assert (await agent.remember("acme", "database on-call", current, at=now)).startswith("stored as a new fact")
    reply = await agent.remember("acme", "Database On-Call", older, at=now - timedelta(hours=1))
    assert reply.startswith("kept as history: a newer version of this subject is already stored")

    for query in ("Dana Whitfield extension 4471", older, "who do I page for database outages"):
        hits = await agent.recall("acme", query)
        assert texts(hits) == [current], f"query {query!r}: {texts(hits)}"


BACKUP_FACT = "The nightly backup job writes to the Falcon bucket in eu-west-1."


async def test_a_paraphrase_of_a_known_fact_is_merged_not_added(agent: PlayedAgent) -> None:
    paraphrase = "The nightly backup job stores its output in the Falcon bucket in eu-west-1."
    first = await agent.remember("acme", "nightly backup bucket", BACKUP_FACT)
    again = await agent.remember("acme", "Nightly-backup bucket", paraphrase)
    assert first.startswith("stored as a new fact")
    assert again.startswith("already known; the existing fact was confirmed")
    assert first.rpartition("(memory ")[2] == again.rpartition("(memory ")[2], "merged into the same memory"

    for query in (BACKUP_FACT, paraphrase, "where does the nightly backup go"):
        hits = await agent.recall("acme", query)
        assert texts(hits) == [BACKUP_FACT], f"query {query!r}: {texts(hits)}"
        assert hits[0].version == 1, "a merge is not a new version"


async def test_a_fact_restated_under_another_subject_is_one_fact_with_two_names(agent: PlayedAgent) -> None:
    restated = "the nightly backup job writes to the Falcon bucket in eu-west-1"
    first = await agent.remember("acme", "nightly backup bucket", BACKUP_FACT)
    again = await agent.remember("acme", "backup destination", restated)
    assert again.startswith("already known; the existing fact was confirmed")
    assert first.rpartition("(memory ")[2] == again.rpartition("(memory ")[2], "merged into the same memory"
    # A new value under either name is a new version of the one fact.
    moved = "The nightly backup job writes to the Osprey bucket in eu-west-1."
    assert (await agent.remember("acme", "backup destination", moved)).startswith("stored; it replaces")
    hits = await agent.recall("acme", "where does the nightly backup go")
    assert [(h.text, h.version) for h in hits] == [(moved, 2)]


async def test_a_changed_name_in_a_fact_is_a_new_version(agent: PlayedAgent) -> None:
    moved = "The nightly backup job writes to the Osprey bucket in eu-west-1."
    now = utcnow()
    await agent.remember("acme", "nightly backup bucket", BACKUP_FACT, at=now - timedelta(minutes=5))
    reply = await agent.remember("acme", "nightly backup bucket", moved, at=now)
    assert reply.startswith("stored; it replaces the previous version of this subject")
    for query in (moved, BACKUP_FACT):
        assert texts(await agent.recall("acme", query)) == [moved]


async def test_a_result_that_repeats_a_recalled_memory_adds_no_outcome(agent: PlayedAgent) -> None:
    fact = "The staging cluster runs 5 Kafka brokers in the Lisbon region."
    echo = "The staging cluster runs 5 Kafka brokers, in the Lisbon region."
    novel = "The Lisbon staging brokers were upgraded to Kafka 4.1 on Tuesday."
    await agent.remember("acme", "staging cluster", fact)
    served = await agent.recall("acme", "how many brokers does the staging cluster run", task_id="g-echo.r1")
    assert texts(served)[0] == fact

    await agent.complete("acme", "g-echo", "g-echo.r1", echo)
    # Same goal, so the same partition of the goals topic: the recorder handles it after the echo.
    # g-echo.r2 was served nothing, so its result is a new outcome.
    await agent.complete("acme", "g-echo", "g-echo.r2", novel)
    await agent.recall_until("acme", novel, lambda hits: novel in texts(hits))

    hits = await agent.recall("acme", echo)
    assert [(h.kind, h.text) for h in hits if h.text in (fact, echo)] == [("fact", fact)]
    assert {h.text for h in hits if h.kind == "outcome"} <= {novel}, "the only outcome is the unserved task's"


async def test_a_failed_task_comes_back_as_a_labelled_lesson(agent: PlayedAgent) -> None:
    instruction = "Crawl every page of the internal wiki and summarise each one"
    assigned = TaskAssigned(
        tenant="acme", goal_id="g-crawl", task_id="g-crawl.r1", kind=AGENT, instruction=instruction,
        goal_text="Summarise the internal wiki",
    )
    await agent.send.event(agent.topics.agent(AGENT), assigned)
    recorder = f"{agent.settings.platform.namespace}.memory-recorder"

    # The failure goes to another topic than the assignment: wait until the recorder has read the
    # assignment, as it would have long before a real agent gives up on the task.
    async def assignment_recorded() -> bool:
        return await uncommitted(agent.settings.kafka, recorder, [agent.topics.agent(AGENT)]) == 0

    await eventually(assignment_recorded, timeout=30)
    failed = TaskFailed(**assigned.caused(), kind=AGENT, reason="runaway_loop")
    await agent.send.event(agent.topics.goals, failed, key="g-crawl")

    # A later task, asked the same thing in other words, is served the failure as a lesson.
    hits = await agent.recall_until(
        "acme", "crawl all internal wiki pages and summarize them", lambda hits: any(h.kind == "lesson" for h in hits)
    )
    [lesson] = [h for h in hits if h.kind == "lesson"]
    assert lesson.label == "FAILED (runaway_loop): do not repeat"
    assert instruction in lesson.text and lesson.source_goal == "g-crawl"
    assert not any(h.kind == "outcome" for h in hits), "a failed task leaves no outcome to copy"
