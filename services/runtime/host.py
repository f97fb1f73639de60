"""Runs services: on Kafka as one FastStream app, or embedded on the in-process bus.

Both ways build the same Runtime and the same services and feed every message through the same
MessagePipeline; only the transport differs. Services are named, and imported by name here,
so no service imports another.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import fakeredis
from faststream import FastStream
from litellm.caching.caching import Cache
from opentelemetry.sdk.trace import TracerProvider
from redis.asyncio import BlockingConnectionPool, Redis

from memory.keys import RedisKeys
from schemas.events import MemoryRecallCompleted, MemoryRecallRequested, ToolCallCompleted, ToolCallRequested
from schemas.topics import Topics
from services.runtime.budget import BudgetLedger
from services.runtime.bus import Producer, Subscription
from services.runtime.catalogue import AgentCatalogue
from services.runtime.errors import ConfigurationError
from services.runtime.goal_types import GoalTypes
from services.runtime.inprocess_bus import InProcessBus
from services.runtime.kafka_bus import KafkaProducer, ensure_topics, make_broker
from services.runtime.kafka_consumer import ConcurrentKafkaConsumer
from services.runtime.llm import LLMGateway, RecordedResponses, response_cache
from services.runtime.metrics import Metrics
from services.runtime.offline_model import Script
from services.runtime.pipeline import MessagePipeline, RetryPolicy
from services.runtime.settings import (
    BudgetSettings,
    KafkaSettings,
    LLMSettings,
    PlatformSettings,
    QdrantSettings,
    RedisSettings,
)
from services.runtime.signing import DEVELOPMENT_KEY, Signer
from services.runtime.tracing import Tracing, TracingSettings, tracer_provider

log = logging.getLogger("switchboard.host")

SERVICE_MODULES = {
    "orchestrator": "services.orchestrator.app",
    "agent": "services.agents.app",
    "tools": "services.tools.app",
    "memory": "services.memory_service.app",
}


@dataclass
class Settings:
    """The shared settings, built once per process and passed down."""

    platform: PlatformSettings = field(default_factory=PlatformSettings)
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    qdrant: QdrantSettings = field(default_factory=QdrantSettings)
    llm: LLMSettings = field(default_factory=LLMSettings)
    budget: BudgetSettings = field(default_factory=BudgetSettings)
    tracing: TracingSettings = field(default_factory=TracingSettings)


class Replay(RecordedResponses, Protocol):
    """A recorded goal run again (`switchboard replay`, services/ops/replay.py): what its record
    answers in place of the model (the gateway), the tools (the executor) and memory recalls (the
    memory service). A side effect is never repeated."""

    what_if: bool
    """False: a deterministic replay, where everything is answered from the record and what it
    does not hold is a divergence. True: the model is called (another model or prompt version);
    tool calls the record holds (same tool, same arguments) get its results."""

    def tool_result(
        self, request: ToolCallRequested, arguments: dict[str, Any], side_effect: bool
    ) -> ToolCallCompleted | None:
        """The reply to `request` (`arguments` validated), or None when it is to run live (only in a
        what-if run, and never a call with a side effect). Raises Permanent when a deterministic
        replay asks for a call the record does not hold."""
        ...

    def recall(self, request: MemoryRecallRequested) -> MemoryRecallCompleted | None:
        """The reply to a recall, or None when it is to run live (what-if). Raises like tool_result."""
        ...


@dataclass
class Runtime:
    """Clients and facts every service may use. Created and closed by the host."""

    settings: Settings
    topics: Topics
    keys: RedisKeys
    catalogue: AgentCatalogue
    redis: Redis
    goal_types: GoalTypes = field(default_factory=lambda: GoalTypes({}))
    """What a goal of each type does when its agent path fails (services/runtime/goal_types.py)."""
    script: Script | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    signer: Signer = field(default_factory=lambda: Signer(DEVELOPMENT_KEY))
    """Signs what the services produce and verifies the requests they require signed."""
    metrics: Metrics = field(default_factory=Metrics)
    """The process's Prometheus metrics; `switchboard serve` serves them (services/runtime/metrics.py)."""
    tracing: Tracing = field(default_factory=Tracing.local)
    """The process's tracer (services/runtime/tracing.py)."""
    replay: Replay | None = None
    """Set when the services run a recorded goal again (`run_embedded(..., replay=...)`)."""
    _llm: LLMGateway | None = None
    _budget: BudgetLedger | None = None

    @property
    def budget(self) -> BudgetLedger:
        if self._budget is None:
            self._budget = BudgetLedger(self.redis, self.keys, self.settings.budget)
        return self._budget

    @property
    def llm(self) -> LLMGateway:
        if self._llm is None:
            models = {k.model for k in self.catalogue.kinds.values()}
            self._llm = LLMGateway(
                self.settings.llm, models, self.settings.platform.instance, script=self.script,
                budget=self.budget, output_estimate_tokens=self.settings.budget.output_estimate_tokens,
                metrics=self.metrics, tracing=self.tracing,
                recorded=self.replay if self.replay is not None and not self.replay.what_if else None,
                cache=self._response_cache(),
            )
        return self._llm

    def _response_cache(self) -> Cache | None:
        """LiteLLM's response cache, when an agent kind switches caching on: on the platform's Redis,
        in process in the embedded mode. None in a replay, which answers from the record instead."""
        if self.replay is not None or not any(k.cache for k in self.catalogue.kinds.values()):
            return None
        return response_cache(self.settings.redis.url, self.settings.platform.namespace, self.settings.llm.cache_ttl_s)

    @property
    def embedded(self) -> bool:
        return self.settings.redis.url is None

    def group(self, name: str) -> str:
        return f"{self.settings.platform.namespace}.{name}"

    def pipeline(self, subscription: Subscription, producer: Producer, messaging_system: str = "kafka") -> MessagePipeline:
        """The pipeline a consumer feeds: the group also reads its topics' retry topics. Its metrics
        are labelled with the group's name without the namespace (`orchestrator`, `agent.writer`)."""
        with_retries = replace(subscription, topics=self.topics.with_retries(subscription.topics))
        service = subscription.group.removeprefix(f"{self.settings.platform.namespace}.")
        return MessagePipeline(
            with_retries, producer, self.retry, notify_topic=self.topics.goals,
            signer=self.signer, audit_topic=self.topics.audit, metrics=self.metrics, service=service,
            tracing=self.tracing, messaging_system=messaging_system,
        )


@dataclass
class ServiceApp:
    """What a service's `open_service` returns: its subscriptions, and how to close its clients."""

    subscriptions: list[Subscription]
    on_close: Callable[[], Awaitable[None]] | None = None
    background: list[Callable[[Producer], Coroutine[Any, Any, None]]] = field(default_factory=list)
    """Long-running jobs the host runs beside the consumers (e.g. a sweeper), cancelled at shutdown."""

    async def close(self) -> None:
        if self.on_close is not None:
            await self.on_close()


ServiceFactory = Callable[..., Awaitable[ServiceApp]]


@dataclass(frozen=True)
class ServiceSpec:
    """Which service to run, with its options (e.g. the agent kind)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def factory(self) -> ServiceFactory:
        module_name = SERVICE_MODULES.get(self.name)
        if module_name is None:
            raise ConfigurationError(f"unknown service {self.name!r}; known: {sorted(SERVICE_MODULES)}")
        factory: ServiceFactory = importlib.import_module(module_name).open_service
        return factory


def service_name(specs: list[ServiceSpec]) -> str:
    """The process's name in Kafka (client id) and in traces (service.name): `switchboard-tools`."""
    return "switchboard-" + "-".join(dict.fromkeys(s.name for s in specs))


@asynccontextmanager
async def open_runtime(
    settings: Settings, script: Script | None = None, metrics: Metrics | None = None,
    tracing: TracerProvider | None = None, service: str = "switchboard", replay: Replay | None = None,
) -> AsyncIterator[Runtime]:
    """`tracing`: the provider spans go to (tests pass one with an in-memory exporter). None: one
    built from `settings.tracing`, owned here and shut down (its export flushed) on the way out."""
    catalogue = AgentCatalogue.load(settings.platform.agents_dir)
    goal_types = GoalTypes.load(settings.platform.goal_types_dir)
    if settings.redis.url:
        pool = BlockingConnectionPool.from_url(
            settings.redis.url, max_connections=settings.redis.max_connections, timeout=settings.redis.pool_timeout_s
        )
        redis: Redis = Redis.from_pool(pool)  # closes the pool with the client
    else:
        redis = fakeredis.FakeAsyncRedis()
    platform = settings.platform
    provider = tracing or tracer_provider(settings.tracing, service, platform.instance)
    runtime = Runtime(
        settings=settings,
        topics=Topics(platform.namespace, catalogue.names, retry_levels=platform.retry_attempts - 1),
        keys=RedisKeys(platform.namespace),
        catalogue=catalogue,
        redis=redis,
        goal_types=goal_types,
        script=script,
        retry=RetryPolicy(platform.retry_attempts, platform.retry_backoff_s, platform.retry_backoff_max_s),
        signer=Signer.from_setting(platform.signing_key),
        metrics=metrics or Metrics(),
        tracing=Tracing.of(provider, content=settings.tracing.trace_content),
        replay=replay,
    )
    try:
        yield runtime
    finally:
        await redis.aclose()
        if tracing is None:
            provider.shutdown()


@asynccontextmanager
async def open_services(runtime: Runtime, specs: list[ServiceSpec]) -> AsyncIterator[list[ServiceApp]]:
    async with AsyncExitStack() as stack:
        apps: list[ServiceApp] = []
        for spec in specs:
            app = await spec.factory()(runtime, **spec.options)
            stack.push_async_callback(app.close)
            apps.append(app)
        yield apps


@asynccontextmanager
async def run_embedded(
    specs: list[ServiceSpec], settings: Settings, script: Script | None = None, tracing: TracerProvider | None = None,
    replay: Replay | None = None,
) -> AsyncIterator[tuple[InProcessBus, Runtime]]:
    """Every service in this process, on the in-process bus and in-process stores. With `replay`,
    they run a recorded goal again (services/ops/replay.py)."""
    if settings.redis.url or settings.kafka.bootstrap_servers:
        log.info("embedded run: ignoring KAFKA_BOOTSTRAP_SERVERS/REDIS_URL")
    settings.redis = RedisSettings(url=None)
    bus = InProcessBus(settings.platform.max_in_flight)
    async with (
        open_runtime(settings, script, tracing=tracing, service=service_name(specs), replay=replay) as runtime,
        open_services(runtime, specs) as apps,
    ):
        for app in apps:
            for sub in app.subscriptions:
                bus.subscribe(runtime.pipeline(sub, bus, messaging_system="switchboard.inprocess"))
        jobs: list[asyncio.Task[None]] = [asyncio.create_task(job(bus)) for app in apps for job in app.background]
        try:
            yield bus, runtime
        finally:
            await _cancel(jobs)
            await bus.close()


async def _cancel(jobs: list[asyncio.Task[None]]) -> None:
    for job in jobs:
        job.cancel()
    await asyncio.gather(*jobs, return_exceptions=True)


def kafka_app(
    specs: list[ServiceSpec], settings: Settings, script: Script | None = None, metrics: Metrics | None = None,
    tracing: TracerProvider | None = None,
) -> FastStream:
    """One FastStream app running the given services on Kafka, each in its own consumer group.
    They record into `metrics` (the process's, which `switchboard serve` serves); none: their own.
    Their spans go to `tracing`; none: a provider built from `settings.tracing`."""
    if not settings.redis.url:
        raise ConfigurationError(
            "REDIS_URL is not set. Services on Kafka keep their state in Redis: start it with "
            "`make infra-up` and export REDIS_URL=redis://127.0.0.1:6379/0."
        )
    if settings.platform.signing_key is None:
        log.warning(
            "SWITCHBOARD_SIGNING_KEY is not set: requests are signed with the development key, which anyone "
            "can read in the source. Set the same secret key on every service of a deployment."
        )
    client_id = service_name(specs)
    broker = make_broker(settings.kafka, client_id=client_id)
    producer = KafkaProducer(broker)
    consumers: list[ConcurrentKafkaConsumer] = []
    background: list[Callable[[Producer], Coroutine[Any, Any, None]]] = []
    jobs: list[asyncio.Task[None]] = []

    @asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            runtime = await stack.enter_async_context(open_runtime(settings, script, metrics, tracing, client_id))
            await ensure_topics(settings.kafka, runtime.topics.all_topics(), settings.platform.partitions)
            apps = await stack.enter_async_context(open_services(runtime, specs))
            consumers[:] = [
                ConcurrentKafkaConsumer(
                    runtime.pipeline(sub, producer), settings.kafka,
                    settings.platform.max_in_flight, client_id, settings.platform.status_interval_s,
                )
                for app in apps
                for sub in app.subscriptions
            ]
            background[:] = [job for app in apps for job in app.background]
            yield

    app = FastStream(broker, lifespan=lifespan, logger=logging.getLogger("switchboard.app"))

    @app.after_startup
    async def start_consuming() -> None:  # the producer is connected by now
        for consumer in consumers:
            await consumer.start()
        jobs[:] = [asyncio.create_task(job(producer)) for job in background]
        log.info(
            "serving %s on %s, up to %d messages in flight per group",
            [s.name for s in specs], settings.kafka.bootstrap_servers, settings.platform.max_in_flight,
        )

    @app.on_shutdown
    async def stop_consuming() -> None:  # before the producer closes: in-flight work may finish
        await _cancel(jobs)
        await asyncio.gather(*(c.stop() for c in consumers))

    return app
