"""The LLM gateway: every model call goes through here, via LiteLLM, and is recorded as an event.

LiteLLM's own retries are off; the platform's retry path owns retries. The offline model is
registered as a LiteLLM custom provider, so it takes the same path as a real model. Each call is a
`chat {model}` span with its token usage (services/runtime/tracing.py). In a deterministic replay
(`switchboard replay`) a goal's record answers every call instead, and no model is called.

Response caching, for the agent kinds that switch it on (`cache = true`), uses LiteLLM's `Cache`:
on the platform's Redis, or in process in the embedded mode (`response_cache`). The gateway looks
the call up itself, under LiteLLM's key of model, messages, tools and response format, namespaced by
the deployment namespace and the prompt version, so that a hit is known for certain, costs nothing,
and is recorded with what it saved.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from functools import cache
from typing import Any, ClassVar, Literal, Protocol

import litellm
from litellm import ModelResponse
from litellm.caching.caching import Cache
from litellm.router import Router
from litellm.types.caching import LiteLLMCacheType

from schemas.envelope import Envelope
from schemas.events import LLMCallRecorded
from services.runtime.budget import BudgetLedger
from services.runtime.errors import ConfigurationError, Retryable
from services.runtime.latency import Latency
from services.runtime.metrics import Metrics
from services.runtime.offline_model import (
    PROVIDER,
    OfflineModel,
    Script,
    estimate_tokens,
    load_script,
)
from services.runtime.prompts import Prompt
from services.runtime.settings import LLMSettings
from services.runtime.tracing import Tracing

log = logging.getLogger("switchboard.llm")

# LiteLLM's provider names where the GenAI conventions name the same provider differently.
_PROVIDERS = {
    "bedrock": "aws.bedrock", "vertex_ai": "gcp.vertex_ai", "gemini": "gcp.gemini", "azure": "azure.ai.openai",
    "azure_ai": "azure.ai.inference", "watsonx": "ibm.watsonx.ai", "mistral": "mistral_ai", "xai": "x_ai",
}
_TRANSIENT = (
    litellm.exceptions.RateLimitError,
    litellm.exceptions.APIConnectionError,
    litellm.exceptions.Timeout,
    litellm.exceptions.ServiceUnavailableError,
    litellm.exceptions.InternalServerError,
    litellm.exceptions.APIError,
)


@dataclass(frozen=True)
class ModelToolCall:
    call_index: int
    name: str
    raw_arguments: str


@dataclass(frozen=True)
class Completion:
    content: str | None
    tool_calls: list[ModelToolCall]
    assistant_message: dict[str, Any]
    record: LLMCallRecorded
    extra: dict[str, Any] = field(default_factory=dict)


class RecordedResponses(Protocol):
    """Where a replay's model responses come from: a goal's record (services/ops/replay.py)."""

    def model_response(
        self, purpose: str, agent: str, goal_id: str, step_id: str | None, messages: list[dict[str, Any]]
    ) -> LLMCallRecorded:
        """The recorded call that answers this one; raises Permanent when the record holds none
        (the replay diverged from the record)."""
        ...


def cache_namespace(namespace: str) -> str:
    """The prefix of a deployment namespace's response cache keys in Redis."""
    return f"{namespace}:llm-cache"


def response_cache(redis_url: str | None, namespace: str, ttl_s: int = 86_400) -> Cache:
    """LiteLLM's response cache: on Redis at `redis_url`, its keys under
    `<namespace>:llm-cache:<tenant>:<prompt version>:`; None (the embedded mode) keeps it in this process's
    memory, gone when the process ends. Entries expire after `ttl_s`. `max_messages=None`: LiteLLM
    would otherwise skip every request of more than 4 messages, i.e. most agent steps."""
    common: dict[str, Any] = {"namespace": cache_namespace(namespace), "ttl": ttl_s, "max_messages": None}
    if redis_url:
        return Cache(type=LiteLLMCacheType.REDIS, url=redis_url, **common)
    return Cache(type=LiteLLMCacheType.LOCAL, **common)


def _is_offline(model: str) -> bool:
    return model.split("/", 1)[0] == PROVIDER


@cache
def provider_name(model: str) -> str:
    """`gen_ai.provider.name` of a LiteLLM model string; the offline model's is `offline`. Cached:
    it is asked on every model call, for the handful of models a deployment uses."""
    try:
        provider: str = litellm.get_llm_provider(model)[1]
    except (litellm.exceptions.BadRequestError, ValueError):  # a model LiteLLM cannot place
        return "_OTHER"
    return _PROVIDERS.get(provider, provider)


class LLMGateway:
    allow_real_models: ClassVar[bool] = True
    """Tests set this to False so that any real provider call fails loudly."""

    def __init__(
        self,
        settings: LLMSettings,
        models: set[str],
        instance: str,
        script: Script | None = None,
        budget: BudgetLedger | None = None,
        output_estimate_tokens: int = 512,
        metrics: Metrics | None = None,
        tracing: Tracing | None = None,
        recorded: RecordedResponses | None = None,
        cache: Cache | None = None,
    ) -> None:
        self.settings = settings
        self.recorded = recorded
        """When set (a deterministic replay), every call is answered from it and no model is called."""
        self.model_calls = 0
        """Calls made to a model through LiteLLM (not those answered from a record or the cache)."""
        self.cache = cache
        """LiteLLM's response cache (`response_cache`); calls made with `cache=True` use it. None: no
        call is cached."""
        self.tracing = tracing or Tracing.local()
        self.metrics = metrics or Metrics()
        """Counts every call that returned, with its tokens and cost, by model and agent."""
        self.instance = instance
        self.budget = budget
        """When set, every call is admitted against its goal's budget first (the platform's check,
        not the caller's): an overrun raises BudgetExceeded before the model is called."""
        self.output_estimate_tokens = output_estimate_tokens
        if script is None and settings.offline_script:
            script = load_script(settings.offline_script)
        self.offline = OfflineModel(latency=Latency.parse(settings.offline_latency_ms), script=script)
        # LiteLLM keeps providers in a module-level list; replace ours rather than append.
        litellm.custom_provider_map = [
            item for item in litellm.custom_provider_map if item.get("provider") != PROVIDER
        ] + [{"provider": PROVIDER, "custom_handler": self.offline}]
        litellm.suppress_debug_info = True
        all_models = set(models) | {settings.default_model}
        for chain in settings.fallbacks:
            for primary, backups in chain.items():
                all_models |= {primary, *backups}
        self.router = Router(
            model_list=[{"model_name": m, "litellm_params": {"model": m}} for m in sorted(all_models)],
            fallbacks=settings.fallbacks or [],
            num_retries=0,
            timeout=settings.timeout_s,
        )

    async def complete(
        self,
        *,
        model: str,
        prompt: Prompt,
        messages: list[dict[str, Any]],
        purpose: Literal["plan", "step", "answer"],
        agent: str,
        cause: Envelope,
        tools: list[dict[str, Any]] | None = None,
        json_mode: bool = False,
        step_id: str | None = None,
        findings: list[str] | None = None,
        context_tokens: int | None = None,
        full_history_tokens: int | None = None,
        cache: bool = False,
    ) -> Completion:
        """`cache`: answer from the response cache when this model, messages, tools and prompt version
        were answered before, and store a new answer there (when the gateway has a cache, and not in
        a replay). A hit calls no model and costs nothing.
        `findings`: injection markers in the untrusted data new to this call, for its record.
        `context_tokens` and `full_history_tokens`: the caller's estimate of `messages` and of the
        uncompressed context it was assembled from, recorded to show what the assembly saved."""
        if self.recorded is None and not _is_offline(model) and not self.allow_real_models:
            raise ConfigurationError(f"real model calls are disabled here; {model!r} was asked for")
        kwargs: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "metadata": {"goal_id": cause.goal_id, "task_id": cause.task_id, "tenant": cause.tenant},
            "timeout": self.settings.timeout_s,
        }
        if tools:
            kwargs["tools"] = tools
        if json_mode:
            kwargs["response_format"] = {"type": "json_object"}
        prompt_version = prompt.label
        cache_key: str | None = None
        cached: dict[str, Any] | None = None
        if cache and self.cache is not None and self.recorded is None:
            # LiteLLM's key (model, messages, tools, response format), namespaced by the tenant and
            # the prompt version: the same messages under another prompt version are another entry,
            # and a tenant never gets, or learns of, another tenant's answer.
            cache_key = self.cache.get_cache_key(
                **{k: v for k, v in kwargs.items() if k not in ("metadata", "timeout")},
                cache={"namespace": f"{self.cache.namespace}:{cause.tenant}:{prompt_version}"},
            )
            cached = await self._cached(cache_key)
        reservation, ledger = None, self.budget
        if ledger is not None:
            if cached is not None:
                # Nothing to pay: a hit reserves nothing, but a stopped goal or a passed deadline
                # still refuses it.
                est_in = est_out = 0
            else:
                # The caller's estimate of the messages when it has one (an agent step has just
                # counted them), rather than encoding them all again on every call.
                est_in = context_tokens if context_tokens is not None else estimate_tokens(json.dumps(messages, default=str))
                est_in += estimate_tokens(json.dumps(tools)) if tools else 0
                est_out = self.output_estimate_tokens
            reservation = await ledger.admit(
                cause.tenant, cause.goal_id, est_in + est_out, self._price(model, est_in, est_out),
                wait_s=self.settings.timeout_s,
            )
        with self.tracing.chat(
            model, provider_name(model), agent=agent, purpose=purpose, prompt_version=prompt_version, messages=messages
        ) as span:
            started = time.perf_counter()
            past: LLMCallRecorded | None = None
            try:
                if cached is not None:
                    response = _response_of(
                        model, cached["response"], int(cached["input_tokens"]), int(cached["output_tokens"])
                    )
                elif self.recorded is not None:
                    past = self.recorded.model_response(purpose, agent, cause.goal_id, step_id, messages)
                    response = _response_of(past.model, past.response, past.input_tokens, past.output_tokens)
                else:
                    self.model_calls += 1
                    response = await self.router.acompletion(**kwargs)
            except BaseException as exc:
                if ledger is not None and reservation is not None:
                    await ledger.settle(reservation, 0, 0.0, made=False)
                if isinstance(exc, _TRANSIENT):
                    raise Retryable(f"model {model} failed: {exc}") from exc
                raise
            latency_ms = (time.perf_counter() - started) * 1000
            choice = response.choices[0].message
            tool_calls = [
                ModelToolCall(i, tc.function.name or "", tc.function.arguments or "{}")
                for i, tc in enumerate(choice.tool_calls or [])
            ]
            assistant: dict[str, Any] = {"role": "assistant", "content": choice.content}
            if choice.tool_calls:
                assistant["tool_calls"] = [
                    {"id": tc.id, "type": "function",
                     "function": {"name": tc.function.name, "arguments": tc.function.arguments}}
                    for tc in choice.tool_calls
                ]
            usage = getattr(response, "usage", None)
            input_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
            output_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
            if past is not None:
                cost = past.cost_usd
            elif cached is not None:
                cost = 0.0
            else:
                cost = self._cost(model, response, input_tokens, output_tokens)
            saved_tokens, saved_cost = 0, 0.0
            if cached is not None:  # what was paid now is nothing; what it saved, what it cost then
                saved_tokens, saved_cost = input_tokens + output_tokens, float(cached["cost_usd"])
                input_tokens = output_tokens = 0
            self.tracing.chat_completed(span, response, assistant, input_tokens, output_tokens, cost)
        if ledger is not None and reservation is not None:
            # A cache hit made no call: its reservation is given back and nothing is counted.
            await ledger.settle(reservation, input_tokens + output_tokens, cost, made=cached is None)
        record = LLMCallRecorded(
            **cause.caused(),
            purpose=purpose,
            agent=agent,
            model=model,
            prompt_version=prompt_version,
            prompt_hash=prompt.digest,
            messages=messages,
            response=assistant,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost_usd=cost,
            latency_ms=round(latency_ms, 3),
            step_id=step_id,
            instance=self.instance,
            findings=list(findings or []),
            context_tokens=context_tokens,
            full_history_tokens=full_history_tokens,
            cache_hit=cached is not None,
            saved_tokens=saved_tokens,
            saved_cost_usd=saved_cost,
        )
        if cache_key is not None and cached is None and self.cache is not None:
            entry = {"response": assistant, "input_tokens": input_tokens, "output_tokens": output_tokens, "cost_usd": cost}
            await self.cache.async_add_cache(json.dumps(entry), cache_key=cache_key)
        self.metrics.llm_call(record)
        return Completion(choice.content, tool_calls, assistant, record)

    async def _cached(self, key: str) -> dict[str, Any] | None:
        """The entry stored under `key`, or None. LiteLLM's lookup never raises: a cache it cannot
        reach is a miss (and the call is made)."""
        assert self.cache is not None
        entry = await self.cache.async_get_cache(cache_key=key)
        if entry is None:
            return None
        return entry if isinstance(entry, dict) else json.loads(entry)

    def _price(self, model: str, input_tokens: int, output_tokens: int) -> float:
        """What a call of this size would cost: the reservation a budget holds while it runs."""
        if _is_offline(model):
            return self.settings.offline_cost_per_1k_tokens * (input_tokens + output_tokens) / 1000
        try:
            prompt_cost, completion_cost = litellm.cost_per_token(
                model=model, prompt_tokens=input_tokens, completion_tokens=output_tokens
            )
        except (litellm.exceptions.NotFoundError, ValueError):
            return 0.0
        return float(prompt_cost + completion_cost)

    def _cost(self, model: str, response: Any, input_tokens: int, output_tokens: int) -> float:
        if _is_offline(model):
            return self._price(model, input_tokens, output_tokens)
        try:
            return float(litellm.completion_cost(completion_response=response, model=model))
        except (litellm.exceptions.BadRequestError, litellm.exceptions.NotFoundError, ValueError) as exc:
            log.warning("no price known for %s; recording cost 0 (%s)", model, exc)
            return 0.0


def _response_of(model: str, message: dict[str, Any], input_tokens: int, output_tokens: int) -> ModelResponse:
    """A recorded or cached answer as LiteLLM returns one, so it takes the same path as a live
    answer: the same content, tool calls (with their ids) and token counts."""
    finish = "tool_calls" if message.get("tool_calls") else "stop"
    return ModelResponse(
        model=model,
        choices=[{"index": 0, "message": message, "finish_reason": finish}],
        usage={
            "prompt_tokens": input_tokens, "completion_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
        },
    )
