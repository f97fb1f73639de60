"""Tool calls waiting for a person: each one's state in Redis, and an index of those undecided.

The tools executor opens an approval and decides it (on an ApprovalDecided event); the CLI lists
them and sends decisions; the executor's sweeper denies those whose time ran out. A waiting call
holds no consumer slot: its request is stored here, and the executor acts when the decision arrives.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Literal, cast

from pydantic import BaseModel
from redis.asyncio import Redis
from redis.exceptions import WatchError

from memory.keys import RedisKeys
from schemas.events import ToolCallRequested
from services.runtime.errors import ConcurrentUpdate


class Approval(BaseModel):
    approval_id: str
    state: Literal["pending", "approved", "denied"] = "pending"
    request: ToolCallRequested
    expires_at: float
    """Seconds since the epoch."""
    decided_by: str | None = None
    reason: str = ""
    traceparent: str | None = None
    """The request's trace, so that the decision continues the goal's trace."""

    @property
    def expires(self) -> datetime:
        return datetime.fromtimestamp(self.expires_at, UTC)


class ApprovalBook:
    def __init__(self, redis: Redis, keys: RedisKeys, ttl_s: int = 7 * 86_400) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_s = ttl_s

    async def get(self, tenant: str, approval_id: str) -> Approval | None:
        raw = await self.redis.get(self.keys.approval(tenant, approval_id))
        return Approval.model_validate_json(raw) if raw else None

    async def open(
        self, approval_id: str, request: ToolCallRequested, timeout_s: float, traceparent: str | None = None
    ) -> Approval | None:
        """Store a new pending approval; None if one with this id exists already (a redelivery)."""
        approval = Approval(
            approval_id=approval_id, request=request, expires_at=time.time() + timeout_s, traceparent=traceparent
        )
        key = self.keys.approval(request.tenant, approval_id)
        if not await self.redis.set(key, approval.model_dump_json(), nx=True, ex=self.ttl_s):
            return None
        await self.redis.zadd(self.keys.pending_approvals(), {f"{request.tenant}/{approval_id}": approval.expires_at})
        return approval

    async def decide(self, tenant: str, approval_id: str, approved: bool, by: str, reason: str) -> Approval | None:
        """Settle a pending approval. A decided one keeps its first decision; None if unknown."""
        key = self.keys.approval(tenant, approval_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            await pipe.watch(key)
            raw = await pipe.get(key)
            if not raw:
                return None
            approval = Approval.model_validate_json(raw)
            if approval.state != "pending":
                return approval
            approval = approval.model_copy(
                update={"state": "approved" if approved else "denied", "decided_by": by, "reason": reason}
            )
            pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
            pipe.set(key, approval.model_dump_json(), ex=self.ttl_s)
            pipe.zrem(self.keys.pending_approvals(), f"{tenant}/{approval_id}")
            try:
                await pipe.execute()
            except WatchError as exc:
                raise ConcurrentUpdate(f"approval {approval_id} was decided concurrently") from exc
        return approval

    async def pending(self, tenant: str | None = None) -> list[Approval]:
        """Every undecided approval (of `tenant`, when given), soonest to expire first: one MGET."""
        members = [_split(m) for m in await self._members()]
        wanted = [(t, a) for t, a in members if tenant is None or t == tenant]
        if not wanted:
            return []
        raws = await self.redis.mget([self.keys.approval(t, a) for t, a in wanted])
        found = [Approval.model_validate_json(raw) for raw in raws if raw]
        return [a for a in found if a.state == "pending"]

    async def find(self, approval_id: str) -> Approval | None:
        """An approval by id alone (the CLI does not know its tenant)."""
        for member in await self._members():
            tenant, found_id = _split(member)
            if found_id == approval_id:
                return await self.get(tenant, found_id)
        return None

    async def claim_expired(self, now: float) -> list[Approval]:
        """Undecided approvals past their time, each claimed by exactly one caller (ZREM)."""
        claimed = []
        expired = cast(list[bytes], await self.redis.zrangebyscore(self.keys.pending_approvals(), "-inf", now))
        for member in expired:
            if await self.redis.zrem(self.keys.pending_approvals(), member):
                approval = await self.get(*_split(member))
                if approval is not None and approval.state == "pending":
                    claimed.append(approval)
        return claimed


    async def _members(self) -> list[bytes]:
        # redis-py types sorted-set rows loosely; with decode_responses off they are bytes.
        return cast(list[bytes], await self.redis.zrange(self.keys.pending_approvals(), 0, -1))


def _split(member: bytes | str) -> tuple[str, str]:
    text = member.decode() if isinstance(member, bytes) else member
    tenant, _, approval_id = text.partition("/")
    return tenant, approval_id
