"""Prompt versions and their rollout: the goal's bucket, the split, rollback, bad configuration,
and `switchboard prompts`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.ops.cli import app
from services.runtime.catalogue import PACKAGED_PROMPTS
from services.runtime.errors import ConfigurationError
from services.runtime.offline_model import role_of
from services.runtime.prompts import PromptLibrary, PromptSettings, Rollout, bucket

GOALS = [f"g-{i:05d}" for i in range(2_000)]


def library(percent: int, canary: str | None = "v2", stable: str | None = None) -> PromptLibrary:
    return PromptLibrary(PACKAGED_PROMPTS, rollout={"researcher": Rollout(stable=stable, canary=canary, percent=percent)})


def test_the_bucket_is_a_stable_hash_of_prompt_and_goal() -> None:
    # Pinned: a change here moves goals between versions in a running rollout.
    assert [bucket("researcher", g) for g in ("g-1", "g-2", "g-3")] == [bucket("researcher", g) for g in ("g-1", "g-2", "g-3")]
    assert bucket("researcher", "g-00000") == 84
    assert all(0 <= bucket("researcher", g) < 100 for g in GOALS)
    # Each prompt's canary falls on its own share of goals.
    assert [bucket("researcher", g) for g in GOALS] != [bucket("writer", g) for g in GOALS]


def test_a_50_percent_rollout_splits_goals_about_evenly_and_each_goal_keeps_its_version() -> None:
    prompts = library(50)
    versions = [prompts.for_goal("researcher", g).version for g in GOALS]
    share = versions.count("v2") / len(GOALS)
    assert 0.45 <= share <= 0.55, share
    # The same goal gets the same version every time, and from another process's library too.
    again = library(50)
    assert [again.for_goal("researcher", g).version for g in GOALS] == versions
    assert versions == ["v2" if bucket("researcher", g) < 50 else "v1" for g in GOALS]


def test_the_canary_share_grows_with_the_percent_and_keeps_its_goals() -> None:
    at_10 = {g for g in GOALS if library(10).for_goal("researcher", g).version == "v2"}
    at_50 = {g for g in GOALS if library(50).for_goal("researcher", g).version == "v2"}
    assert at_10 < at_50, "raising the percent only adds goals to the canary"
    assert 0.07 <= len(at_10) / len(GOALS) <= 0.13


@pytest.mark.parametrize(("percent", "expected"), [(0, {"v1"}), (100, {"v2"})])
def test_0_and_100_percent_give_every_goal_one_version(percent: int, expected: set[str]) -> None:
    assert {library(percent).for_goal("researcher", g).version for g in GOALS} == expected


def test_rollback_by_configuration_sends_every_goal_back_to_stable() -> None:
    assert {library(0).for_goal("researcher", g).version for g in GOALS} == {"v1"}
    assert {library(0, canary=None).for_goal("researcher", g).version for g in GOALS} == {"v1"}
    promoted = library(0, canary=None, stable="v2")
    assert {promoted.for_goal("researcher", g).version for g in GOALS} == {"v2"}


def test_without_configuration_the_stable_version_is_the_highest_that_is_not_a_draft() -> None:
    prompts = PromptLibrary(PACKAGED_PROMPTS)
    assert [(p.version, p.draft) for p in prompts.versions("researcher")] == [("v1", False), ("v2", True)]
    assert prompts.latest("researcher").version == "v1"
    assert {prompts.for_goal("researcher", g).label for g in GOALS[:200]} == {"researcher.v1"}


def test_the_draft_keeps_the_role_line_the_offline_model_reads() -> None:
    v2 = library(100).for_goal("researcher", "g-1")
    assert v2.draft and role_of([{"role": "system", "content": v2.text}]) == "agent"


def test_a_released_file_of_a_higher_version_becomes_stable(tmp_path: Path) -> None:
    (tmp_path / "researcher.v3.md").write_text("role: agent\nA custom researcher.\n")
    prompts = PromptLibrary(PACKAGED_PROMPTS, tmp_path)
    assert prompts.latest("researcher").version == "v3"


@pytest.mark.parametrize(
    ("rollout", "message"),
    [
        ({"reseacher": Rollout(canary="v2", percent=5)}, "names prompt(s) reseacher that have no file"),
        ({"researcher": Rollout(canary="v9", percent=5)}, "canary version v9 of prompt 'researcher' has no file; known: v1, v2"),
        ({"researcher": Rollout(stable="v7")}, "stable version v7"),
        ({"researcher": Rollout(percent=5)}, "percent 5 but no canary"),
    ],
)
def test_a_rollout_naming_what_does_not_exist_fails_at_start_up(rollout: dict[str, Rollout], message: str) -> None:
    with pytest.raises(ConfigurationError, match="SWITCHBOARD_PROMPT_ROLLOUT") as raised:
        PromptLibrary(PACKAGED_PROMPTS, rollout=rollout)
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('{"researcher": {"canary": "v2", "percent": 101}}', "researcher.percent: Input should be less than or equal to 100"),
        ('{"researcher": {"canary": "v2", "percent": -1}}', "researcher.percent: Input should be greater than or equal to 0"),
        ('{"researcher": {"canary": "two"}}', "researcher.canary: 'two' is not a version such as v2"),
        ('{"researcher": {"canry": "v2"}}', "researcher.canry: Extra inputs are not permitted"),
        ('{"researcher": ', "not JSON"),
    ],
)
def test_a_malformed_setting_is_a_configuration_error_naming_it(monkeypatch: pytest.MonkeyPatch, value: str, message: str) -> None:
    monkeypatch.setenv("SWITCHBOARD_PROMPT_ROLLOUT", value)
    with pytest.raises(ConfigurationError, match="SWITCHBOARD_PROMPT_ROLLOUT is invalid") as raised:
        PromptSettings.load()
    assert message in str(raised.value)


def test_the_setting_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWITCHBOARD_PROMPT_ROLLOUT", '{"researcher": {"canary": "2", "percent": 50}}')
    prompts = PromptLibrary.configured()
    rollout = prompts.rollout("researcher")
    assert (rollout.stable.version, rollout.canary and rollout.canary.version, rollout.percent) == ("v1", "v2", 50)
    assert prompts.for_goal("planner", "g-1").label == "planner.v1"


def test_switchboard_prompts_lists_versions_and_rollout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWITCHBOARD_PROMPT_ROLLOUT", '{"researcher": {"stable": "v1", "canary": "v2", "percent": 25}}')
    result = CliRunner().invoke(app, ["prompts", "--json"])
    assert result.exit_code == 0, result.output
    listed = {entry["name"]: entry for entry in json.loads(result.output)}
    assert set(listed) == {"planner", "editor", "researcher", "writer"}
    researcher = listed["researcher"]
    assert (researcher["stable"], researcher["canary"], researcher["percent"]) == ("v1", "v2", 25)
    assert [(v["version"], v["serves"]) for v in researcher["versions"]] == [("v1", "stable"), ("v2", "canary 25%")]
    v2 = researcher["versions"][1]
    assert v2["path"].endswith("researcher.v2.draft.md") and v2["size"] == len(Path(v2["path"]).read_bytes())
    assert v2["hash"] == library(100).for_goal("researcher", "g-00000").digest
    assert listed["planner"]["canary"] is None and listed["planner"]["versions"][0]["serves"] == "stable"

    table = CliRunner().invoke(app, ["prompts"], env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    assert "canary 25%" in table.output and "researcher: 25% of goals get v2, the rest v1" in table.output


def test_switchboard_prompts_refuses_a_bad_configuration_like_the_services(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWITCHBOARD_PROMPT_ROLLOUT", '{"researcher": {"canary": "v3", "percent": 10}}')
    result = CliRunner().invoke(app, ["prompts"])
    assert result.exit_code == 2
    assert "canary version v3 of prompt 'researcher' has no file" in " ".join(result.output.split())
