"""The embedded default: every service in one process on the in-process bus, as `switchboard run` uses it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.ops.cli import app


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SWITCHBOARD_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    return tmp_path


def test_switchboard_run_completes_a_goal_and_shows_its_progress(data_dir: Path) -> None:
    result = CliRunner().invoke(app, ["run", "What is 12*7 and what is Apache Kafka?"])
    assert result.exit_code == 0, result.output
    out = result.output
    for shown in ("plan", "assigned to researcher", "assigned to writer", "calls calculator", "memory", "final answer"):
        assert shown in out
    answer = out.split("final answer", 1)[1]
    assert "84" in answer and "distributed event log" in answer
    notes = (data_dir / "sandbox" / "default" / "notes.jsonl").read_text().splitlines()
    assert len(notes) == 1 and "12*7 = 84" in json.loads(notes[0])["body"]


def test_a_second_run_recalls_the_first_runs_outcomes(data_dir: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["run", "What is 6*7"]).exit_code == 0
    second = runner.invoke(app, ["run", "What is 6*7"])
    assert second.exit_code == 0
    assert "6*7 = 42" in second.output.split("recalls", 1)[1]


def test_run_without_a_goal_explains_usage() -> None:
    result = CliRunner().invoke(app, ["run"])
    assert result.exit_code == 2
    assert "Missing argument" in result.output


def test_a_goal_run_with_a_lower_step_limit_fails_on_it_and_says_by_how_much(data_dir: Path) -> None:
    result = CliRunner().invoke(app, ["run", "--max-steps", "2", "What is 12*7 and what is Apache Kafka?"])
    assert result.exit_code == 1, result.output
    out = result.output
    assert "budget: max_steps=2," in out, "the plan runs under the limit asked for"
    failed = out.split("goal failed", 1)[1]
    assert "budget_exceeded (limit 2, spent 2)" in failed
    assert "final answer" not in out


@pytest.mark.parametrize(
    ("command", "refused"),
    [
        (["run", "--max-tokens", "0"], "Invalid value for --max-tokens: input should be greater than or equal to 1 (got 0)"),
        (["goal", "submit", "--max-cost", "0"], "Invalid value for --max-cost: input should be greater than 0 (got 0.0)"),
    ],
)
def test_a_budget_the_limits_refuse_is_a_usage_error_naming_the_option(data_dir: Path, command: list[str], refused: str) -> None:
    result = CliRunner().invoke(app, [*command, "What is 6*7"])
    assert result.exit_code == 2
    said = " ".join(result.output.replace("│", " ").split())  # the error panel wraps at the terminal width
    assert refused in said
    assert list(data_dir.iterdir()) == [], "refused before anything started (a run opens its stores there)"


@pytest.mark.parametrize(("args", "named"), [(["run", ""], "GOAL"), (["run", "hi", "--tenant", "a b"], "--tenant")])
def test_a_bad_goal_or_tenant_is_a_usage_error_naming_it(args: list[str], named: str) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert f"Invalid value for {named}" in result.output
