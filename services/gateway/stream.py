"""Following a goal's episodic record (its Redis stream) for the gateway: server-sent event frames
that resume after a Last-Event-ID with no gap and no repeat, and waiting for one answer in it.

The memory service's recorder appends every event of a goal to the stream at least once, so an
event may be there twice; a client still gets each event once, across reconnects too.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from redis.asyncio import Redis

from memory.timeline import TimelineEntry
from schemas.events import decode_event, goal_end
from services.runtime.errors import SwitchboardError

log = logging.getLogger("switchboard.gateway")

_STREAM_ID = re.compile(r"^(\d{1,20})-(\d{1,20})$")
_MAX_PART = 2**64 - 1
FIRST = "0-0"
"""Before any entry: XREAD from here reads the stream from its start."""
PAGE = 200
"""Entries read per call when scanning a record."""

LLM_CONTENT = ("messages", "response")
"""What an `llm.call_recorded` frame leaves out: the prompt and the completion. Tokens, cost,
model, agent, step and cache figures stay."""
OUTCOMES = frozenset({"goal.completed", "goal.failed"})


class InvalidLastEventId(SwitchboardError, ValueError):
    """A Last-Event-ID that no event of this gateway carried (its ids are Redis stream ids)."""


def parse_last_event_id(value: str | None) -> str | None:
    """The stream id to resume after, or None to start from the first event. Empty counts as absent
    (an EventSource that has seen no id sends none)."""
    if value is None or not value.strip():
        return None
    match = _STREAM_ID.match(value.strip())
    if not match or any(int(part) > _MAX_PART for part in match.groups()):
        shown = value if len(value) <= 64 else value[:64] + "..."
        raise InvalidLastEventId(
            f"Last-Event-ID {shown!r} is not an event id of this stream: ids look like "
            f"'1718000000000-0' (as the `id:` field of each event gave them)"
        )
    return f"{int(match.group(1))}-{int(match.group(2))}"


def frame_data(event_type: str, payload: bytes) -> dict[str, Any]:
    """The event as a client sees it: the recorded JSON, without model message content."""
    data = cast(dict[str, Any], json.loads(payload))
    if event_type == "llm.call_recorded":
        for name in LLM_CONTENT:
            data.pop(name, None)
    return data


def ends_goal(event_type: str, payload: bytes) -> bool:
    """True for the last event a goal's stream needs: what schemas.events.goal_end says ends it
    (completed, failed or cancelled). Only goal-level events are decoded to ask."""
    if not event_type.startswith("goal."):
        return False
    try:
        return goal_end(decode_event(payload)) is not None
    except ValueError:  # pydantic's ValidationError is one
        return False


@dataclass
class SeenEvents:
    """The event ids already delivered on one stream; the recorder may have stored one twice."""

    ids: set[str] = field(default_factory=set)

    def first_time(self, event_id: str) -> bool:
        if event_id in self.ids:
            return False
        self.ids.add(event_id)
        return True


@dataclass(frozen=True)
class Frame:
    """One server-sent event: `id:` the stream entry id, `event:` the event type, `data:` JSON."""

    id: str
    event: str
    data: dict[str, Any]
    ends: bool = False
    """The goal's last event: the stream ends after it."""

    @property
    def data_json(self) -> str:
        return json.dumps(self.data, separators=(",", ":"), ensure_ascii=False)


@dataclass
class Resume:
    """Where a (re)connected client's stream starts."""

    cursor: str = FIRST
    """Entries after this one are new to the client."""
    seen: SeenEvents = field(default_factory=SeenEvents)
    ended: bool = False
    """The client has had the goal's last event already."""


def entries(rows: Iterable[tuple[bytes | str, dict[bytes, bytes]]]) -> list[TimelineEntry]:
    return [
        TimelineEntry(_text(entry_id), _text(fields[b"event_type"]), _text(fields[b"event_id"]), fields[b"payload"])
        for entry_id, fields in rows
    ]


def resume_from(prefix: Iterable[TimelineEntry], last_id: str | None) -> Resume:
    """What a client that has had every entry up to `last_id` (the entries in `prefix`) has seen."""
    resume = Resume(cursor=last_id or FIRST)
    for entry in prefix:
        if resume.seen.first_time(entry.event_id) and ends_goal(entry.event_type, entry.payload):
            resume.ended = True
    return resume


def frames(batch: Iterable[TimelineEntry], seen: SeenEvents) -> Iterable[Frame]:
    """The batch's new events as frames, in stream order: repeats of an event id are dropped."""
    for entry in batch:
        if not seen.first_time(entry.event_id):
            continue
        try:
            data = frame_data(entry.event_type, entry.payload)
        except ValueError:
            log.warning("skipped entry %s of a goal record: its payload is not JSON", entry.entry_id)
            continue
        yield Frame(entry.entry_id, entry.event_type, data, ends_goal(entry.event_type, entry.payload))


# ---- Redis ------------------------------------------------------------------------------------


async def read_through(redis: Redis, key: str, last_id: str) -> list[TimelineEntry]:
    """Every entry of the stream up to and including `last_id`, in order."""
    found: list[TimelineEntry] = []
    start = "-"
    while True:
        # redis-py types stream rows loosely; with decode_responses off they are bytes.
        rows = cast(list[tuple[bytes, dict[bytes, bytes]]], await redis.xrange(key, start, last_id, count=PAGE))
        found += entries(rows)
        if len(rows) < PAGE:
            return found
        start = f"({found[-1].entry_id}"  # exclusive: the next page starts after the last entry read


async def last_entry_id(redis: Redis, key: str) -> str:
    """The id of the stream's newest entry (FIRST when it has none): what comes later is new."""
    rows = cast(list[tuple[bytes, dict[bytes, bytes]]], await redis.xrevrange(key, "+", "-", count=1))
    return _text(rows[0][0]) if rows else FIRST


async def newest_first(redis: Redis, key: str, wanted: Callable[[TimelineEntry], bool]) -> TimelineEntry | None:
    """The newest entry that is `wanted`, reading the stream backwards a page at a time."""
    end = "+"
    while True:
        rows = cast(list[tuple[bytes, dict[bytes, bytes]]], await redis.xrevrange(key, end, "-", count=PAGE))
        page = entries(rows)
        for entry in page:
            if wanted(entry):
                return entry
        if len(page) < PAGE:
            return None
        end = f"({page[-1].entry_id}"


async def follow(redis: Redis, key: str, cursor: str, block_ms: int) -> AsyncIterator[list[TimelineEntry]]:
    """Batches of entries after `cursor`, as they are appended; blocks in XREAD while none come."""
    while True:
        reply = await redis.xread({key: cursor}, count=PAGE, block=block_ms)
        batch = entries(_rows(reply))
        if batch:
            cursor = batch[-1].entry_id
            yield batch


def _rows(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """XREAD's rows of its one stream; RESP2 answers a list of [key, rows], RESP3 a map."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return [row for rows in reply.values() for row in (rows[0] if rows and isinstance(rows[0], list) else rows)]
    return [row for _key, rows in reply for row in rows]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
