"""A consumer group member that works on many messages at once without giving up safe commits.

- Up to `max_in_flight` messages are processed concurrently, whatever the partition count.
- Messages with the same key (on the same partition) are processed strictly in order.
- A partition's offset is committed only past messages that are done, together with every
  earlier message of that partition: a crash or rebalance can redeliver work, never skip it.
- When `max_in_flight` messages are in flight, every partition is paused, so memory is bounded.
- On revocation, in-flight work of the revoked partitions gets `revoke_grace_s` to finish and be
  committed; what is still running then is cancelled, uncommitted, and will be redelivered.
- A message the pipeline itself fails on (a bug) is dead-lettered, not left to hold back every
  later commit of its partition.

FastStream's subscribers process one message at a time per subscriber (or per partition with
`max_workers`), which caps a group at one model call per partition; hence this module, on
aiokafka directly. FastStream still runs the app and owns the producer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import defaultdict
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from services.runtime.bus import Delivery
from services.runtime.concurrency import KeyedScheduler, PartitionOffsets
from services.runtime.errors import TransportFailure
from services.runtime.pipeline import MessagePipeline, Rejection
from services.runtime.settings import KafkaSettings

log = logging.getLogger("switchboard.consumer")


class ConcurrentKafkaConsumer:
    def __init__(
        self,
        pipeline: MessagePipeline,
        kafka: KafkaSettings,
        max_in_flight: int,
        client_id: str,
        status_interval_s: float = 5.0,
    ) -> None:
        self.pipeline = pipeline
        self.status_interval_s = status_interval_s
        self.kafka = kafka
        self.group = pipeline.subscription.group
        self.scheduler = KeyedScheduler(max_in_flight)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=kafka.require(),
            group_id=self.group,
            client_id=client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=kafka.session_timeout_ms,
            heartbeat_interval_ms=kafka.heartbeat_interval_ms,
        )
        self._offsets: dict[TopicPartition, PartitionOffsets] = {}
        self._revoking: set[TopicPartition] = set()
        self._tasks: dict[TopicPartition, set[asyncio.Task[None]]] = defaultdict(set)
        self._to_commit: dict[TopicPartition, int] = {}
        self._commit_due = asyncio.Event()
        self._paused = False
        self._stopping = False
        self._loops: list[asyncio.Task[None]] = []
        self._last_status = 0.0

    async def start(self) -> None:
        self.consumer.subscribe(list(self.pipeline.subscription.topics), listener=_Rebalance(self))
        await self.consumer.start()
        self._loops = [
            asyncio.create_task(self._fetch(), name=f"{self.group}:fetch"),
            asyncio.create_task(self._commit_loop(), name=f"{self.group}:commit"),
        ]

    async def stop(self) -> None:
        """Stop fetching, let in-flight work finish within the grace period, commit, leave the group."""
        self._stopping = True
        fetch, committer = self._loops
        fetch.cancel()
        await asyncio.gather(fetch, return_exceptions=True)
        await self._drain(list(self._offsets), self.kafka.revoke_grace_s)
        committer.cancel()
        await asyncio.gather(committer, return_exceptions=True)
        await self._commit(only=None)
        self._offsets.clear()  # nothing left to hand back when stop() leaves the group
        await self.consumer.stop()

    @property
    def in_flight(self) -> int:
        return self.scheduler.in_flight

    # Fetching

    async def _fetch(self) -> None:
        while not self._stopping:
            if self.scheduler.full:
                self._pause()
                await self.scheduler.wait_for_room(timeout=1.0)
                # Polling the paused consumer keeps this member alive in the group.
                await self.consumer.getmany(timeout_ms=0)
                continue
            self._resume()
            batch = await self.consumer.getmany(timeout_ms=200, max_records=self.scheduler.room)
            for tp, records in batch.items():
                if tp not in self._offsets or tp in self._revoking:
                    continue  # no longer ours, or being handed back: its new owner reads it
                for record in records:
                    self._start(tp, record)
            self._report()

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            self.consumer.pause(*self.consumer.assignment())
            log.debug("%s: %d in flight, partitions paused", self.group, self.in_flight)

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            self.consumer.resume(*self.consumer.assignment())

    def _start(self, tp: TopicPartition, record: ConsumerRecord[Any, Any]) -> None:
        self._offsets[tp].started(record.offset)
        delivery = Delivery(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            value=b"" if record.value is None else record.value,  # a tombstone: no value at all
            headers={k: v.decode(errors="replace") for k, v in (record.headers or ())},
            timestamp_ms=record.timestamp,
            group=self.group,
        )

        async def job() -> None:
            try:
                await self.pipeline.process(delivery)
            except TransportFailure:
                # Outputs could not be produced even after retrying for minutes. Committing would
                # skip this message; stop the process instead so that the group redelivers it.
                log.critical("%s: cannot produce outputs; exiting without committing", self.group, exc_info=True)
                os._exit(75)
            except Exception as exc:
                if not await self._set_aside(delivery, exc):
                    return  # left uncommitted: its partition's commits stop here
            self._finished(tp, record.offset)

        task = self.scheduler.submit((tp, record.key), job)
        self._tasks[tp].add(task)
        task.add_done_callback(self._tasks[tp].discard)

    async def _set_aside(self, delivery: Delivery, exc: Exception) -> bool:
        """The pipeline itself failed on this message (it turns a handler's failures into retries
        and dead letters, so this is a bug). Left uncommitted, it would hold back every later
        commit of its partition, and a redelivery would fail the same way; so the owning group
        dead-letters it, as poison, and an observer skips it. True once it may be committed."""
        where = f"{delivery.topic}[{delivery.partition}]@{delivery.offset}"
        if self.pipeline.subscription.observer:
            log.error("%s: skipped %s, which the pipeline failed on", self.group, where, exc_info=exc)
            return True
        log.error("%s: dead-letters %s, which the pipeline failed on", self.group, where, exc_info=exc)
        try:
            await self.pipeline.dead_letter(delivery, Rejection("poison", exc))
        except TransportFailure:
            log.critical("%s: cannot produce outputs; exiting without committing", self.group, exc_info=True)
            os._exit(75)
        except Exception:
            log.critical("%s: could not dead-letter %s; it stays uncommitted", self.group, where, exc_info=True)
            return False
        return True

    def _finished(self, tp: TopicPartition, offset: int) -> None:
        offsets = self._offsets.get(tp)
        if offsets is None:
            return  # the partition was revoked; its new owner will redo this work
        point = offsets.finished(offset)
        if point is not None:
            self._to_commit[tp] = point
            self._commit_due.set()

    def _report(self) -> None:
        now = time.monotonic()
        if self.in_flight and now - self._last_status >= self.status_interval_s:
            self._last_status = now
            log.info("%s: %d in flight (peak %d)", self.group, self.in_flight, self.scheduler.peak)

    # Committing

    async def _commit_loop(self) -> None:
        while True:
            await self._commit_due.wait()
            self._commit_due.clear()
            # Gather completions for a moment: one commit request for many finished messages.
            await asyncio.sleep(self.kafka.commit_interval_ms / 1000)
            await self._commit(only=None)

    async def _commit(self, only: list[TopicPartition] | None) -> None:
        wanted = {
            tp: offset for tp, offset in self._to_commit.items()
            if (only is None or tp in only) and tp in self._offsets
        }
        if not wanted:
            return
        for tp in wanted:
            del self._to_commit[tp]
        try:
            await self.consumer.commit(wanted)
        except (CommitFailedError, IllegalStateError, KafkaError) as exc:
            # The group is rebalancing or the broker is away. Keep the offsets for the next try;
            # if the partitions move, their new owner redelivers from the last commit: harmless.
            log.warning("%s: commit of %s failed (%s); will retry", self.group, wanted, exc)
            for tp, offset in wanted.items():
                self._to_commit.setdefault(tp, offset)
            self._commit_due.set()

    # Rebalancing

    async def _drain(self, partitions: list[TopicPartition], grace_s: float) -> None:
        """Give in-flight work of `partitions` `grace_s` to finish, then abandon the rest."""
        tasks = {t for tp in partitions for t in self._tasks.get(tp, ())}
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("%s: abandoned %d unfinished messages; they will be redelivered", self.group, len(pending))
                await asyncio.gather(*pending, return_exceptions=True)

    async def revoked(self, partitions: list[TopicPartition]) -> None:
        owned = [tp for tp in partitions if tp in self._offsets]
        if not owned or self._stopping:
            return
        self._revoking.update(owned)  # start nothing new on them while their work drains
        try:
            await self._drain(owned, self.kafka.revoke_grace_s)
            await self._commit(only=owned)
        finally:
            for tp in owned:
                self._offsets.pop(tp, None)
                self._tasks.pop(tp, None)
            self._revoking.difference_update(owned)
        log.info("%s: handed back %s", self.group, sorted(f"{tp.topic}[{tp.partition}]" for tp in owned))

    def assigned(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._offsets.setdefault(tp, PartitionOffsets())
        if self._paused and partitions:
            self.consumer.pause(*partitions)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: ConcurrentKafkaConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.owner.revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.owner.assigned(list(assigned))
