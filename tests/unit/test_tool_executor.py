"""The tool executor: what each way of failing does to the request, per-tool limits, the circuit
breaker, and side effects that run once."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from memory.keys import RedisKeys
from schemas.events import MAX_TEXT, AuditRecorded, ToolCallCompleted, ToolCallRequested
from schemas.tools import HttpGetArgs, ToolArgs
from services.agents.logic import validate_call
from services.runtime.catalogue import AgentCatalogue
from services.runtime.errors import ConfigurationError, Permanent, Retryable, ToolDenied
from services.runtime.idempotency import SideEffectGuard
from services.runtime.llm import ModelToolCall
from services.tools import logic, registry
from services.tools.breaker import CircuitOpen
from services.tools.limits import ToolLimiter
from services.tools.redaction import Redactor, install_log_redaction
from services.tools.settings import ToolsSettings
from tests.support.http import Hit, loopback_server
from tests.support.kafka import eventually


class Clock:
    """A clock the test moves by hand, so the breaker's reset timeout needs no waiting."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def catalogue_with_browser() -> AgentCatalogue:
    """The packaged kinds plus `browser`, the one kind allowed to call http_get."""
    packaged = AgentCatalogue.load()
    browser = packaged.kinds["researcher"].model_copy(update={"name": "browser", "tools": ("http_get",)})
    return AgentCatalogue({**packaged.kinds, "browser": browser})


def deps(
    redis: Redis,
    keys: RedisKeys,
    sandbox: Path,
    *,
    http_hosts: frozenset[str] = frozenset(),
    http_enabled: bool = True,
    settings: ToolsSettings | None = None,
    clock: Callable[[], float] | None = None,
    **replace: registry.Tool,
) -> logic.ToolsDeps:
    """The executor as app.py wires it; `replace` swaps a tool's implementation under its name."""
    settings = settings or ToolsSettings(timeout_s=2.0)
    tools = {
        "calculator": registry.calculator(),
        "save_note": registry.save_note(sandbox),
        "http_get": registry.http_get(http_enabled, http_hosts, 10_000, settings.limits_for("http_get").timeout_s),
        **replace,
    }
    limiters = {name: ToolLimiter(name, settings.limits_for(name), clock or Clock()) for name in tools}
    return logic.ToolsDeps(tools, limiters, catalogue_with_browser(), SideEffectGuard(redis, keys), AUDIT)


def request(tool: str, arguments: dict[str, object], kind: str = "writer", step: str = "g1.w1:0") -> ToolCallRequested:
    return ToolCallRequested(
        tenant="acme", goal_id="g1", task_id="g1.w1", call_id=f"{step}:0", step_id=step, tool=tool,
        arguments=arguments, agent_kind=kind, reply_to="unit.agent.writer",
    )


def calc(expression: str = "1+1", step: str = "g1.r1:0") -> ToolCallRequested:
    return request("calculator", {"expression": expression}, kind="researcher", step=step)


AUDIT = "unit.audit"


def result(outputs: list) -> ToolCallCompleted:  # type: ignore[type-arg]
    """The reply; every execution also writes its audit record."""
    [out, audit] = outputs
    assert isinstance(out.event, ToolCallCompleted) and isinstance(audit.event, AuditRecorded)
    assert audit.topic == AUDIT and audit.event.action == "tool.executed" and audit.event.subject == out.event.call_id
    return out.event


def audited_denial(exc: Permanent) -> tuple[str, str, str]:
    """The refusal's audit record, produced with its dead letter: (actor, policy, reason)."""
    [audit] = exc.outputs
    assert isinstance(audit.event, AuditRecorded)
    assert audit.topic == AUDIT and audit.event.action == "tool.denied"
    assert audit.event.detail["tool"] and audit.event.detail["goal"] == "g1"
    return audit.event.actor, audit.event.detail["policy"], audit.event.detail["reason"]


def circuit(d: logic.ToolsDeps, tool: str) -> str:
    return d.limiters[tool].breaker.state


def notes(sandbox: Path) -> list[dict[str, object]]:
    path = sandbox / "acme" / "notes.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class ScriptedTool:
    """A tool whose next outcomes the test sets: an exception to raise, or None to answer.
    It can be held at a gate, and it counts how many calls ran and how many ran at once."""

    def __init__(self) -> None:
        self.outcomes: list[BaseException | None] = []
        self.calls = 0
        self.running = 0
        self.peak = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.work_s = 0.0

    async def run(self, args: ToolArgs, _: registry.CallContext) -> str:
        self.calls += 1
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await self.gate.wait()
            if self.work_s:
                await asyncio.sleep(self.work_s)  # simulated work, not a wait for an event
            outcome = self.outcomes.pop(0) if self.outcomes else None
            if outcome is not None:
                raise outcome
            return f"answer {self.calls}"
        finally:
            self.running -= 1

    @property
    def tool(self) -> registry.Tool:
        return registry.Tool(self.run)


def page_server(statuses: list[int]) -> AbstractContextManager[tuple[str, list[Hit]]]:
    """A loopback server whose pages are 50,000 bytes long: larger than any size limit here."""
    return loopback_server(statuses, ok_body=lambda _: b"x" * 50_000)


def paths(hits: list[Hit]) -> list[str]:
    return [hit.path for hit in hits]


# Side effects run once.


async def test_a_duplicate_side_effect_request_returns_the_stored_result_and_writes_once(
    redis: Redis, keys: RedisKeys, tmp_path: Path
) -> None:
    d = deps(redis, keys, tmp_path)
    first = result(await logic.execute(d, request("save_note", {"title": "t", "body": "b"})))
    second = result(await logic.execute(d, request("save_note", {"title": "t", "body": "b"})))
    assert first.ok and second.ok
    assert (first.replayed, second.replayed) == (False, True)
    assert second.output == first.output
    assert len(notes(tmp_path)) == 1
    [_, audit] = await logic.execute(d, request("save_note", {"title": "t", "body": "b"}))
    assert isinstance(audit.event, AuditRecorded)
    assert audit.event.detail["replayed"] is True and audit.event.actor == "writer"
    assert audit.event.detail["idempotency_key"] == notes(tmp_path)[0]["idempotency_key"]


async def test_the_same_note_at_another_step_is_a_new_side_effect(redis: Redis, keys: RedisKeys, tmp_path: Path) -> None:
    d = deps(redis, keys, tmp_path)
    await logic.execute(d, request("save_note", {"title": "t", "body": "b"}, step="g1.w1:0"))
    await logic.execute(d, request("save_note", {"title": "t", "body": "b"}, step="g1.w1:1"))
    assert len(notes(tmp_path)) == 2


# Refusals are dead-lettered: tool_denied and schema_invalid.


async def test_a_tool_outside_the_agent_kinds_allowlist_is_denied(redis: Redis, keys: RedisKeys, tmp_path: Path) -> None:
    with pytest.raises(ToolDenied) as denied:
        await logic.execute(deps(redis, keys, tmp_path), request("save_note", {"title": "t", "body": "b"}, kind="researcher"))
    assert denied.value.reason == "tool_denied" and denied.value.policy == "agent_allowlist"
    assert "not allowed for agent kind 'researcher'" in str(denied.value)
    assert notes(tmp_path) == []
    assert audited_denial(denied.value) == ("researcher", "agent_allowlist", "tool_denied")


async def test_a_tool_this_executor_does_not_run_is_denied(redis: Redis, keys: RedisKeys, tmp_path: Path) -> None:
    with pytest.raises(ToolDenied) as denied:
        await logic.execute(deps(redis, keys, tmp_path), request("kb_search", {"query": "kafka"}, kind="researcher"))
    assert denied.value.reason == "tool_denied" and denied.value.policy == "executor_tools"
    assert "unknown tool 'kb_search'" in str(denied.value)
    assert audited_denial(denied.value) == ("researcher", "executor_tools", "tool_denied")


async def test_invalid_arguments_are_refused_as_schema_invalid(redis: Redis, keys: RedisKeys, tmp_path: Path) -> None:
    with pytest.raises(Permanent) as refused:
        await logic.execute(deps(redis, keys, tmp_path), calc().model_copy(update={"arguments": {"expression": "1+1", "shell": "rm"}}))
    assert refused.value.reason == "schema_invalid"
    assert "Extra inputs are not permitted" in str(refused.value)
    assert audited_denial(refused.value) == ("researcher", "arguments", "schema_invalid")


async def test_http_get_to_a_host_off_the_allowlist_is_denied_without_a_request(redis: Redis, keys: RedisKeys, tmp_path: Path) -> None:
    with page_server([]) as (base, hits):
        d = deps(redis, keys, tmp_path, http_hosts=frozenset({"docs.example.org"}))
        with pytest.raises(ToolDenied) as denied:
            await logic.execute(d, request("http_get", {"url": f"{base}/?k=secret"}, kind="browser"))
        assert denied.value.policy == "TOOLS_HTTP_ALLOWED_HOSTS" and "not on the allowlist" in str(denied.value)
        off = deps(redis, keys, tmp_path, http_hosts=frozenset({"127.0.0.1"}), http_enabled=False)
        with pytest.raises(ToolDenied) as disabled:
            await logic.execute(off, request("http_get", {"url": f"{base}/page"}, kind="browser"))
        assert disabled.value.policy == "TOOLS_HTTP_ENABLED" and "disabled" in str(disabled.value)
    assert paths(hits) == []


# Errors the model can act on come back to the agent.


@pytest.mark.parametrize(("expression", "error"), [("__import__('os')", "only numbers"), ("1/0", "division by zero")])
async def test_calculator_errors_come_back_to_the_agent(redis: Redis, keys: RedisKeys, tmp_path: Path, expression: str, error: str) -> None:
    out = result(await logic.execute(deps(redis, keys, tmp_path), calc(expression)))
    assert not out.ok and error in (out.error or "")


async def test_an_http_4xx_is_the_pages_answer_for_the_agent(redis: Redis, keys: RedisKeys, tmp_path: Path) -> None:
    with page_server([404]) as (base, hits):
        d = deps(redis, keys, tmp_path, http_hosts=frozenset({"127.0.0.1"}))
        out = result(await logic.execute(d, request("http_get", {"url": f"{base}/missing"}, kind="browser")))
    assert out.ok and out.output == "HTTP 404\nstatus 404"
    assert paths(hits) == ["/missing"]


# Transient failures are retried; crashes are dead-lettered as tool_failed.


@pytest.mark.parametrize("status", [503, 429])
async def test_an_http_5xx_or_429_is_retried(redis: Redis, keys: RedisKeys, tmp_path: Path, status: int) -> None:
    with page_server([status]) as (base, hits):
        d = deps(redis, keys, tmp_path, http_hosts=frozenset({"127.0.0.1"}))
        with pytest.raises(Retryable, match=f"answered {status}"):
            await logic.execute(d, request("http_get", {"url": f"{base}/flaky"}, kind="browser"))
    assert paths(hits) == ["/flaky"]


async def test_a_refused_connection_is_retried(redis: Redis, keys: RedisKeys, tmp_path: Path) -> None:
    with page_server([]) as (base, _):
        pass  # closed: nothing listens on its port any more
    d = deps(redis, keys, tmp_path, http_hosts=frozenset({"127.0.0.1"}))
    with pytest.raises(Retryable, match="ConnectError"):
        await logic.execute(d, request("http_get", {"url": f"{base}/gone"}, kind="browser"))


async def test_a_tool_that_crashes_is_dead_lettered_as_tool_failed_and_can_run_later(
    redis: Redis, keys: RedisKeys, tmp_path: Path
) -> None:
    sandbox = tmp_path / "sandbox"
    sandbox.write_text("a file where the sandbox directory should be")
    note = request("save_note", {"title": "t", "body": "b"})
    with pytest.raises(Permanent) as failed:
        await logic.execute(deps(redis, keys, sandbox), note)
    assert failed.value.reason == "tool_failed"
    assert "save_note failed: NotADirectoryError" in str(failed.value)
    sandbox.unlink()
    again = result(await logic.execute(deps(redis, keys, sandbox), note))
    assert again.ok and not again.replayed, "the crash released its idempotency claim"
    assert len(notes(sandbox)) == 1


# Per-tool limits.


async def test_each_tool_has_its_own_timeout(redis: Redis, keys: RedisKeys, tmp_path: Path) -> None:
    settings = ToolsSettings(timeout_s=5.0, limits={"calculator": {"timeout_s": 0.05}})
    stuck = ScriptedTool()
    stuck.gate.clear()  # never answers
    d = deps(redis, keys, tmp_path, settings=settings, calculator=stuck.tool)
    with pytest.raises(Retryable, match="calculator timed out after 0.05s"):
        await logic.execute(d, calc())
    assert d.limiters["calculator"].limits.timeout_s == 0.05
    assert d.limiters["save_note"].limits.timeout_s == 5.0


async def test_no_more_calls_of_a_tool_run_at_once_than_its_concurrency(redis: Redis, keys: RedisKeys, tmp_path: Path) -> None:
    settings = ToolsSettings(limits={"calculator": {"concurrency": 2}})
    tool = ScriptedTool()
    tool.gate.clear()
    d = deps(redis, keys, tmp_path, settings=settings, calculator=tool.tool)
    calls = [asyncio.create_task(logic.execute(d, calc(step=f"g1.r1:{n}"))) for n in range(6)]
    await eventually(lambda: tool.running == 2, timeout=5, interval=0.01)
    assert tool.calls == 2, "the other four wait for a slot"
    tool.gate.set()
    replies = [result(r) for r in await asyncio.gather(*calls)]
    assert all(r.ok for r in replies) and tool.calls == 6
    assert tool.peak == 2


async def test_waiting_for_a_slot_does_not_count_toward_the_timeout(redis: Redis, keys: RedisKeys, tmp_path: Path) -> None:
    settings = ToolsSettings(limits={"calculator": {"concurrency": 1, "timeout_s": 0.5}})
    tool = ScriptedTool()
    tool.work_s = 0.3  # three calls in a row take 0.9 s, each well within its 0.5 s
    d = deps(redis, keys, tmp_path, settings=settings, calculator=tool.tool)
    replies = [result(r) for r in await asyncio.gather(*(logic.execute(d, calc(step=f"g1.r1:{n}")) for n in range(3)))]
    assert all(r.ok for r in replies) and tool.peak == 1


# The circuit breaker.


async def test_the_circuit_opens_after_consecutive_failures_then_one_probe_closes_it(
    redis: Redis, keys: RedisKeys, tmp_path: Path
) -> None:
    clock = Clock()
    settings = ToolsSettings(limits={"calculator": {"breaker_failures": 3, "breaker_reset_s": 30}})
    tool = ScriptedTool()
    d = deps(redis, keys, tmp_path, settings=settings, clock=clock, calculator=tool.tool)
    tool.outcomes = [Retryable("upstream answered 503")] * 2 + [RuntimeError("bug")]
    for n in range(2):
        with pytest.raises(Retryable, match="503"):
            await logic.execute(d, calc(step=f"g1.r1:{n}"))
    with pytest.raises(Permanent, match="RuntimeError: bug"):
        await logic.execute(d, calc(step="g1.r1:2"))

    with pytest.raises(CircuitOpen, match="circuit open for tool calculator") as rejected:
        await logic.execute(d, calc(step="g1.r1:3"))
    assert isinstance(rejected.value, Retryable), "the request waits in a retry topic"
    assert tool.calls == 3, "an open circuit does not call the tool"

    clock.now += 30.1  # half-open: one probe goes through, the others are still turned away
    tool.gate.clear()
    probe = asyncio.create_task(logic.execute(d, calc(step="g1.r1:4")))
    await eventually(lambda: tool.running == 1, timeout=5, interval=0.01)
    with pytest.raises(CircuitOpen, match="waiting for its probe"):
        await logic.execute(d, calc(step="g1.r1:5"))
    tool.gate.set()
    assert result(await probe).ok
    assert circuit(d, "calculator") == "closed"
    replies = [result(await logic.execute(d, calc(step=f"g1.r1:{n}"))) for n in (6, 7)]
    assert all(r.ok for r in replies) and tool.calls == 6


async def test_a_failed_probe_opens_the_circuit_again(redis: Redis, keys: RedisKeys, tmp_path: Path) -> None:
    clock = Clock()
    settings = ToolsSettings(limits={"calculator": {"breaker_failures": 1, "breaker_reset_s": 10}})
    tool = ScriptedTool()
    d = deps(redis, keys, tmp_path, settings=settings, clock=clock, calculator=tool.tool)
    tool.outcomes = [Retryable("down"), Retryable("still down")]
    with pytest.raises(Retryable, match="down"):
        await logic.execute(d, calc(step="g1.r1:0"))
    clock.now += 10.1
    with pytest.raises(Retryable, match="still down"):
        await logic.execute(d, calc(step="g1.r1:1"))  # the probe
    with pytest.raises(CircuitOpen):
        await logic.execute(d, calc(step="g1.r1:2"))
    assert tool.calls == 2 and circuit(d, "calculator") == "open"


async def test_denials_bad_arguments_and_answered_errors_do_not_open_the_circuit(
    redis: Redis, keys: RedisKeys, tmp_path: Path
) -> None:
    clock = Clock()
    settings = ToolsSettings(limits={"calculator": {"breaker_failures": 1}})
    d = deps(redis, keys, tmp_path, settings=settings, clock=clock)
    with pytest.raises(ToolDenied):
        await logic.execute(d, calc().model_copy(update={"agent_kind": "writer"}))
    with pytest.raises(Permanent, match="invalid arguments"):
        await logic.execute(d, calc().model_copy(update={"arguments": {"expression": 5}}))
    assert not result(await logic.execute(d, calc("1/0"))).ok
    assert result(await logic.execute(d, calc("2+2", step="g1.r1:1"))).output == "2+2 = 4"
    assert circuit(d, "calculator") == "closed"


async def test_a_replayed_side_effect_neither_calls_the_tool_nor_counts_for_the_breaker(
    redis: Redis, keys: RedisKeys, tmp_path: Path
) -> None:
    clock = Clock()
    settings = ToolsSettings(limits={"save_note": {"breaker_failures": 1, "breaker_reset_s": 10}})
    tool = ScriptedTool()
    d = deps(redis, keys, tmp_path, settings=settings, clock=clock, save_note=tool.tool)
    note = request("save_note", {"title": "t", "body": "b"})
    first = result(await logic.execute(d, note))
    tool.outcomes = [Retryable("disk busy")]
    with pytest.raises(Retryable, match="disk busy"):
        await logic.execute(d, request("save_note", {"title": "other", "body": "b"}))
    clock.now += 10.1  # half-open: the replay below must not use up, nor decide, the probe
    second = result(await logic.execute(d, note))
    assert (first.output, second.output, second.replayed) == ("answer 1", "answer 1", True)
    assert circuit(d, "save_note") == "half_open"
    assert result(await logic.execute(d, request("save_note", {"title": "third", "body": "b"}))).ok
    assert circuit(d, "save_note") == "closed"
    assert tool.calls == 3


# Settings.


def test_per_tool_limits_override_the_defaults_field_by_field() -> None:
    settings = ToolsSettings(timeout_s=7, concurrency=3, limits={"http_get": {"timeout_s": 5, "breaker_failures": 2}})
    http, calculator = settings.limits_for("http_get"), settings.limits_for("calculator")
    assert (http.timeout_s, http.concurrency, http.breaker_failures, http.breaker_reset_s) == (5, 3, 2, 30)
    assert (calculator.timeout_s, calculator.concurrency, calculator.breaker_failures) == (7, 3, 5)


def test_limits_are_read_from_the_environment_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOOLS_LIMITS", '{"http_get": {"timeout_s": 5, "concurrency": 4, "breaker_failures": 5, "breaker_reset_s": 30}}')
    assert ToolsSettings.from_env().limits_for("http_get").concurrency == 4


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("TOOLS_LIMITS", "{not json", "TOOLS_LIMITS: Value error, not JSON"),
        ("TOOLS_LIMITS", '{"http-get": {"timeout_s": 5}}', "unknown tools ['http-get']"),
        ("TOOLS_LIMITS", '{"http_get": {"concurrency": 0}}', "TOOLS_LIMITS [http_get.concurrency]: Input should be greater than or equal to 1"),
        ("TOOLS_LIMITS", '{"http_get": {"retries": 3}}', "TOOLS_LIMITS [http_get.retries]: Extra inputs are not permitted"),
        ("TOOLS_TIMEOUT_S", "0", "TOOLS_TIMEOUT_S: Input should be greater than 0"),
    ],
)
def test_bad_limits_fail_at_start_up_with_the_variable_named(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as bad:
        ToolsSettings.from_env()
    assert message in str(bad.value)


def test_http_get_is_off_by_default() -> None:
    assert ToolsSettings().http_enabled is False


def test_the_agent_validates_arguments_against_the_tool_schema() -> None:
    researcher = AgentCatalogue.load().get("researcher")
    ok = validate_call(researcher, ModelToolCall(0, "calculator", '{"expression": "2+2"}'))
    assert not isinstance(ok, str) and ok.arguments == {"expression": "2+2"}
    assert "invalid arguments" in str(validate_call(researcher, ModelToolCall(0, "calculator", '{"expression": 5}')))
    assert "invalid arguments" in str(validate_call(researcher, ModelToolCall(0, "calculator", "not json")))
    assert "not allowed" in str(validate_call(researcher, ModelToolCall(0, "http_get", '{"url": "http://x"}')))


async def test_http_get_fetches_from_an_allowlisted_host_and_stops_at_the_size_limit() -> None:
    with page_server([]) as (base, hits):
        fetch = registry.http_get(True, frozenset({"127.0.0.1"}), 1_000, 5.0)
        ctx = registry.CallContext("acme", "g1", "g1.r1", "key")
        output = await fetch.run(HttpGetArgs(url=f"{base}/page"), ctx)
        assert output.startswith("HTTP 200\n")
        assert output.removeprefix("HTTP 200\n") == "x" * 1_000
        off = registry.http_get(False, frozenset({"127.0.0.1"}), 1_000, 5.0)
        with pytest.raises(ToolDenied, match="disabled"):
            await off.run(HttpGetArgs(url=f"{base}/page"), ctx)
    assert paths(hits) == ["/page"]


# Secrets come from the executor's configuration only, and are redacted from answers and logs.

SECRET = "Bearer tok-0123456789abcdef"


def echo_headers(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, str]]:
    """http_get's requests are answered with the headers they carry (as a hostile page might echo
    them), by an in-memory transport; returns those headers, one dict per request."""
    seen: list[dict[str, str]] = []

    def answer(req: httpx.Request) -> httpx.Response:
        seen.append(dict(req.headers))
        return httpx.Response(200, json=dict(req.headers))

    client = httpx.AsyncClient
    monkeypatch.setattr(httpx, "AsyncClient", lambda **kw: client(transport=httpx.MockTransport(answer), **kw))
    return seen


def test_tools_http_headers_are_secrets_per_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOOLS_HTTP_HEADERS", json.dumps({"API.example.com": {"Authorization": SECRET}}))
    settings = ToolsSettings.from_env()
    [(host, headers)] = settings.http_headers.items()
    assert host == "api.example.com" and SECRET not in repr(headers)
    assert settings.secrets() == [SECRET]
    monkeypatch.setenv("TOOLS_HTTP_HEADERS", '{"api.example.com": {"Authorization": "Bearer tok-0123')
    with pytest.raises(ConfigurationError) as bad:
        ToolsSettings.from_env()
    assert "TOOLS_HTTP_HEADERS" in str(bad.value) and "tok-0123" not in str(bad.value)


async def test_configured_headers_go_to_their_host_and_are_redacted_from_the_answer(
    redis: Redis, keys: RedisKeys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = echo_headers(monkeypatch)
    base = "http://127.0.0.1:8080"
    fetch = registry.http_get(True, frozenset({"127.0.0.1"}), 10_000, 5.0, {"127.0.0.1:8080": {"Authorization": SecretStr(SECRET)}})
    d = replace(deps(redis, keys, tmp_path, http_get=fetch), redact=Redactor([SECRET]))
    out = result(await logic.execute(d, request("http_get", {"url": f"{base}/whoami"}, kind="browser")))
    ctx = registry.CallContext("acme", "g1", "g1.w1", "k")
    elsewhere = registry.http_get(True, frozenset({"127.0.0.1"}), 10_000, 5.0, {"api.example.com": {"Authorization": SecretStr(SECRET)}})
    await elsewhere.run(HttpGetArgs(url=f"{base}/other"), ctx)
    await fetch.run(HttpGetArgs(url="http://127.0.0.1:9999/other-port"), ctx)
    on_default_port = registry.http_get(True, frozenset({"127.0.0.1"}), 10_000, 5.0, {"127.0.0.1": {"Authorization": SecretStr(SECRET)}})
    await on_default_port.run(HttpGetArgs(url=f"{base}/not-the-default-port"), ctx)
    assert seen[0]["authorization"] == SECRET, "the executor sent its configured header"
    assert "authorization" not in seen[1], "a host's headers go to that host only"
    assert "authorization" not in seen[2], "... and to the port they were configured for only"
    assert "authorization" not in seen[3], "a bare host name means the scheme's default port"
    assert out.ok and SECRET not in out.output and "tok-0123456789abcdef" not in out.output
    assert "[REDACTED]" in out.output


def test_the_redactor_replaces_each_secret_and_its_credential() -> None:
    redact = Redactor([SECRET, "", "  "])
    assert redact(f"sent {SECRET} and tok-0123456789abcdef") == "sent [REDACTED] and [REDACTED]"
    assert redact("Bearer is an ordinary word") == "Bearer is an ordinary word"
    assert not Redactor([]) and Redactor([])("x") == "x"


def test_log_records_are_redacted_by_the_installed_filter() -> None:
    logger = logging.getLogger("unit.redaction")
    logger.propagate = False
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    uninstall = install_log_redaction(Redactor([SECRET]), logger)
    try:
        logger.warning("calling with %s", SECRET)
        try:
            raise RuntimeError(f"refused {SECRET}")
        except RuntimeError:
            logger.exception("failed")
        uninstall()
        logger.warning("after %s", "tok-0123456789abcdef")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "calling with [REDACTED]" in text and "RuntimeError: refused [REDACTED]" in text
    assert text.count("tok-0123456789abcdef") == 1, "only after the filter was removed"


async def test_a_page_longer_than_an_event_holds_is_cut_not_dead_lettered(redis: Redis, keys: RedisKeys, tmp_path: Path) -> None:
    with loopback_server([], ok_body=lambda _: b"y" * 150_000) as (base, _):
        big_pages = registry.http_get(True, frozenset({"127.0.0.1"}), 200_000, 5.0)  # the default TOOLS_HTTP_MAX_BYTES
        d = deps(redis, keys, tmp_path, http_get=big_pages)
        reply = result(await logic.execute(d, request("http_get", {"url": f"{base}/big"}, kind="browser")))
    assert reply.ok and len(reply.output) == MAX_TEXT and reply.output.endswith("[truncated]")


async def test_a_crash_that_names_a_secret_is_dead_lettered_with_the_secret_redacted(
    redis: Redis, keys: RedisKeys, tmp_path: Path
) -> None:
    async def leaky(args: ToolArgs, ctx: registry.CallContext) -> str:
        raise OSError(f"could not reach the API with {SECRET}")

    d = replace(deps(redis, keys, tmp_path, calculator=registry.Tool(leaky)), redact=Redactor([SECRET]))
    with pytest.raises(Permanent) as crashed:
        await logic.execute(d, calc())
    assert crashed.value.reason == "tool_failed" and SECRET not in str(crashed.value) and "[REDACTED]" in str(crashed.value)
