"""Shared test set-up: tier markers by folder, and a guard that makes real model calls fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.runtime.llm import LLMGateway

TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(autouse=True)
def _no_real_model_calls() -> None:
    """Like pydantic-ai's ALLOW_MODEL_REQUESTS = False: only the offline model may answer."""
    LLMGateway.allow_real_models = False
