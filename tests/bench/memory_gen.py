"""Seeded goal event streams and labelled probes for `make bench-memory`.

`generate(seed)` makes up a small company's worth of memory for three tenants: service facts
written with the `remember_fact` tool, incident outcomes, failed tasks. Same seed, same corpus
(no network, no clock: timestamps count from `start`). It contains each case the benchmark
scores:

- paraphrased duplicates: a fact or an incident outcome written again, worded differently, by a
  later goal (and echoes: a task that answers by quoting what recall served it);
- superseded facts: the same subject (casing, spacing, punctuation varied) with a new value and a
  later timestamp; some arrive out of order (an archive import writes the older value last);
- other tenants: the same subjects with different values in every tenant that has them;
- failed tasks (runaway_loop, budget_exceeded, tool_denied) and, later, probes worded as a
  paraphrase of the failed instruction;
- questions nothing in memory answers (off-topic, or about a service no tenant has).

Format:
- `Corpus.streams`: `GoalStream(tenant, goal_id, events)` in the order the memory service records
  them; `events` are `schemas.events` envelopes in goal order. A `ToolCallRequested` with
  `tool="remember_fact"` is also a fact write; a `MemoryRecallRequested` asks for a recall whose
  hits the task's `TaskCompleted` may quote (an echo).
- `Corpus.probes`: `Probe(kind, tenant, query, expected, stale, ...)`. `expected` is every text
  that counts as the right answer (all the wordings of the current version); `stale` the texts of
  versions that were superseded; `label`/`source_goal` the failure a `mistake` probe must surface;
  `scratchpad` the tool steps (OpenAI message format) of the task that asks it.
- `Corpus.duplicates`: `DuplicateGroup(tenant, texts, writes)`: one memory written `writes` times
  in the wordings `texts`; curated, it should be one stored memory.
- `Corpus.texts`: every memory text each tenant wrote, for the cross-tenant leak check.
- `filler(seed, n, tenants)`: n distractor memories (deploy notes, job reports, facts about
  services the probes never ask about) to fill the store up to a size.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from memory.semantic import MemoryKind, MemoryRecord
from schemas.envelope import Envelope
from schemas.events import (
    GoalCompleted,
    GoalFailed,
    GoalSubmitted,
    MemoryRecallRequested,
    TaskAssigned,
    TaskCompleted,
    TaskFailed,
    ToolCallCompleted,
    ToolCallRequested,
)

ProbeKind = Literal["recall", "conflict", "mistake", "no_answer"]
TENANTS = ("acme", "globex", "initech")
START = datetime(2025, 1, 6, 9, 0, tzinfo=UTC)
AGENT_TOPIC = "bench.agent.researcher"

SERVICES = (
    "billing-api", "auth-gateway", "search-indexer", "ledger-sync", "notification-hub", "payments-worker",
    "inventory-db", "report-builder", "checkout-web", "media-transcoder", "audit-log", "feature-flags",
)
UNKNOWN_SERVICES = ("quantum-cache", "fax-gateway", "holiday-planner", "telemetry-mirror", "badge-printer", "tape-archive")
TEAMS = (
    "payments", "identity", "platform", "search", "data-eng", "growth", "sre", "mobile", "finance-eng", "checkout",
    "infra", "trust-safety",
)
REGIONS = (
    "eu-west-1", "us-east-1", "ap-southeast-2", "eu-central-1", "us-west-2", "ca-central-1", "eu-north-1",
    "ap-northeast-1", "sa-east-1", "us-east-2",
)
DATABASES = (
    "postgres-main", "postgres-ledger", "mysql-legacy", "dynamodb-orders", "cassandra-events", "mongo-catalogue",
    "postgres-analytics", "cockroach-accounts", "mysql-billing", "clickhouse-metrics",
)


@dataclass(frozen=True)
class Attribute:
    name: str
    """The subject is `<service> <name>`."""
    value: Callable[[random.Random, str, str], str]
    """(rng, tenant, service) -> a value."""
    statements: tuple[str, ...]
    questions: tuple[str, ...]


ATTRIBUTES = (
    Attribute(
        "port", lambda r, t, s: str(r.randrange(3000, 9999)),
        ("{svc} listens on port {v}.", "The {svc} service listens on port {v}.",
         "Connections to {svc} go to TCP port {v}.", "Use port {v} to reach {svc}."),
        ("Which port does {svc} listen on?", "What port do I use to connect to {svc}?",
         "On which TCP port is {svc} served?"),
    ),
    Attribute(
        "owner", lambda r, t, s: r.choice(TEAMS),
        ("{svc} is owned by the {v} team.", "The {v} team owns {svc}.",
         "Ownership of {svc} sits with the {v} team.", "{svc} belongs to team {v}."),
        ("Who owns {svc}?", "Which team is responsible for {svc}?", "Which team should approve changes to {svc}?"),
    ),
    Attribute(
        "on-call channel", lambda r, t, s: f"#{r.choice(TEAMS)}-{r.choice(('oncall', 'pager', 'alerts'))}",
        ("Pages for {svc} go to the {v} channel.", "{svc} alerts are routed to {v}.",
         "The on-call channel for {svc} is {v}.", "When {svc} breaks, the page lands in {v}."),
        ("Where do {svc} alerts get sent?", "Which Slack channel is paged when {svc} is down?",
         "What is the on-call channel of {svc}?"),
    ),
    Attribute(
        "runbook", lambda r, t, s: f"https://wiki.{t}.internal/runbooks/{s}-{r.randrange(10, 99)}",
        ("The runbook for {svc} lives at {v}.", "{svc} incident procedures are documented at {v}.",
         "See {v} for the {svc} runbook.", "The {svc} runbook is {v}."),
        ("Where is the runbook for {svc}?", "Where can I find the incident procedure for {svc}?",
         "Link to the {svc} runbook?"),
    ),
    Attribute(
        "region", lambda r, t, s: r.choice(REGIONS),
        ("{svc} is deployed in {v}.", "{svc} runs in the {v} region.", "The {v} region hosts {svc}.",
         "Production {svc} is in {v}."),
        ("Which region is {svc} deployed in?", "Where does {svc} run in production?", "What AWS region hosts {svc}?"),
    ),
    Attribute(
        "database", lambda r, t, s: r.choice(DATABASES),
        ("{svc} stores its data in {v}.", "{svc} keeps its records in the {v} database.",
         "The database behind {svc} is {v}.", "{svc} persists to {v}."),
        ("Which database does {svc} use?", "Where does {svc} keep its data?", "What is the backing store of {svc}?"),
    ),
    Attribute(
        "request timeout", lambda r, t, s: str(r.choice((5, 8, 10, 12, 15, 20, 25, 30, 45, 60, 90, 120))),
        ("Requests to {svc} time out after {v} seconds.", "{svc} has a {v}-second request timeout.",
         "Calls to {svc} are cut off after {v} s.", "The {svc} request timeout is {v} seconds."),
        ("What is the request timeout of {svc}?", "How long before calls to {svc} time out?",
         "After how many seconds does a {svc} request give up?"),
    ),
)

INCIDENTS = (
    # (symptom, cause, fix)
    ("5xx spike", "an expired TLS certificate on the internal load balancer", "rotating the certificate and adding an expiry alert"),
    ("latency regression", "a missing index on the orders table", "adding the index and backfilling statistics"),
    ("memory leak", "an unbounded in-process cache", "capping the cache at 50k entries"),
    ("outage", "a bad feature-flag rollout that disabled retries", "rolling the flag back and gating it per region"),
    ("data lag", "a stuck Kafka consumer group after a rebalance", "restarting the consumers and raising the session timeout"),
    ("login failures", "clock skew on two nodes breaking token validation", "re-enabling NTP and draining the nodes"),
    ("disk full alert", "debug logging left on after a deploy", "turning debug logging off and shortening log retention"),
    ("duplicate charges", "a retry without an idempotency key", "adding idempotency keys to the charge call"),
)
OUTCOME_TEMPLATES = (
    "INC-{n}: the {symptom} on {svc} was caused by {cause}; it was fixed by {fix}.",
    "Root cause of INC-{n} ({svc} {symptom}): {cause}. Resolution: {fix}.",
    "{svc} {symptom} (INC-{n}) traced to {cause} and resolved by {fix}.",
    "Postmortem INC-{n}: {svc} had a {symptom} because of {cause}. We fixed it by {fix}.",
)
OUTCOME_QUESTIONS = (
    "What caused the {symptom} on {svc}?", "How was INC-{n} on {svc} resolved?",
    "Why did {svc} have a {symptom}, and what fixed it?",
)

FAILURES = (
    # (instruction, paraphrase the probe asks, reason, detail)
    ("Restart every {svc} pod in {region} one at a time and confirm each one is healthy.",
     "Roll-restart all the {svc} pods in {region} and check each comes back healthy.",
     "runaway_loop", "kubectl rollout status called 6 times with the same arguments and no progress"),
    ("Re-index the full {svc} catalogue for {year} and report the document count.",
     "Rebuild the whole {svc} catalogue index for {year}; how many documents are there?",
     "budget_exceeded", "spent $2.31 of the goal's $2.00 budget"),
    ("Drop and recreate the {svc} staging database to clear the broken migration.",
     "Recreate the {svc} staging database from scratch to get rid of the bad migration.",
     "tool_denied", "shell_exec is not allowed for agent kind researcher"),
    ("Scrape every page of the {svc} status history and summarise all outages since {year}.",
     "Go through the entire {svc} status page history and summarise every outage since {year}.",
     "runaway_loop", "http_get fetched the same page 5 times in a row"),
    ("Rotate the {svc} API keys for all customers and email them their new keys.",
     "Issue new {svc} API keys to every customer and send the keys out by email.",
     "tool_denied", "send_email needs an approval that was denied"),
    ("Backfill {svc} metrics for the last 365 days from the raw access logs.",
     "Recompute a year of {svc} metrics from the raw access logs.",
     "budget_exceeded", "used 41k of the goal's 40k token budget"),
)

OFF_TOPIC = (
    "What is the guest wifi password at the Berlin office?", "When is the next company offsite?",
    "What is the parental leave policy?", "Who won the internal hackathon last year?",
    "What is the expense limit for team dinners?", "Which meeting room has the broken projector?",
    "How many vacation days carry over into next year?", "What is the dress code for the customer summit?",
)
UNKNOWN_QUESTIONS = (
    "Which port does {svc} listen on?", "Who owns {svc}?", "Where is the runbook for {svc}?",
    "Which database does {svc} use?",
)


@dataclass(frozen=True)
class GoalStream:
    tenant: str
    goal_id: str
    events: list[Envelope]


@dataclass(frozen=True)
class Probe:
    kind: ProbeKind
    tenant: str
    query: str
    expected: frozenset[str] = frozenset()
    stale: frozenset[str] = frozenset()
    subject: str | None = None
    label: str | None = None
    """mistake probes: the failure reason the lesson's label must name."""
    source_goal: str | None = None
    """mistake probes: the goal whose task failed."""
    hard: bool = False
    """no_answer probes: about a service no tenant has (close to real facts), not off-topic."""
    scratchpad: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class DuplicateGroup:
    tenant: str
    texts: frozenset[str]
    writes: int


@dataclass
class Corpus:
    seed: int
    streams: list[GoalStream] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    duplicates: list[DuplicateGroup] = field(default_factory=list)
    texts: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    out_of_order: int = 0
    """Superseded subjects whose older version is written after the newer one."""


@dataclass
class _Fact:
    tenant: str
    service: str
    attribute: Attribute
    values: list[str]
    """Oldest first; the last one is current."""
    texts: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    """value -> the wordings written."""
    writes: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    @property
    def subject(self) -> str:
        return f"{self.service} {self.attribute.name}"


class _Writer:
    """Builds goal streams with ids, timestamps and causation filled in."""

    def __init__(self, rng: random.Random, corpus: Corpus, start: datetime) -> None:
        self.rng = rng
        self.corpus = corpus
        self.start = start
        self.goals = 0
        self.calls = 0

    def at(self, day: float) -> datetime:
        return self.start + timedelta(days=day, minutes=self.rng.randrange(0, 600))

    def goal(self, tenant: str, day: float, text: str) -> tuple[str, datetime, GoalSubmitted]:
        self.goals += 1
        goal_id = f"g{self.goals:04d}"
        ts = self.at(day)
        return goal_id, ts, GoalSubmitted(tenant=tenant, goal_id=goal_id, text=text, ts=ts)

    def tool(self, task: TaskAssigned, ts: datetime, tool: str, arguments: dict[str, Any], output: str) -> list[Envelope]:
        self.calls += 1
        request = ToolCallRequested(
            **task.caused(), ts=ts, call_id=f"c{self.calls:05d}", step_id=f"{task.task_id}:{self.calls}", tool=tool,
            arguments=arguments, agent_kind=task.kind, reply_to=AGENT_TOPIC,
        )
        done = ToolCallCompleted(
            **request.caused(), ts=ts + timedelta(seconds=1), call_id=request.call_id, step_id=request.step_id,
            tool=tool, ok=True, output=output,
        )
        return [request, done]

    def fact_goal(self, tenant: str, day: float, text: str, instruction: str, writes: list[tuple[str, str]], result: str) -> None:
        """A goal whose one task stores facts: (subject as written, fact text) pairs."""
        goal_id, ts, submitted = self.goal(tenant, day, text)
        task = TaskAssigned(**submitted.caused(task_id=f"{goal_id}.r1"), ts=ts, kind="researcher", instruction=instruction, goal_text=text)
        events: list[Envelope] = [submitted, task]
        for i, (subject, fact) in enumerate(writes):
            events += self.tool(task, ts + timedelta(seconds=5 + 3 * i), "remember_fact", {"subject": subject, "fact": fact}, "stored")
        end = ts + timedelta(seconds=10 + 3 * len(writes))
        events.append(TaskCompleted(**task.caused(), ts=end, kind="researcher", result=result, steps=len(writes) + 1))
        events.append(GoalCompleted(**submitted.caused(), ts=end, answer=result, task_results={"r1": result}))
        self.corpus.streams.append(GoalStream(tenant, goal_id, events))


def _spell(rng: random.Random, subject: str) -> str:
    """The same subject as a person might type it: case, spacing and punctuation vary."""
    return rng.choice((
        subject, subject.upper(), subject.title(), f"{subject}.", f"  {subject}  ", subject.replace(" ", "  "),
        f"{subject.capitalize()}:",
    ))


def generate(seed: int = 7, start: datetime = START, services_per_tenant: int = 8, facts_per_service: int = 3) -> Corpus:
    rng = random.Random(seed)
    pads = random.Random(f"{seed}/scratchpads")  # its own stream: scratchpad changes leave the rest as it was
    corpus = Corpus(seed=seed)
    w = _Writer(rng, corpus, start)
    facts: list[_Fact] = []
    taken: dict[str, set[str]] = defaultdict(set)  # subject -> values used by any tenant
    for tenant in TENANTS:
        for service in rng.sample(SERVICES, services_per_tenant):
            for attribute in rng.sample(ATTRIBUTES, facts_per_service):
                fact = _Fact(tenant, service, attribute, [])
                fact.values.append(_fresh_value(rng, attribute, tenant, service, taken))
                facts.append(fact)

    # Who changes: a third of the facts get a newer value (a fifth of those twice), a third of
    # those arrive out of order; another third is written again in other words.
    rng.shuffle(facts)
    third = len(facts) // 3
    changed, repeated = facts[:third], facts[third : 2 * third]
    late = set(map(id, changed[: len(changed) // 3]))
    for fact in changed:
        for _ in range(2 if rng.random() < 0.2 else 1):
            fact.values.append(_fresh_value(rng, fact.attribute, fact.tenant, fact.service, taken))

    # Onboarding: one goal per tenant and service writes its facts' first values (days 0-30).
    by_service: dict[tuple[str, str], list[_Fact]] = defaultdict(list)
    for fact in facts:
        by_service[(fact.tenant, fact.service)].append(fact)
    for (tenant, service), group in sorted(by_service.items()):
        writes = []
        for fact in group:
            if id(fact) in late:
                continue  # its first value comes from the archive import, after the newer one
            writes.append((_spell(rng, fact.subject), _say(rng, fact, fact.values[0])))
        if writes:
            w.fact_goal(
                tenant, rng.uniform(0, 30), f"Onboard {service} into the service catalogue",
                f"Read the onboarding page of {service} and record its key facts.", writes,
                f"Recorded {len(writes)} facts about {service} from its onboarding page.",
            )

    # Paraphrased duplicates (days 30-90): the same value, other words, another goal.
    for fact in repeated:
        for _ in range(rng.choice((1, 1, 2))):
            w.fact_goal(
                fact.tenant, rng.uniform(30, 90), f"Audit the {fact.service} documentation",
                f"Check the {fact.service} docs against what we know and record anything important.",
                [(_spell(rng, fact.subject), _say(rng, fact, fact.values[0]))],
                f"Audited the {fact.service} documentation; one item recorded.",
            )

    # Changes (days 60-150), then the archive imports that bring the older values late.
    archive: list[tuple[_Fact, str, float]] = []
    for fact in changed:
        days = sorted(rng.uniform(60, 150) for _ in fact.values[1:])
        for value, day in zip(fact.values[1:], days, strict=True):
            number = rng.randrange(1000, 9999)
            w.fact_goal(
                fact.tenant, day, f"Apply change request CR-{number} to {fact.service}",
                f"Apply change request CR-{number} to {fact.service} and record the new settings.",
                [(_spell(rng, fact.subject), _say(rng, fact, value))],
                f"Applied CR-{number} to {fact.service}; the new setting is recorded.",
            )
        if id(fact) in late:
            archive.append((fact, fact.values[0], rng.uniform(0, 30)))

    incidents = _incidents(rng, w, corpus)
    failures = _failures(rng, w, corpus)

    corpus.streams.sort(key=lambda s: s.events[0].ts)  # recorded as they happened...
    for fact, value, day in archive:  # ...except the archive imports, which arrive last with old timestamps
        corpus.out_of_order += 1
        w.fact_goal(
            fact.tenant, day, f"Import the 2024 config archive for {fact.service}",
            f"Import the archived configuration notes of {fact.service} into memory.",
            [(_spell(rng, fact.subject), _say(rng, fact, value))],
            f"Imported the archived notes of {fact.service}.",
        )

    # What each probe expects, from what was actually written.
    for fact in facts:
        current = fact.values[-1]
        corpus.texts[fact.tenant] |= {t for texts in fact.texts.values() for t in texts}
        question = rng.choice(fact.attribute.questions).format(svc=fact.service)
        stale = frozenset(t for v in fact.values[:-1] for t in fact.texts[v])
        corpus.probes.append(Probe(
            "conflict" if stale else "recall", fact.tenant, question, frozenset(fact.texts[current]), stale,
            subject=fact.subject, scratchpad=_scratchpad(pads, fact.service),
        ))
        if fact.writes[current] > 1:
            corpus.duplicates.append(DuplicateGroup(fact.tenant, frozenset(fact.texts[current]), fact.writes[current]))
    for tenant, service, texts, count, question in incidents:
        corpus.texts[tenant] |= texts
        corpus.probes.append(Probe("recall", tenant, question, frozenset(texts), scratchpad=_scratchpad(pads, service)))
        if count > 1:
            corpus.duplicates.append(DuplicateGroup(tenant, frozenset(texts), count))
    for tenant, service, goal_id, instruction, paraphrase, reason in failures:
        corpus.texts[tenant].add(instruction)
        corpus.probes.append(Probe(
            "mistake", tenant, paraphrase, frozenset({instruction}), label=reason, source_goal=goal_id,
            scratchpad=_scratchpad(pads, service),
        ))
    for tenant in TENANTS:
        for question in rng.sample(OFF_TOPIC, 4):
            corpus.probes.append(Probe("no_answer", tenant, question, scratchpad=_scratchpad(pads, "the wiki")))
        for service in rng.sample(UNKNOWN_SERVICES, 4):
            question = rng.choice(UNKNOWN_QUESTIONS).format(svc=service)
            corpus.probes.append(Probe("no_answer", tenant, question, hard=True, scratchpad=_scratchpad(pads, service)))
    corpus.streams = [_numbered(s) for s in corpus.streams]
    return corpus


def _numbered(stream: GoalStream) -> GoalStream:
    """Event ids from the goal and position instead of random uuids, so a seed gives equal events."""
    ids: dict[str, str] = {}
    events = []
    for i, event in enumerate(stream.events):
        ids[event.event_id] = f"{stream.tenant}-{stream.goal_id}-{i:03d}"
        causation = ids.get(event.causation_id or "", event.causation_id)
        events.append(event.model_copy(update={"event_id": ids[event.event_id], "causation_id": causation}))
    return GoalStream(stream.tenant, stream.goal_id, events)


def _fresh_value(rng: random.Random, attribute: Attribute, tenant: str, service: str, taken: dict[str, set[str]]) -> str:
    """A value no tenant has used for this subject yet, so every leak and stale hit is visible."""
    subject = f"{service} {attribute.name}"
    for _ in range(500):
        value = attribute.value(rng, tenant, service)
        if value not in taken[subject]:
            taken[subject].add(value)
            return value
    raise ValueError(f"ran out of distinct values for {subject!r}")


def _say(rng: random.Random, fact: _Fact, value: str) -> str:
    text = rng.choice(fact.attribute.statements).format(svc=fact.service, v=value)
    text = text[0].upper() + text[1:]
    fact.texts[value].add(text)
    fact.writes[value] += 1
    return text


def _incidents(rng: random.Random, w: _Writer, corpus: Corpus) -> list[tuple[str, str, set[str], int, str]]:
    """Incident investigations (days 20-140) whose task outcome is the root cause; most are
    written again later by a postmortem in other words, some quoted back by a task (an echo)."""
    found = []
    for tenant in TENANTS:
        for service, (symptom, cause, fix) in zip(rng.sample(SERVICES, 5), rng.sample(INCIDENTS, 5), strict=True):
            n = rng.randrange(1000, 9999)
            fields = {"n": n, "svc": service, "symptom": symptom, "cause": cause, "fix": fix}
            templates = rng.sample(OUTCOME_TEMPLATES, 3)
            first = templates[0].format(**fields)
            texts, writes = {first}, 1
            day = rng.uniform(20, 100)
            _investigation(w, tenant, day, service, symptom, n, first)
            if rng.random() < 0.7:
                again = templates[1].format(**fields)
                texts.add(again)
                writes += 1
                _investigation(w, tenant, day + rng.uniform(3, 20), service, symptom, n, again, postmortem=True)
            if rng.random() < 0.5:
                writes += 1
                question = rng.choice(OUTCOME_QUESTIONS).format(**fields)
                _echo(w, tenant, day + rng.uniform(20, 40), question, first)
            found.append((tenant, service, texts, writes, rng.choice(OUTCOME_QUESTIONS).format(**fields)))
    return found


def _investigation(w: _Writer, tenant: str, day: float, service: str, symptom: str, n: int, result: str, postmortem: bool = False) -> None:
    text = f"Write the postmortem of INC-{n}" if postmortem else f"Investigate the {symptom} on {service} (INC-{n})"
    goal_id, ts, submitted = w.goal(tenant, day, text)
    task = TaskAssigned(
        **submitted.caused(task_id=f"{goal_id}.r1"), ts=ts, kind="researcher", goal_text=text,
        instruction=f"{text}: find the root cause and what fixed it.",
    )
    events: list[Envelope] = [submitted, task]
    events += w.tool(task, ts + timedelta(seconds=4), "http_get", {"url": f"https://status.{tenant}.internal/{service}"}, _log_excerpt(w.rng, service))
    events += w.tool(task, ts + timedelta(seconds=9), "kb_search", {"query": f"{service} {symptom}", "k": 3}, "no matching facts")
    end = ts + timedelta(seconds=15)
    events.append(TaskCompleted(**task.caused(), ts=end, kind="researcher", result=result, steps=3))
    events.append(GoalCompleted(**submitted.caused(), ts=end, answer=result, task_results={"r1": result}))
    w.corpus.streams.append(GoalStream(tenant, goal_id, events))


def _echo(w: _Writer, tenant: str, day: float, question: str, quoted: str) -> None:
    """A task that asks memory, is served the outcome and answers by quoting it."""
    goal_id, ts, submitted = w.goal(tenant, day, question)
    task = TaskAssigned(**submitted.caused(task_id=f"{goal_id}.r1"), ts=ts, kind="researcher", instruction=question, goal_text=question)
    recall = MemoryRecallRequested(**task.caused(), ts=ts + timedelta(seconds=1), request_id=f"{goal_id}.m1", query=question, k=3, reply_to=AGENT_TOPIC)
    done = TaskCompleted(**task.caused(), ts=ts + timedelta(seconds=6), kind="researcher", result=quoted, steps=1)
    answer = GoalCompleted(**submitted.caused(), ts=ts + timedelta(seconds=7), answer=quoted, task_results={"r1": quoted})
    w.corpus.streams.append(GoalStream(tenant, goal_id, [submitted, task, recall, done, answer]))


def _failures(rng: random.Random, w: _Writer, corpus: Corpus) -> list[tuple[str, str, str, str, str, str]]:
    """Tasks that failed (days 10-120); the probe is the same request in other words."""
    found = []
    for tenant in TENANTS:
        for service, (instruction, paraphrase, reason, detail) in zip(rng.sample(SERVICES, 5), rng.sample(FAILURES, 5), strict=True):
            fields = {"svc": service, "region": rng.choice(REGIONS), "year": rng.choice((2022, 2023, 2024))}
            instruction, paraphrase = instruction.format(**fields), paraphrase.format(**fields)
            goal_id, ts, submitted = w.goal(tenant, rng.uniform(10, 120), instruction)
            task = TaskAssigned(**submitted.caused(task_id=f"{goal_id}.r1"), ts=ts, kind="researcher", instruction=instruction, goal_text=instruction)
            events: list[Envelope] = [submitted, task]
            for i in range(rng.randrange(2, 6)):
                events += w.tool(task, ts + timedelta(seconds=5 * i + 3), "http_get", {"url": f"https://ops.{tenant}.internal/{service}/step/{i}"}, _log_excerpt(rng, service))
            end = ts + timedelta(seconds=60)
            events.append(TaskFailed(**task.caused(), ts=end, kind="researcher", reason=reason, detail=detail))
            events.append(GoalFailed(**submitted.caused(), ts=end, reason=reason, detail=detail))
            corpus.streams.append(GoalStream(tenant, goal_id, events))
            found.append((tenant, service, goal_id, instruction, paraphrase, reason))
    return found


def _log_excerpt(rng: random.Random, service: str, lines_at_most: int = 18) -> str:
    lines = []
    for _ in range(rng.randrange(6, lines_at_most)):
        level = rng.choice(("INFO", "INFO", "INFO", "WARN", "ERROR"))
        lines.append(
            f"2025-03-{rng.randrange(1, 28):02d}T{rng.randrange(0, 24):02d}:{rng.randrange(0, 60):02d}:{rng.randrange(0, 60):02d}Z "
            f"{level} {service} pod={service}-{rng.randrange(1000, 9999):x} latency_ms={rng.randrange(3, 2500)} "
            f"status={rng.choice((200, 200, 200, 429, 500, 503))} route=/v{rng.randrange(1, 3)}/{rng.choice(('orders', 'users', 'search', 'health', 'charges'))}"
        )
    return "\n".join(lines)


def _scratchpad(rng: random.Random, service: str) -> tuple[dict[str, Any], ...]:
    """The tool steps a task took before this model call, in OpenAI message format."""
    messages: list[dict[str, Any]] = []
    for step in range(rng.randrange(3, 10)):
        tool, arguments = rng.choice((
            ("http_get", {"url": f"https://status.example.internal/{service.replace(' ', '-')}/{step}"}),
            ("kb_search", {"query": f"{service} {rng.choice(('errors', 'deploys', 'owners', 'config'))}", "k": 5}),
            ("calculator", {"expression": f"{rng.randrange(10, 999)}*{rng.randrange(2, 60)}"}),
        ))
        call_id = f"call_{step}_{rng.randrange(10**6):06d}"
        messages.append({
            "role": "assistant", "content": None,
            "tool_calls": [{"id": call_id, "type": "function", "function": {"name": tool, "arguments": json.dumps(arguments)}}],
        })
        # Replies as the agent keeps them: cut to AGENT_TOOL_OUTPUT_CHARS (4,000) at most.
        output = str(rng.randrange(100, 60_000)) if tool == "calculator" else _log_excerpt(rng, service, 36)[:4_000]
        messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
    return tuple(messages)


FILLER_TEMPLATES = (
    "Deployed {name} v{a}.{b}.{c} to {region}; the canary was healthy after {m} minutes.",
    "The nightly {name} job finished in {m} minutes and processed {k} rows.",
    "Weekly report: {name} used {p}% of its error budget.",
    "{name} listens on port {port}.",
    "The {team} team owns {name}.",
    "{name} stores its data in {db}.",
    "Load test of {name}: p99 {m} ms at {k} requests per second.",
    "Upgraded the {name} base image to debian {a}.{b}; no regressions found.",
)
FILLER_FACTS = frozenset(FILLER_TEMPLATES[3:6])
_SYLLABLES = ("or", "ka", "vel", "tri", "mon", "lux", "zen", "dar", "pol", "sin", "qua", "ber", "nix", "tal", "fen", "gor")


def filler(seed: int, n: int, tenants: tuple[str, ...] = TENANTS) -> list[MemoryRecord]:
    """n distractor memories about services the probes never ask about, spread over the tenants."""
    rng = random.Random(seed * 7919 + n)
    records = []
    for i in range(n):
        name = "".join(rng.choice(_SYLLABLES) for _ in range(3)) + "-" + rng.choice(("svc", "api", "worker", "db", "proxy"))
        template = rng.choice(FILLER_TEMPLATES)
        text = template.format(
            name=name, a=rng.randrange(1, 20), b=rng.randrange(0, 30), c=rng.randrange(0, 99), region=rng.choice(REGIONS),
            m=rng.randrange(2, 400), k=rng.randrange(1_000, 9_000_000), p=rng.randrange(1, 100), port=rng.randrange(3000, 9999),
            team=rng.choice(TEAMS), db=rng.choice(DATABASES),
        )
        kind: MemoryKind = "fact" if template in FILLER_FACTS else "outcome"
        records.append(MemoryRecord(tenant=tenants[i % len(tenants)], kind=kind, text=text, source=f"filler/{i}", quality=0.6))
    return records
