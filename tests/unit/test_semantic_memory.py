"""Curated semantic memory on Qdrant in memory: merges, versions, echoes, lessons, ranking.

The same properties run on real Kafka, Redis and Qdrant local mode through the memory service's
events in tests/integration/test_memory_on_kafka.py; these are the fast, exhaustive checks.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator

import pytest
from qdrant_client import AsyncQdrantClient

from memory.embeddings import Embedder, HashingEmbedder, WordLlamaEmbedder
from memory.semantic import MemoryRecord, SemanticMemory, names_agree, normalize_subject, same_value

T0 = time.time() - 3_600
PORT_V1 = "The billing service listens on port 8080."
PORT_V2 = "The billing service now listens on port 9090."
PORT_V3 = "Since the migration the billing service listens on port 7070."


@pytest.fixture(params=["wordllama", "hashing"])
async def memory(request: pytest.FixtureRequest) -> AsyncIterator[SemanticMemory]:
    embedder: Embedder = WordLlamaEmbedder() if request.param == "wordllama" else HashingEmbedder()
    client = AsyncQdrantClient(location=":memory:")
    store = SemanticMemory(client, embedder, "unit", local=True)
    await store.ensure_collection()
    yield store
    await client.close()


def fact(text: str, source: str, at: float, subject: str = "billing port", tenant: str = "acme") -> MemoryRecord:
    return MemoryRecord(tenant=tenant, kind="fact", text=text, source=source, subject=subject, valid_from=T0 + at)


async def test_a_paraphrase_of_a_known_fact_merges_into_it(memory: SemanticMemory) -> None:
    first = await memory.write(fact(PORT_V1, "s1", 0))
    again = await memory.write(fact("billing service listens on port 8080", "s2", 1, subject="Billing  Port!"))
    assert (first.action, again.action) == ("added", "merged")
    assert again.memory_id == first.memory_id
    [hit] = await memory.recall("acme", "which port does the billing service listen on", k=5)
    assert hit.text == PORT_V1 and hit.quality > 0.7  # confirmed once more: quality went up


async def test_a_fact_restated_under_another_subject_merges_and_the_subject_becomes_an_alias(
    memory: SemanticMemory,
) -> None:
    first = await memory.write(fact(PORT_V1, "s1", 0))
    again = await memory.write(fact("The billing service listens on port 8080", "s2", 1, subject="billing-service listen port"))
    assert (again.action, again.memory_id) == ("merged", first.memory_id)
    # A new value under the alias is a new version of the one fact, not a second fact.
    newer = await memory.write(fact(PORT_V2, "s3", 10, subject="billing-service listen port"))
    assert (newer.action, newer.memory_id) == ("superseded", first.memory_id)
    assert [(h.text, h.version) for h in await memory.recall("acme", "billing port", k=5)] == [(PORT_V2, 2)]
    # Another fact that names the same things in other words is not an alias.
    other = await memory.write(fact("The billing service health check probes port 9090.", "s4", 11, subject="billing health check port"))
    assert other.action == "added"


async def test_a_duplicate_outcome_updates_instead_of_adding(memory: SemanticMemory) -> None:
    text = "Kafka keeps the orders topic for 7 days."
    a = await memory.write(MemoryRecord(tenant="acme", kind="outcome", text=text, source="task/1"))
    b = await memory.write(MemoryRecord(tenant="acme", kind="outcome", text="kafka keeps the orders topic for 7 days", source="task/2"))
    c = await memory.write(MemoryRecord(tenant="acme", kind="outcome", text="Kafka keeps the orders topic for 30 days.", source="task/3"))
    assert (a.action, b.action, c.action) == ("added", "merged", "added")  # 30 days is not 7 days
    texts = [h.text for h in await memory.recall("acme", "how long does Kafka keep the orders topic", k=10)]
    assert sorted(texts) == sorted([text, "Kafka keeps the orders topic for 30 days."])


async def test_writing_the_same_source_again_changes_nothing(memory: SemanticMemory) -> None:
    await memory.write(fact(PORT_V1, "s1", 0))
    await memory.write(fact(PORT_V2, "s2", 10))
    assert (await memory.write(fact(PORT_V2, "s2", 10))).action == "merged"
    [hit] = await memory.recall("acme", "billing port", k=5)
    assert (hit.text, hit.version) == (PORT_V2, 2)


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
async def test_the_latest_version_is_current_whatever_order_the_writes_arrive_in(
    memory: SemanticMemory, order: tuple[int, ...]
) -> None:
    versions = [fact(PORT_V1, "s1", 0), fact(PORT_V2, "s2", 10), fact(PORT_V3, "s3", 20)]
    for i in order:
        await memory.write(versions[i])
    for query in (PORT_V1, PORT_V2, "which port does billing listen on"):
        hits = await memory.recall("acme", query, k=5)
        assert hits[0].text == PORT_V3, query  # an old phrasing still finds the fact as it is now
        assert PORT_V1 not in [h.text for h in hits] and PORT_V2 not in [h.text for h in hits]


async def test_a_write_that_repeats_a_served_memory_is_not_stored_again(memory: SemanticMemory) -> None:
    await memory.write(fact(PORT_V1, "s1", 0))
    [served] = await memory.recall("acme", "billing port", k=1)
    echo = MemoryRecord(tenant="acme", kind="outcome", text=f"Billing listens on port 8080. {PORT_V1}", source="task/9")
    assert (await memory.write(echo, served=frozenset({served.memory_id}))).action == "echo"
    assert [h.text for h in await memory.recall("acme", "billing port 8080", k=10)] == [PORT_V1]
    # Not served to that task: the same text is the task's own finding, and it is kept.
    assert (await memory.write(echo)).action in ("added", "merged")


async def test_a_failure_is_served_as_a_labelled_lesson(memory: SemanticMemory) -> None:
    await memory.write(MemoryRecord(tenant="acme", kind="outcome", text="Fetched the pricing page from the public site.", source="task/1"))
    lesson = "FAILED: fetch the pricing page from the internal wiki — tool_denied: host not allowed"
    await memory.write(MemoryRecord(tenant="acme", kind="lesson", text=lesson, source="lesson/2", cause="tool_denied"))
    hits = await memory.recall("acme", "fetch the pricing page from the internal wiki", k=5)
    [failure] = [h for h in hits if h.kind == "lesson"]
    assert failure.label == "FAILED (tool_denied): do not repeat" and failure.text == lesson
    assert all(h.label is None for h in hits if h.kind != "lesson")


async def test_no_tenant_sees_another_tenants_versions_or_duplicates(memory: SemanticMemory) -> None:
    await memory.write(fact(PORT_V1, "s1", 0, tenant="acme"))
    await memory.write(fact("The billing service listens on port 1111.", "s1", 5, tenant="globex"))
    await memory.write(fact(PORT_V2, "s2", 10, tenant="acme"))
    for tenant, query in itertools.product(("acme", "globex"), (PORT_V1, PORT_V2, "billing port 1111")):
        assert {h.tenant for h in await memory.recall(tenant, query, k=10)} <= {tenant}
    [globex] = await memory.recall("globex", "billing port", k=5)
    assert (globex.text, globex.version) == ("The billing service listens on port 1111.", 1)


async def test_related_memories_are_linked_both_ways(memory: SemanticMemory) -> None:
    a = await memory.write(MemoryRecord(tenant="acme", kind="fact", text="The billing service listens on port 8080 in staging.", source="a"))
    b = await memory.write(MemoryRecord(tenant="acme", kind="fact", text="The billing service listens on port 8443 in production.", source="b"))
    assert a.action == b.action == "added"
    points = {p.id: p.payload or {} for p in await memory.client.retrieve(memory.collection, [a.memory_id, b.memory_id])}
    assert points[b.memory_id]["links"] == [a.memory_id]
    assert points[a.memory_id]["links"] == [b.memory_id]


async def test_irrelevant_questions_get_no_answer(memory: SemanticMemory) -> None:
    await memory.write(fact(PORT_V1, "s1", 0))
    assert await memory.recall("acme", "who painted the sistine chapel ceiling", k=5) == []


def test_subjects_and_named_things_are_normalised() -> None:
    assert normalize_subject("  Billing-Port! ") == normalize_subject("billing port")
    assert names_agree("On the orders topic, Kafka keeps 7 days.", "Kafka keeps 7 days on the orders topic")
    assert not names_agree("owned by Alice", "owned by Bob")
    assert not names_agree("listens on port 8080", "listens on port 9090")
    assert not names_agree("INC-1234 was a disk failure", "INC-1243 was a disk failure")
    assert names_agree("Root cause of INC-7: a full disk.", "INC-7 was caused by a full disk.")
    assert same_value("billing-api listens on port 8080.", "Connections to billing-api go to port 8080.", "billing-api port")
    assert not same_value("Backups go to the Falcon bucket in eu-west-1.", "Backups go to the Osprey bucket in eu-west-1.", "backups")
    assert not same_value("billing-api listens on port 8080.", "billing-api listens on port 9090.", "billing-api port")
    assert same_value("The payments team owns search-indexer.", "the payments team owns search-indexer", "search-indexer owner")
    assert not same_value("The payments team owns search-indexer.", "The sre team owns search-indexer.", "search-indexer owner")


async def test_a_new_value_in_lower_case_is_a_new_version_not_a_duplicate(memory: SemanticMemory) -> None:
    await memory.write(fact("The payments team owns search-indexer.", "s1", 0, subject="search-indexer owner"))
    newer = await memory.write(fact("The sre team owns search-indexer.", "s2", 10, subject="search-indexer owner"))
    assert newer.action == "superseded"
    [hit] = await memory.recall("acme", "who owns search-indexer", k=5)
    assert (hit.text, hit.version) == ("The sre team owns search-indexer.", 2)
