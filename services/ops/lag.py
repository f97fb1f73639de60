"""Consumer lag and its status, decided as Burrow decides it: what `switchboard lag` shows, as pure
functions over commit windows, plus the decoding of `__consumer_offsets` records. The Kafka reading
is in lag_reader.py."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

OFFSETS_TOPIC = "__consumer_offsets"


class LagStatus(Enum):
    """A partition's status over its window of commits. Ordered as Burrow's StatusConstant
    (core/protocol/evaluator.go: OK=1 WARN=2 STOP=4 STALL=5 REWIND=6): a group shows its worst."""

    OK = "OK"
    WARN = "WARN"
    STOP = "STOP"
    STALL = "STALL"
    REWIND = "REWIND"

    @property
    def severity(self) -> int:
        return _SEVERITY[self]


_SEVERITY = {status: rank for rank, status in enumerate(LagStatus)}

STATUS_RULES = {
    LagStatus.OK: "the partition has no lag now, or had none at some commit in the window, or none of "
    "the other rules holds",
    LagStatus.REWIND: "the committed offset went backwards between two commits of the window",
    LagStatus.STOP: "the time since the last commit is longer than the window spans (last commit time "
    "minus first): the consumer stopped committing. A partition with lag and no commit in the history "
    "read (--history) counts as stopped too",
    LagStatus.STALL: "the consumer still commits, but the same offset at every commit of the window",
    LagStatus.WARN: "the offsets move, but the lag never went down from one commit to the next: the "
    "consumer falls behind",
}
"""How each status is decided, in the order the rules are tried; for help texts and the README."""


@dataclass(frozen=True)
class WindowEntry:
    """One commit of a partition's window: the offset, when the broker stored it (epoch ms), and the
    lag at that moment (the partition's end offset then minus this offset)."""

    offset: int
    timestamp_ms: int
    lag: int


def evaluate(window: Sequence[WindowEntry], current_lag: int, now_ms: int) -> LagStatus:
    """The status of a partition from its last commits, oldest first, and its lag now.

    Burrow's calculatePartitionStatus (linkedin/Burrow core/internal/evaluator/caching.go): OK when
    there is no lag now or the lag was zero at any commit of the window (rule 1); otherwise the
    first that holds of REWIND (rule 2), STOP (rule 3), STALL (rule 4), WARN (rule 5); else OK.
    Burrow calls an empty window OK; here an empty window means that the last commit is older than
    all that was read back from __consumer_offsets, so with lag it is STOP (the consumer has not
    committed for that long), and without lag OK.
    """
    if current_lag <= 0 or any(entry.lag == 0 for entry in window):
        return LagStatus.OK
    if not window:
        return LagStatus.STOP
    pairs = list(zip(window, window[1:]))
    if any(later.offset < earlier.offset for earlier, later in pairs):
        return LagStatus.REWIND
    first, last = window[0], window[-1]
    if now_ms - last.timestamp_ms > last.timestamp_ms - first.timestamp_ms:
        return LagStatus.STOP
    if all(later.offset == earlier.offset for earlier, later in pairs):
        return LagStatus.STALL
    if all(later.lag >= earlier.lag for earlier, later in pairs):
        return LagStatus.WARN
    return LagStatus.OK


@dataclass(frozen=True)
class Member:
    """The group member that owns a partition, as DescribeGroups reports it."""

    member_id: str
    client_id: str
    host: str

    def label(self) -> str:
        return f"{self.client_id}@{self.host.lstrip('/')}"


@dataclass(frozen=True)
class PartitionLag:
    """One row of `switchboard lag`: where a group is on one partition, and how that is going."""

    group: str
    topic: str
    partition: int
    committed: int
    end: int
    lag_seconds: float | None
    """Now minus the timestamp of the first record not yet consumed; 0 without lag; None when that
    record could not be read."""
    owner: Member | None
    status: LagStatus
    window: tuple[WindowEntry, ...] = ()

    @property
    def lag(self) -> int:
        return max(0, self.end - self.committed)

    def summary(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "partition": self.partition,
            "committed": self.committed,
            "end": self.end,
            "lag": self.lag,
            "lag_seconds": self.lag_seconds,
            "owner": None if self.owner is None else {
                "member_id": self.owner.member_id, "client_id": self.owner.client_id, "host": self.owner.host,
            },
            "status": self.status.value,
            "window": [{"offset": e.offset, "timestamp_ms": e.timestamp_ms, "lag": e.lag} for e in self.window],
        }


@dataclass(frozen=True)
class GroupLag:
    """A consumer group: its state (Stable, Empty, ...) and a row per partition it has committed on."""

    group: str
    state: str
    partitions: tuple[PartitionLag, ...] = field(default=())

    @property
    def status(self) -> LagStatus:
        """The worst status of its partitions (Burrow folds STOP, STALL and REWIND into ERR for a
        group; here the group keeps the worst partition's name)."""
        return max((p.status for p in self.partitions), key=lambda s: s.severity, default=LagStatus.OK)

    @property
    def lag(self) -> int:
        return sum(p.lag for p in self.partitions)

    def summary(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "state": self.state,
            "status": self.status.value,
            "lag": self.lag,
            "partitions": [p.summary() for p in self.partitions],
        }


def select_groups(names: Iterable[str], namespace: str, prefixes: Sequence[str], all_groups: bool) -> list[str]:
    """The groups to show, sorted: those named by (or starting with) one of `prefixes` when any are
    given; else every group with `all_groups`; else the namespace's groups (`<namespace>.<name>`)."""
    if prefixes:
        chosen = [n for n in names if any(n.startswith(p) for p in prefixes)]
    elif all_groups:
        chosen = list(names)
    else:
        chosen = [n for n in names if n.startswith(f"{namespace}.")]
    return sorted(set(chosen))


# --- __consumer_offsets records -------------------------------------------------------------------
# Kafka's group coordinator writes one record per committed partition. The key is OffsetCommitKey
# (key versions 0 and 1; version 2 is group metadata, and later ones are the new group protocols'
# records), the value OffsetCommitValue versions 0-4 (apache/kafka group-coordinator/src/main/
# resources/common/message/OffsetCommit{Key,Value}.json): offset int64, leaderEpoch int32 (v3+),
# metadata string, commitTimestamp int64, expireTimestamp int64 (v1 only); v4 is the first
# "flexible" version: compact strings and a tagged-field section at the end. Kafka 4.1 writes v4.
# A record without a value (a tombstone) deletes the group's offset for that partition.


@dataclass(frozen=True)
class CommitKey:
    group: str
    topic: str
    partition: int


@dataclass(frozen=True)
class CommitValue:
    offset: int
    timestamp_ms: int


class _Cursor:
    """Reads Kafka's big-endian primitive types from a record's bytes; ValueError when they run out."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        if self.at + size > len(self.data):
            raise ValueError(f"record ends at byte {len(self.data)}, {size} more needed at {self.at}")
        (value,) = struct.unpack_from(fmt, self.data, self.at)
        self.at += size
        return int(value)

    def text(self, length: int) -> str:
        if length < 0:
            return ""  # a null string
        if self.at + length > len(self.data):
            raise ValueError(f"string of {length} bytes runs past the record's end")
        raw = self.data[self.at:self.at + length]
        self.at += length
        return raw.decode()

    def string(self) -> str:
        return self.text(self.take(">h"))

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            byte = self.take(">B")
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift > 28:
                raise ValueError("unsigned varint longer than 5 bytes")

    def compact_string(self) -> str:
        return self.text(self.varint() - 1)


def decode_commit_key(key: bytes) -> CommitKey | None:
    """The group, topic and partition of an offset-commit key; None for the other record types."""
    cursor = _Cursor(key)
    version = cursor.take(">h")
    if version not in (0, 1):
        return None
    return CommitKey(cursor.string(), cursor.string(), cursor.take(">i"))


def decode_commit_value(value: bytes) -> CommitValue:
    """The offset and commit time of an offset-commit value; ValueError for a version this does not know."""
    cursor = _Cursor(value)
    version = cursor.take(">h")
    if not 0 <= version <= 4:
        raise ValueError(f"OffsetCommitValue version {version} is not one of 0-4")
    offset = cursor.take(">q")
    if version >= 3:
        cursor.take(">i")  # leader epoch
    if version >= 4:
        cursor.compact_string()  # metadata
    else:
        cursor.string()
    return CommitValue(offset, cursor.take(">q"))


def offsets_partition(group: str, partitions: int) -> int:
    """The __consumer_offsets partition that holds `group`'s commits: Kafka's
    `Utils.abs(groupId.hashCode()) % numPartitions` (GroupCoordinatorService.partitionFor), with
    Java's String.hashCode over UTF-16 code units and Utils.abs(Integer.MIN_VALUE) == 0."""
    encoded = group.encode("utf-16-be")
    h = 0
    for i in range(0, len(encoded), 2):
        h = (31 * h + int.from_bytes(encoded[i:i + 2], "big")) & 0xFFFFFFFF
    signed = h - (1 << 32) if h >= 1 << 31 else h
    return (0 if signed == -(1 << 31) else abs(signed)) % partitions
