"""The scheduling core: bounded concurrency, order per key, and a commit point that never skips."""

from __future__ import annotations

import asyncio
import random

from services.runtime.concurrency import KeyedScheduler, PartitionOffsets


async def test_jobs_of_one_key_run_in_order_while_other_keys_run_alongside() -> None:
    scheduler = KeyedScheduler(limit=64)
    rng = random.Random(7)
    ran: dict[str, list[int]] = {}
    gates: list[asyncio.Event] = []

    def job(key: str, seq: int) -> object:
        gate = asyncio.Event()
        gates.append(gate)

        async def run() -> None:
            await gate.wait()
            ran.setdefault(key, []).append(seq)

        return run

    tasks = [scheduler.submit(f"k{i % 8}", job(f"k{i % 8}", i // 8)) for i in range(64)]  # type: ignore[arg-type]
    assert scheduler.full and scheduler.in_flight == 64
    order = list(range(64))
    rng.shuffle(order)
    for i in order:  # release in random order: a later job of a key still waits for the earlier one
        gates[i].set()
    await asyncio.gather(*tasks)
    assert ran == {f"k{k}": list(range(8)) for k in range(8)}
    assert scheduler.in_flight == 0 and scheduler.peak == 64


async def test_a_full_scheduler_refuses_more_until_a_job_finishes() -> None:
    scheduler = KeyedScheduler(limit=2)
    release = asyncio.Event()
    for key in ("a", "b"):
        scheduler.submit(key, release.wait)  # type: ignore[arg-type]
    assert scheduler.full
    assert await scheduler.wait_for_room(timeout=0.05) is False
    release.set()
    assert await scheduler.wait_for_room(timeout=5) is True
    await scheduler.wait_idle()
    assert scheduler.peak == 2


async def test_when_a_job_is_abandoned_the_later_jobs_of_its_key_do_not_run() -> None:
    scheduler = KeyedScheduler(limit=4)
    ran: list[str] = []
    first = scheduler.submit("k", asyncio.Event().wait)  # never finishes by itself

    async def second() -> None:
        ran.append("second")

    later = scheduler.submit("k", second)
    first.cancel()
    await asyncio.gather(first, later, return_exceptions=True)
    assert later.cancelled() and ran == []


def test_the_commit_point_only_moves_past_contiguous_finished_offsets() -> None:
    offsets = PartitionOffsets()
    for offset in range(10, 15):
        offsets.started(offset)
    assert offsets.finished(12) is None
    assert offsets.finished(11) is None
    assert offsets.commit_point is None
    assert offsets.finished(10) == 13
    assert offsets.finished(14) is None
    assert offsets.finished(13) == 15
    assert offsets.pending == 0
