"""Reads what `switchboard lag` needs from Kafka: the consumer groups, their committed offsets and
members, the partitions' end offsets, and each partition's recent commits from __consumer_offsets
(read like Burrow does, outside any group), then decides the rows with services/ops/lag.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment

from services.ops.lag import (
    OFFSETS_TOPIC,
    CommitKey,
    GroupLag,
    Member,
    PartitionLag,
    WindowEntry,
    decode_commit_key,
    decode_commit_value,
    evaluate,
    offsets_partition,
)
from services.runtime.settings import KafkaSettings

log = logging.getLogger(__name__)

GroupSelector = Callable[[list[str]], list[str]]

_FETCH_TIMEOUT_S = 10.0


class CommitHistory:
    """The last `window` commits (offset, broker time) of every group partition read so far from
    __consumer_offsets. It reads only the offsets-topic partitions that hold the groups asked for;
    the first time it reads one, it starts `history` records back from that partition's end, then
    goes on from where it stopped (so `--watch` and `--serve` read only what is new)."""

    def __init__(self, consumer: AIOKafkaConsumer, window: int, history: int) -> None:
        self._consumer = consumer
        self._window = window
        self._history = history
        self._commits: dict[CommitKey, deque[tuple[int, int]]] = {}
        self._positions: dict[TopicPartition, int] = {}
        self.undecodable = 0

    def commits(self, key: CommitKey) -> list[tuple[int, int]]:
        return list(self._commits.get(key, ()))

    async def catch_up(self, partitions: Sequence[TopicPartition]) -> None:
        """Reads the given __consumer_offsets partitions up to their ends as of now."""
        ends = await self._consumer.end_offsets(list(partitions))
        new = [tp for tp in partitions if tp not in self._positions]
        if new:
            starts = await self._consumer.beginning_offsets(new)
            for tp in new:
                self._positions[tp] = max(starts[tp], ends[tp] - self._history)
        todo = {tp: end for tp, end in ends.items() if self._positions[tp] < end}
        if not todo:
            return
        self._consumer.assign(list(todo))
        for tp in todo:
            self._consumer.seek(tp, self._positions[tp])
        async with asyncio.timeout(_FETCH_TIMEOUT_S * 3):
            while todo:
                batches = await self._consumer.getmany(*todo, timeout_ms=500)
                for tp, records in batches.items():
                    for record in records:
                        if record.offset < todo.get(tp, 0):
                            self._add(record.key, record.value)
                for tp in list(todo):
                    self._positions[tp] = await self._consumer.position(tp)
                    if self._positions[tp] >= todo[tp]:
                        del todo[tp]

    def _add(self, raw_key: bytes | None, raw_value: bytes | None) -> None:
        try:
            key = decode_commit_key(raw_key or b"")
            if key is None:
                return
            if raw_value is None:  # the group's offset was deleted
                self._commits.pop(key, None)
                return
            value = decode_commit_value(raw_value)
        except (ValueError, UnicodeDecodeError) as exc:
            self.undecodable += 1
            log.warning("skipped a %s record that does not decode: %s", OFFSETS_TOPIC, exc)
            return
        self._commits.setdefault(key, deque(maxlen=self._window)).append((value.offset, value.timestamp_ms))


class LagReader:
    """One admin client and two plain consumers (no group: they move no one's offsets), kept open
    across snapshots so that a live view reads only what changed. Use as an async context manager."""

    def __init__(self, kafka: KafkaSettings, window: int = 10, history: int = 10_000) -> None:
        self._servers = kafka.require()
        self._window = window
        self._history_records = history
        self._stack = contextlib.AsyncExitStack()
        self._end_at: dict[tuple[TopicPartition, int], int] = {}
        self._record_ts: dict[tuple[TopicPartition, int], int] = {}

    async def __aenter__(self) -> LagReader:
        # Each client is made only once the one before it is up, so a broker that cannot be reached
        # leaves nothing unclosed behind.
        async with contextlib.AsyncExitStack() as stack:
            self._admin = AIOKafkaAdminClient(bootstrap_servers=self._servers)
            await self._admin.start()
            stack.push_async_callback(self._admin.close)
            self._offsets_log = AIOKafkaConsumer(
                bootstrap_servers=self._servers, group_id=None, enable_auto_commit=False, exclude_internal_topics=False,
            )
            await self._offsets_log.start()
            stack.push_async_callback(self._offsets_log.stop)
            self._data = AIOKafkaConsumer(
                bootstrap_servers=self._servers, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
            )
            await self._data.start()
            stack.push_async_callback(self._data.stop)
            self._stack = stack.pop_all()
        self.history = CommitHistory(self._offsets_log, self._window, self._history_records)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def snapshot(self, select: GroupSelector) -> list[GroupLag]:
        """Every selected group with a row per partition it has a committed offset on."""
        names = [str(g[0]) for g in await self._admin.list_consumer_groups()]
        groups = select(names)
        if not groups:
            return []
        described = await self._describe(groups)
        existing = set(await self._admin.list_topics())
        committed: dict[str, dict[TopicPartition, int]] = {}
        for group in groups:
            offsets = await self._admin.list_consumer_group_offsets(group)
            committed[group] = {tp: o.offset for tp, o in offsets.items() if o.offset >= 0 and tp.topic in existing}
        partitions = sorted({tp for offsets in committed.values() for tp in offsets})
        ends: dict[TopicPartition, int] = await self._data.end_offsets(partitions) if partitions else {}
        lagging = {(tp, offset) for offsets in committed.values() for tp, offset in offsets.items() if offset < ends[tp]}
        await self._read_first_unconsumed(lagging)
        await self.history.catch_up(await self._offsets_partitions(groups))
        now_ms = int(time.time() * 1000)  # after the commits were read: STOP compares it with the last one

        windows = {
            (group, tp): self.history.commits(CommitKey(group, tp.topic, tp.partition))
            for group, offsets in committed.items() for tp in offsets
        }
        in_windows = {(tp, ts) for (_, tp), commits in windows.items() for _, ts in commits}
        await self._look_up_ends(in_windows)
        result = []
        for group in groups:
            state, owners = described.get(group, ("Dead", {}))
            rows = []
            for tp, offset in sorted(committed[group].items()):
                window = tuple(
                    WindowEntry(o, ts, max(0, self._end_at.get((tp, ts), ends[tp]) - o))
                    for o, ts in windows[(group, tp)]
                )
                lag = max(0, ends[tp] - offset)
                first_ts = self._record_ts.get((tp, offset))
                lag_s = 0.0 if lag == 0 else None if first_ts is None else max(0.0, (now_ms - first_ts) / 1000)
                rows.append(PartitionLag(
                    group, tp.topic, tp.partition, offset, ends[tp], lag_s, owners.get(tp),
                    evaluate(window, lag, now_ms), window,
                ))
            result.append(GroupLag(group, state, tuple(rows)))
        # Forget what no window or committed offset refers to any more, so a long --serve stays small.
        self._end_at = {k: v for k, v in self._end_at.items() if k in in_windows}
        self._record_ts = {k: v for k, v in self._record_ts.items() if k in lagging}
        return result

    async def _describe(self, groups: list[str]) -> dict[str, tuple[str, dict[TopicPartition, Member]]]:
        """Each group's state, and the member that owns each partition (from the assignments of a
        group that uses the consumer protocol; none while it rebalances)."""
        found: dict[str, tuple[str, dict[TopicPartition, Member]]] = {}
        # One group a request: aiokafka 0.14 sends DescribeGroups v3 but decodes the answer as v2,
        # which lacks each group's trailing authorized_operations, so a second group misreads.
        for group in groups:
            [response] = await self._admin.describe_consumer_groups([group])
            for description in response.to_object()["groups"]:
                owners: dict[TopicPartition, Member] = {}
                if description["protocol_type"] == "consumer":
                    for m in description["members"]:
                        member = Member(m["member_id"], m["client_id"], m["client_host"])
                        for tp in _assigned(m["member_assignment"]):
                            owners[tp] = member
                found[description["group"]] = (description["state"], owners)
        return found

    async def _offsets_partitions(self, groups: list[str]) -> list[TopicPartition]:
        [described] = await self._admin.describe_topics([OFFSETS_TOPIC])
        count = len(described["partitions"])
        return sorted({TopicPartition(OFFSETS_TOPIC, offsets_partition(g, count)) for g in groups})

    async def _look_up_ends(self, wanted: set[tuple[TopicPartition, int]]) -> None:
        """A partition's end offset at each commit time: the first offset with a later record
        timestamp (ListOffsets by time), or today's end when no record is later. Timestamps are the
        producers' (CreateTime) unless the topic uses LogAppendTime, so this is an estimate."""
        todo: dict[TopicPartition, list[int]] = {}
        for tp, ts in wanted - set(self._end_at):
            todo.setdefault(tp, []).append(ts)
        while todo:
            round_ = {tp: times.pop() for tp, times in todo.items()}
            todo = {tp: times for tp, times in todo.items() if times}
            found = await self._data.offsets_for_times({tp: ts + 1 for tp, ts in round_.items()})
            for tp, ts in round_.items():
                hit = found.get(tp)
                if hit is not None:  # a later record exists, so this stays true: keep it
                    self._end_at[(tp, ts)] = hit.offset

    async def _read_first_unconsumed(self, wanted: set[tuple[TopicPartition, int]]) -> None:
        """The timestamp of the record at each committed offset (or the first one after it, when
        retention removed it), for the lag in seconds. Records do not change, so it is kept."""
        pending: dict[TopicPartition, list[int]] = {}
        for tp, offset in sorted(wanted - set(self._record_ts)):
            pending.setdefault(tp, []).append(offset)
        while pending:  # one offset per partition at a time: groups may sit at different offsets of one
            todo = {tp: offsets.pop() for tp, offsets in pending.items()}
            pending = {tp: offsets for tp, offsets in pending.items() if offsets}
            self._data.assign(list(todo))
            for tp, offset in todo.items():
                self._data.seek(tp, offset)
            try:
                async with asyncio.timeout(_FETCH_TIMEOUT_S):
                    while todo:
                        batches = await self._data.getmany(*todo, timeout_ms=500)
                        for tp, records in batches.items():
                            if records and tp in todo:
                                self._record_ts[(tp, todo.pop(tp))] = records[0].timestamp
            except TimeoutError:
                log.warning("could not read the first unconsumed record of %d partitions; their lag in seconds is unknown", len(todo))


def _assigned(raw: Any) -> list[TopicPartition]:
    if not raw:
        return []
    try:
        partitions: list[TopicPartition] = ConsumerProtocolMemberAssignment.decode(bytes(raw)).partitions()
        return partitions
    except Exception as exc:  # a custom assignor's format: the owner stays unknown
        log.warning("cannot decode a member assignment: %s", exc)
        return []
