"""The memory benchmark's generator: a seed gives the same streams, and they hold every case it scores."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

from memory.semantic import normalize_subject
from schemas.events import TaskAssigned, TaskCompleted, TaskFailed, ToolCallRequested, decode_event
from tests.bench.memory_gen import TENANTS, Corpus, filler, generate


def dumped(corpus: Corpus) -> list[Any]:
    return [(s.tenant, s.goal_id, [e.model_dump(mode="json") for e in s.events]) for s in corpus.streams]


def fact_writes(corpus: Corpus) -> list[tuple[int, str, str, str, str, datetime]]:
    """(position in the recording order, tenant, goal, subject as written, fact, timestamp) of every remember_fact."""
    writes = []
    position = 0
    for stream in corpus.streams:
        for event in stream.events:
            position += 1
            if isinstance(event, ToolCallRequested) and event.tool == "remember_fact":
                writes.append((position, event.tenant, event.goal_id, event.arguments["subject"], event.arguments["fact"], event.ts))
    return writes


def test_the_same_seed_gives_the_same_streams_probes_and_filler() -> None:
    first, again, other = generate(7), generate(7), generate(8)
    assert dumped(first) == dumped(again)
    assert first.probes == again.probes and first.duplicates == again.duplicates
    assert dumped(first) != dumped(other)
    assert filler(7, 500) == filler(7, 500)
    assert len({r.source for r in filler(7, 500)}) == 500


def test_every_event_is_a_valid_envelope_that_survives_the_wire() -> None:
    for stream in generate(7).streams:
        for event in stream.events:
            assert (event.tenant, event.goal_id) == (stream.tenant, stream.goal_id)
            assert decode_event(event.to_bytes()) == event


def test_paraphrased_duplicates_are_written_again_by_later_goals_in_other_words() -> None:
    corpus = generate(7)
    goals_by_text: dict[tuple[str, str], set[str]] = defaultdict(set)
    for stream in corpus.streams:
        for event in stream.events:
            if isinstance(event, ToolCallRequested) and event.tool == "remember_fact":
                goals_by_text[(event.tenant, event.arguments["fact"])].add(event.goal_id)
            if isinstance(event, TaskCompleted):
                goals_by_text[(event.tenant, event.result)].add(event.goal_id)
    reworded = [g for g in corpus.duplicates if len(g.texts) > 1]
    assert len(reworded) >= 10
    for group in corpus.duplicates:
        goals = set().union(*(goals_by_text[(group.tenant, t)] for t in group.texts))
        assert len(goals) == group.writes >= 2  # each write in a goal of its own


def test_superseded_facts_reuse_the_subject_in_other_spellings_and_some_arrive_out_of_order() -> None:
    corpus = generate(7)
    writes = fact_writes(corpus)
    conflicts = [p for p in corpus.probes if p.kind == "conflict"]
    assert len(conflicts) >= 10 and corpus.out_of_order >= 3
    out_of_order = 0
    for probe in conflicts:
        assert probe.stale and not probe.stale & probe.expected
        assert probe.subject is not None
        mine = [w for w in writes if w[1] == probe.tenant and normalize_subject(w[3]) == normalize_subject(probe.subject)]
        current = [w for w in mine if w[4] in probe.expected]
        stale = [w for w in mine if w[4] in probe.stale]
        assert current and stale
        assert max(w[5] for w in stale) < min(w[5] for w in current)  # the current version is the newest
        out_of_order += any(s[0] > c[0] for s in stale for c in current)  # ...but was recorded first
    assert out_of_order == corpus.out_of_order
    spellings = {w[3] for w in writes}
    assert len(spellings) > len({normalize_subject(s) for s in spellings})  # case, spacing, punctuation vary


def test_other_tenants_hold_the_same_subjects_with_other_values() -> None:
    corpus = generate(7)
    by_subject: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for _, tenant, _, subject, fact, _ in fact_writes(corpus):
        by_subject[normalize_subject(subject)][tenant].add(fact)
    shared = {s: t for s, t in by_subject.items() if len(t) > 1}
    assert len(shared) >= 10
    for tenants in shared.values():
        texts = list(tenants.values())
        assert all(a.isdisjoint(b) for i, a in enumerate(texts) for b in texts[i + 1 :])
    assert set(corpus.texts) == set(TENANTS)


def test_failed_tasks_are_probed_later_in_other_words() -> None:
    corpus = generate(7)
    failed = {
        e.goal_id: (e.reason, stream.events[1])
        for stream in corpus.streams for e in stream.events if isinstance(e, TaskFailed)
    }
    mistakes = [p for p in corpus.probes if p.kind == "mistake"]
    assert len(mistakes) >= 10
    assert {p.label for p in mistakes} == {"runaway_loop", "budget_exceeded", "tool_denied"}
    for probe in mistakes:
        assert probe.source_goal is not None
        reason, assigned = failed[probe.source_goal]
        assert isinstance(assigned, TaskAssigned)
        assert probe.label == reason
        assert probe.query != assigned.instruction and probe.expected == {assigned.instruction}


def test_no_answer_questions_are_off_topic_or_about_services_nobody_has() -> None:
    corpus = generate(7)
    questions = [p for p in corpus.probes if p.kind == "no_answer"]
    assert {p.hard for p in questions} == {True, False}
    assert all(not p.expected for p in questions)
    written = " ".join(t for texts in corpus.texts.values() for t in texts).lower()
    for probe in questions:
        if probe.hard:
            service = next(w.rstrip("?") for w in probe.query.split() if "-" in w)
            assert service not in written
