"""`switchboard lag`'s decisions without a broker: Burrow's status rules over commit windows, the
group roll-up, which groups are shown, the __consumer_offsets record formats, and the exporter."""

from __future__ import annotations

import struct

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from services.ops.lag import (
    CommitKey,
    CommitValue,
    GroupLag,
    LagStatus,
    Member,
    PartitionLag,
    WindowEntry,
    decode_commit_key,
    decode_commit_value,
    evaluate,
    offsets_partition,
    select_groups,
)
from services.ops.lag_cli import LagCollector, lag_view

NOW = 1_000_000


def commits(*entries: tuple[int, int, int]) -> list[WindowEntry]:
    """(offset, seconds before NOW, lag) per commit, oldest first."""
    return [WindowEntry(offset, NOW - ago * 1000, lag) for offset, ago, lag in entries]


# --- Burrow's rules ----------------------------------------------------------------------------


def test_a_partition_without_lag_now_is_ok_whatever_its_window_shows() -> None:
    rewound_and_stopped = commits((50, 600, 9), (10, 500, 9))
    assert evaluate(rewound_and_stopped, current_lag=0, now_ms=NOW) is LagStatus.OK


def test_zero_lag_at_any_commit_of_the_window_makes_it_ok() -> None:
    stopped_long_ago = commits((10, 600, 5), (20, 590, 0), (20, 580, 3))
    assert evaluate(stopped_long_ago, current_lag=3, now_ms=NOW) is LagStatus.OK


def test_an_offset_that_goes_backwards_is_a_rewind_even_when_commits_also_stopped() -> None:
    window = commits((30, 600, 5), (10, 590, 25), (12, 580, 23))
    assert evaluate(window, current_lag=23, now_ms=NOW) is LagStatus.REWIND


def test_no_commit_for_longer_than_the_window_spans_is_a_stop() -> None:
    window = commits((10, 40, 5), (20, 30, 6), (30, 20, 7))  # spans 20 s; the last one is 20.001 s old
    assert evaluate(window, current_lag=7, now_ms=NOW + 1) is LagStatus.STOP
    assert evaluate(window, current_lag=7, now_ms=NOW) is LagStatus.WARN  # exactly the span: not yet


def test_committing_the_same_offset_with_lag_is_a_stall() -> None:
    window = commits((10, 3, 4), (10, 2, 4), (10, 1, 4))
    assert evaluate(window, current_lag=4, now_ms=NOW) is LagStatus.STALL


def test_a_consumer_that_stops_committing_its_stalled_offset_is_stop_not_stall() -> None:
    window = commits((10, 30, 4), (10, 29, 4), (10, 28, 4))  # spans 2 s, last commit 28 s ago
    assert evaluate(window, current_lag=4, now_ms=NOW) is LagStatus.STOP


def test_moving_offsets_whose_lag_never_goes_down_is_a_warning() -> None:
    window = commits((10, 3, 5), (20, 2, 5), (30, 1, 8))
    assert evaluate(window, current_lag=8, now_ms=NOW) is LagStatus.WARN


def test_moving_offsets_whose_lag_went_down_once_is_ok() -> None:
    window = commits((10, 3, 5), (20, 2, 4), (30, 1, 8))
    assert evaluate(window, current_lag=8, now_ms=NOW) is LagStatus.OK


def test_a_single_commit_with_lag_is_a_stop_once_any_time_passed_as_in_burrow() -> None:
    # A window of one spans 0 ms, so Burrow's rule 3 holds as soon as the clock moves.
    [only] = commits((10, 0, 4))
    assert evaluate([only], current_lag=4, now_ms=NOW) is LagStatus.STALL
    assert evaluate([only], current_lag=4, now_ms=NOW + 1) is LagStatus.STOP


def test_no_commit_read_back_is_stop_with_lag_and_ok_without() -> None:
    assert evaluate([], current_lag=3, now_ms=NOW) is LagStatus.STOP
    assert evaluate([], current_lag=0, now_ms=NOW) is LagStatus.OK


# --- groups ------------------------------------------------------------------------------------


def row(partition: int, status: LagStatus, committed: int = 5, end: int = 9) -> PartitionLag:
    owner = Member("m-1", "worker-1", "/10.0.0.7")
    return PartitionLag("sb.tools", "sb.tools", partition, committed, end, 2.5, owner, status, commits((committed, 1, end - committed)))


def test_a_group_shows_its_worst_partition_and_its_total_lag() -> None:
    group = GroupLag("sb.tools", "Stable", (row(0, LagStatus.OK, 9), row(1, LagStatus.STALL), row(2, LagStatus.WARN, 0, 10)))
    assert group.status is LagStatus.STALL
    assert group.lag == 0 + 4 + 10
    assert GroupLag("sb.idle", "Empty").status is LagStatus.OK


def test_the_status_order_is_burrows() -> None:
    assert sorted(LagStatus, key=lambda s: s.severity) == [
        LagStatus.OK, LagStatus.WARN, LagStatus.STOP, LagStatus.STALL, LagStatus.REWIND,
    ]


def test_the_json_summary_has_every_column() -> None:
    summary = GroupLag("sb.tools", "Stable", (row(1, LagStatus.STOP),)).summary()
    assert summary["status"] == "STOP" and summary["lag"] == 4
    [p] = summary["partitions"]
    assert (p["topic"], p["partition"], p["committed"], p["end"], p["lag"], p["lag_seconds"], p["status"]) == (
        "sb.tools", 1, 5, 9, 4, 2.5, "STOP",
    )
    assert p["owner"] == {"member_id": "m-1", "client_id": "worker-1", "host": "/10.0.0.7"}
    assert p["window"] == [{"offset": 5, "timestamp_ms": NOW - 1000, "lag": 4}]


def test_groups_of_the_namespace_by_default_else_by_prefix_or_all() -> None:
    names = ["sb.tools", "sb.agent.writer", "sbx.tools", "other", "sb"]
    assert select_groups(names, "sb", [], all_groups=False) == ["sb.agent.writer", "sb.tools"]
    assert select_groups(names, "sb", ["sb.agent", "other"], all_groups=False) == ["other", "sb.agent.writer"]
    assert select_groups(names, "sb", [], all_groups=True) == sorted(names)


# --- __consumer_offsets records ----------------------------------------------------------------


def string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">h", len(raw)) + raw


def key(version: int, group: str, topic: str, partition: int) -> bytes:
    return struct.pack(">h", version) + string(group) + string(topic) + struct.pack(">i", partition)


@pytest.mark.parametrize("version", [0, 1])
def test_offset_commit_keys_decode(version: int) -> None:
    assert decode_commit_key(key(version, "sb.tools", "sb.tools.retry", 7)) == CommitKey("sb.tools", "sb.tools.retry", 7)


def test_group_metadata_keys_are_not_commits() -> None:
    assert decode_commit_key(struct.pack(">h", 2) + string("sb.tools")) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (struct.pack(">hq", 0, 42) + string("meta") + struct.pack(">q", 1_700_000_000_123), CommitValue(42, 1_700_000_000_123)),
        (struct.pack(">hq", 1, 42) + string("") + struct.pack(">qq", 1_700_000_000_123, 1_700_086_400_123), CommitValue(42, 1_700_000_000_123)),
        (struct.pack(">hq", 2, 42) + string("m") + struct.pack(">q", 1_700_000_000_123), CommitValue(42, 1_700_000_000_123)),
        (struct.pack(">hqi", 3, 42, 5) + string("") + struct.pack(">q", 1_700_000_000_123), CommitValue(42, 1_700_000_000_123)),
        # v4 (flexible): compact string (length + 1 as an unsigned varint), then an empty tagged-field section
        (struct.pack(">hqi", 4, 42, -1) + b"\x04abc" + struct.pack(">q", 1_700_000_000_123) + b"\x00", CommitValue(42, 1_700_000_000_123)),
    ],
    ids=["v0", "v1", "v2", "v3", "v4"],
)
def test_offset_commit_values_decode_in_every_version(value: bytes, expected: CommitValue) -> None:
    assert decode_commit_value(value) == expected


def test_a_record_kafka_4_1_wrote_decodes() -> None:
    # Read back from the local broker after committing offset 2 of probe-ad80c6/0 for group probe-g-b5e2d7.
    raw_key = bytes.fromhex("0001000e70726f62652d672d623565326437000c70726f62652d61643830633600000000")
    raw_value = bytes.fromhex("00040000000000000002ffffffff01000001a1fdde9f9d00")
    assert decode_commit_key(raw_key) == CommitKey("probe-g-b5e2d7", "probe-ad80c6", 0)
    assert decode_commit_value(raw_value) == CommitValue(2, 0x1A1FDDE9F9D)
    assert offsets_partition("probe-g-b5e2d7", 10) == 4  # the __consumer_offsets partition it was on


def test_unknown_and_truncated_values_are_refused() -> None:
    with pytest.raises(ValueError, match="version 5"):
        decode_commit_value(struct.pack(">hq", 5, 42))
    with pytest.raises(ValueError, match="more needed"):
        decode_commit_value(struct.pack(">hq", 0, 42) + string("meta"))
    with pytest.raises(ValueError, match="past the record"):
        decode_commit_key(struct.pack(">hh", 1, 50) + b"short")


def test_the_offsets_partition_is_javas_string_hash() -> None:
    assert offsets_partition("hello", 1_000_000_000) == 99_162_322  # "hello".hashCode()
    assert offsets_partition("polygenelubricants", 50) == 0  # hashCode() is Integer.MIN_VALUE; Utils.abs gives 0
    assert offsets_partition("é", 1000) == 233  # one UTF-16 code unit, 0xE9


# --- what the user sees ------------------------------------------------------------------------


def test_the_exporter_has_lag_in_offsets_and_seconds_and_one_status_set() -> None:
    collector = LagCollector()
    registry = CollectorRegistry()
    registry.register(collector)
    collector.groups = [GroupLag("sb.tools", "Stable", (row(1, LagStatus.STALL),))]
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }
    where = (("group", "sb.tools"), ("partition", "1"), ("topic", "sb.tools"))
    assert samples[("switchboard_consumer_lag_offsets", where)] == 4
    assert samples[("switchboard_consumer_lag_seconds", where)] == 2.5
    status = {dict(labels)["status"]: value for (name, labels), value in samples.items() if name == "switchboard_consumer_status"}
    assert status == {"OK": 0, "WARN": 0, "STOP": 0, "STALL": 1, "REWIND": 0}


def test_the_table_shows_the_owner_the_status_and_the_group_roll_up() -> None:
    console = Console(width=200, record=True)
    console.print(lag_view([GroupLag("sb.tools", "Stable", (row(1, LagStatus.STOP),))], "sb", all_groups=False))
    text = console.export_text()
    assert "sb.tools  STOP  Stable, lag 4" in text
    assert "worker-1@10.0.0.7" in text
    console.print(lag_view([], "sb", all_groups=False))
    assert "no consumer groups in namespace sb (--all-groups for every group)" in console.export_text()
