import random

import pytest
from pydantic import ValidationError

from services.runtime.latency import Latency
from services.runtime.settings import LLMSettings


@pytest.mark.parametrize(
    ("spec", "low", "high"),
    [("250", 250, 250), ("uniform:100:300", 100, 300), ("exponential:50", 0, float("inf")), ("normal:500:100", 0, float("inf"))],
)
def test_latency_specs_sample_within_their_range(spec: str, low: float, high: float) -> None:
    latency = Latency.parse(spec)
    samples = [latency.sample_ms(random.Random(seed)) for seed in range(200)]
    assert all(low <= s <= high for s in samples)


def test_a_distribution_varies_and_has_roughly_its_mean() -> None:
    rng = random.Random(1)
    samples = [Latency.parse("uniform:100:300").sample_ms(rng) for _ in range(2000)]
    assert len(set(samples)) > 1000
    assert 190 < sum(samples) / len(samples) < 210


@pytest.mark.parametrize("spec", ["fast", "uniform:300:100", "-5", "normal:1", "gamma:1:2"])
def test_a_bad_latency_setting_is_refused_with_the_accepted_forms(spec: str) -> None:
    with pytest.raises(ValidationError, match="uniform:<low>:<high>|non-negative"):
        LLMSettings(offline_latency_ms=spec)
