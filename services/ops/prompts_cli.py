"""`switchboard prompts`: every prompt's versions and their rollout, from the same files and
configuration (`SWITCHBOARD_PROMPT_ROLLOUT`, `SWITCHBOARD_AGENTS_DIR`) the services use."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from services.ops.terminal import console, echo_json, err
from services.runtime.errors import ConfigurationError
from services.runtime.prompts import Prompt, PromptLibrary, PromptRollout
from services.runtime.settings import PlatformSettings


def role_of(prompt: Prompt, rollout: PromptRollout) -> str:
    """`stable`, `canary 10%`, `draft`, or '' for an older version nobody gets."""
    if prompt == rollout.stable:
        return "stable"
    if prompt == rollout.canary:
        return f"canary {rollout.percent}%"
    return "draft" if prompt.draft else ""


def summary(library: PromptLibrary) -> list[dict[str, Any]]:
    """Per prompt name: its rollout and every version, oldest first."""
    listed = []
    for name in library.names():
        rollout = library.rollout(name)
        listed.append({
            "name": name,
            "stable": rollout.stable.version,
            "canary": rollout.canary.version if rollout.canary else None,
            "percent": rollout.percent if rollout.canary else 0,
            "versions": [
                {
                    "version": p.version, "draft": p.draft, "hash": p.digest, "size": len(p.text.encode()),
                    "path": str(p.path) if p.path else None, "serves": role_of(p, rollout),
                }
                for p in library.versions(name)
            ],
        })
    return listed


def shown_path(path: str | None) -> str:
    """Relative to the working directory when the file is under it, as a user would type it."""
    if not path:
        return ""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def prompts_table(listed: list[dict[str, Any]]) -> Table:
    table = Table(title="prompts", title_justify="left")
    for column in ("prompt", "version", "serves", "hash", "bytes"):
        table.add_column(column, no_wrap=True, justify="right" if column == "bytes" else "left")
    table.add_column("path", overflow="fold")
    for entry in listed:
        for i, v in enumerate(entry["versions"]):
            serves = v["serves"]
            style = "bold green" if serves == "stable" else "bold yellow" if serves.startswith("canary") else "dim"
            table.add_row(
                escape(entry["name"]) if i == 0 else "", v["version"], f"[{style}]{escape(serves or '-')}[/]",
                v["hash"], str(v["size"]), escape(shown_path(v["path"])),
            )
        table.add_section()
    return table


def prompts(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of a table.")] = False,
) -> None:
    """List every prompt, its versions (hash, size, file) and which version each goal gets.

    `stable` is what goals get unless they fall in the canary's share; `canary N%` is what the N%
    of goals whose bucket (BLAKE2b of "<prompt>:<goal_id>", modulo 100) is below N get. Without
    SWITCHBOARD_PROMPT_ROLLOUT, every prompt's stable version is its highest version that is not
    a draft (<name>.v<N>.draft.md), and there is no canary. Needs no Kafka: it reads the files and
    the configuration. Exits 2 when the configuration is wrong, as the services would at start-up.
    """
    try:
        library = PromptLibrary.configured(PlatformSettings().agents_dir)
    except ConfigurationError as exc:
        err.print(f"[red]{escape(str(exc))}[/]")
        raise typer.Exit(2) from exc
    listed = summary(library)
    if as_json:
        echo_json(listed)
        return
    console.print(prompts_table(listed))
    for entry in listed:
        if entry["canary"] and entry["percent"]:
            console.print(
                f"{escape(entry['name'])}: {entry['percent']}% of goals get {entry['canary']}, "
                f"the rest {entry['stable']}"
            )
