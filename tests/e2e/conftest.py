"""End-to-end fixtures: every role as its own OS process, started with the `switchboard` CLI."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.deployment import Deployment, make_deployment

__all__ = ["Deployment", "make_deployment"]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """The walking skeleton's roles, with two researcher replicas."""
    d = make_deployment(tmp_path_factory.mktemp("deployment"))
    d.start("orchestrator", "orchestrator")
    d.start("researcher-1", "agent", "--kind", "researcher")
    d.start("researcher-2", "agent", "--kind", "researcher")
    d.start("writer", "agent", "--kind", "writer")
    d.start("tools", "tools")
    d.start("memory", "memory")
    try:
        d.wait_for_members({"orchestrator": 1, "agent.researcher": 2, "agent.writer": 1, "tools": 1, "memory": 1, "memory-recorder": 1})
        yield d
        d.assert_alive()
    finally:
        d.stop()
