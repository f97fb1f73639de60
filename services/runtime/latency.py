"""Simulated model latency for the offline model: a fixed value or a distribution, in milliseconds.

Specs: "500" (fixed), "uniform:200:800", "exponential:500" (mean), "normal:500:100" (mean, sd;
never below 0). Benchmarks and tests use it to get realistic slow calls without a provider.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

Kind = Literal["fixed", "uniform", "exponential", "normal"]


@dataclass(frozen=True)
class Latency:
    kind: Kind
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, spec: str | float) -> Latency:
        text = str(spec).strip()
        name, _, rest = text.partition(":")
        try:
            if not rest:
                return cls._checked("fixed", float(name))
            values = [float(v) for v in rest.split(":")]
            if name == "uniform" and len(values) == 2:
                return cls._checked("uniform", *values)
            if name == "exponential" and len(values) == 1:
                return cls._checked("exponential", values[0])
            if name == "normal" and len(values) == 2:
                return cls._checked("normal", *values)
        except ValueError:
            pass
        raise ValueError(
            f"latency {text!r} is not one of: <ms>, uniform:<low>:<high>, exponential:<mean>, normal:<mean>:<sd>"
        )

    @classmethod
    def _checked(cls, kind: Kind, a: float, b: float = 0.0) -> Latency:
        if a < 0 or b < 0 or (kind == "uniform" and b < a):
            raise ValueError(f"latency {kind} needs non-negative values (and low <= high), got {a}, {b}")
        return cls(kind, a, b)

    def sample_ms(self, rng: random.Random) -> float:
        if self.kind == "uniform":
            return rng.uniform(self.a, self.b)
        if self.kind == "exponential":
            return rng.expovariate(1 / self.a) if self.a else 0.0
        if self.kind == "normal":
            return max(0.0, rng.gauss(self.a, self.b))
        return self.a
