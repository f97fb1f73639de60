"""`switchboard lag` on the real broker: a group that consumed part of a topic shows the right lag per
partition and its owner, turns STALL when it commits the same offsets, STOP when it stops
committing, OK once caught up; also as `--json`, as metrics (`--serve`), and with Kafka unreachable."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from click.testing import Result
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from services.ops.cli import app
from services.ops.lag import GroupLag, LagStatus
from services.ops.lag_cli import refresh_forever
from services.ops.lag_reader import LagReader
from services.runtime.host import Settings
from tests.support.kafka import eventually

PRODUCED = {0: 5, 1: 3, 2: 4}  # records per partition: N = 12
CONSUMED = {0: 5, 1: 1, 2: 2}  # committed offsets: M = 8, so partitions 1 and 2 lag by 2
WINDOW = 5
CLIENT_ID = "lag-test-consumer"


async def switchboard(settings: Settings, *args: str, bootstrap: str | None = None) -> Result:
    env = {
        "SWITCHBOARD_NAMESPACE": settings.platform.namespace,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap or settings.kafka.bootstrap_servers or "",
        "COLUMNS": "250",
    }
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env=env)


@asynccontextmanager
async def member(settings: Settings, topic: str, group: str) -> AsyncIterator[AIOKafkaConsumer]:
    """A member of `group` that owns every partition of `topic`; it commits only what a test tells it to."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=settings.kafka.require(), group_id=group, client_id=CLIENT_ID,
        enable_auto_commit=False, auto_offset_reset="earliest", session_timeout_ms=6_000, heartbeat_interval_ms=1_000,
    )
    await consumer.start()
    try:
        await eventually(lambda: len(consumer.assignment()) == len(PRODUCED), timeout=30)
        yield consumer
    finally:
        await consumer.stop()


async def commit_every(consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int], seconds: float) -> None:
    """A consumer that is stuck: it keeps committing the same offsets."""
    while True:
        await consumer.commit(offsets)
        await asyncio.sleep(seconds)


def by_partition(groups: list[GroupLag]) -> dict[int, Any]:
    [group] = groups
    return {p.partition: p for p in group.partitions}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


async def test_lag_per_partition_then_stall_stop_and_ok(settings: Settings) -> None:
    ns = settings.platform.namespace
    topic, group = f"{ns}.lagged", f"{ns}.lag-probe"
    tps = {p: TopicPartition(topic, p) for p in PRODUCED}
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.require())
    await admin.start()
    await admin.create_topics([NewTopic(topic, num_partitions=len(PRODUCED), replication_factor=1)])
    try:
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.require(), enable_idempotence=True)
        await producer.start()
        try:
            for partition, count in PRODUCED.items():
                for i in range(count):
                    await producer.send_and_wait(topic, f"r{i}".encode(), key=f"k{partition}-{i}".encode(), partition=partition)
        finally:
            await producer.stop()

        async with LagReader(settings.kafka, window=WINDOW) as reader:
            async def snapshot() -> dict[int, Any]:
                return by_partition(await reader.snapshot(lambda names: [n for n in names if n == group]))

            async with member(settings, topic, group) as consumer:
                await consumer.commit({tps[p]: offset for p, offset in CONSUMED.items()})
                rows = await snapshot()
                assert {p: (r.committed, r.end, r.lag) for p, r in rows.items()} == {0: (5, 5, 0), 1: (1, 3, 2), 2: (2, 4, 2)}
                assert sum(r.lag for r in rows.values()) == sum(PRODUCED.values()) - sum(CONSUMED.values())
                assert {r.owner.client_id for r in rows.values() if r.owner} == {CLIENT_ID} and all(r.owner for r in rows.values())
                assert rows[0].lag_seconds == 0 and rows[1].lag_seconds is not None and rows[1].lag_seconds > 0
                assert rows[0].status is LagStatus.OK

                result = await switchboard(settings, "lag", "--json", "--window", str(WINDOW))
                assert result.exit_code == 0, result.output
                [listed] = json.loads(result.stdout)["groups"]
                assert listed["group"] == group and listed["lag"] == 4
                assert {p["partition"]: (p["committed"], p["end"], p["lag"]) for p in listed["partitions"]} == {
                    0: (5, 5, 0), 1: (1, 3, 2), 2: (2, 4, 2),
                }
                assert {p["owner"]["client_id"] for p in listed["partitions"]} == {CLIENT_ID}

                stuck = asyncio.create_task(commit_every(consumer, {tps[p]: o for p, o in CONSUMED.items()}, 0.2))
                try:
                    async def stalled() -> bool:
                        rows = await snapshot()
                        return {p: r.status for p, r in rows.items()} == {0: LagStatus.OK, 1: LagStatus.STALL, 2: LagStatus.STALL}

                    await eventually(stalled, timeout=30)

                    port = free_port()
                    async with LagReader(settings.kafka, window=WINDOW) as exporter_reader:
                        exporter = asyncio.create_task(refresh_forever(
                            exporter_reader, lambda names: [n for n in names if n == group], 0.2, False, port, "127.0.0.1", ns, False,
                        ))
                        try:
                            where = (("group", group), ("partition", "1"), ("topic", topic))

                            async def exported() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
                                with suppress(OSError):
                                    samples = await asyncio.to_thread(scrape, port)
                                    if ("switchboard_consumer_lag_offsets", where) in samples:
                                        return samples
                                return None

                            samples = await eventually(exported, timeout=30)
                        finally:
                            exporter.cancel()
                            with suppress(asyncio.CancelledError):
                                await exporter
                    assert samples[("switchboard_consumer_lag_offsets", where)] == 2
                    assert samples[("switchboard_consumer_lag_seconds", where)] > 0
                    shown = {dict(labels)["status"]: v for (name, labels), v in samples.items()
                             if name == "switchboard_consumer_status" and dict(labels)["partition"] == "1"}
                    assert shown == {"OK": 0, "WARN": 0, "STOP": 0, "STALL": 1, "REWIND": 0}
                finally:
                    stuck.cancel()
                    with suppress(asyncio.CancelledError):
                        await stuck

            # The member has left and nothing commits any more: the lagging partitions stop.
            async def stopped() -> bool:
                rows = await snapshot()
                return (
                    {p: r.status for p, r in rows.items()} == {0: LagStatus.OK, 1: LagStatus.STOP, 2: LagStatus.STOP}
                    and all(r.owner is None for r in rows.values())
                )

            await eventually(stopped, timeout=30)

            async with member(settings, topic, group) as consumer:
                await consumer.commit({tps[p]: count for p, count in PRODUCED.items()})
            rows = await snapshot()
            assert {p: (r.lag, r.status) for p, r in rows.items()} == {p: (0, LagStatus.OK) for p in PRODUCED}
    finally:
        await admin.delete_topics([topic])
        await admin.close()


async def test_an_unreachable_broker_is_a_message_and_exit_code_2(settings: Settings) -> None:
    result = await switchboard(settings, "lag", bootstrap="127.0.0.1:1")
    assert result.exit_code == 2
    assert "cannot reach Kafka" in result.output
    assert "Traceback" not in result.output
