"""A private Kafka and Redis for one test module, run by compose/local/infra.sh on ports of its own.

Tests that restart the servers use it, so they never touch the shared servers other tests run on.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

INFRA_SH = Path(__file__).resolve().parents[2] / "compose" / "local" / "infra.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class PrivateInfra:
    """Kafka and Redis under `state`, managed by infra.sh: up, restart-kafka, restart-redis, down."""

    state: Path
    kafka_port: int = field(default_factory=free_port)
    controller_port: int = field(default_factory=free_port)
    redis_port: int = field(default_factory=free_port)

    @property
    def kafka(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def redis(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def env(self) -> dict[str, str]:
        # infra.sh leaves servers alone when these name existing ones: these are the shared ones.
        inherited = {k: v for k, v in os.environ.items() if k not in ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL")}
        return {
            **inherited,
            "SWITCHBOARD_STATE": str(self.state),
            "KAFKA_PORT": str(self.kafka_port),
            "KAFKA_CONTROLLER_PORT": str(self.controller_port),
            "REDIS_PORT": str(self.redis_port),
        }

    def run(self, command: str, timeout: float = 300) -> None:
        result = subprocess.run(
            ["bash", str(INFRA_SH), command], env=self.env(), capture_output=True, text=True, timeout=timeout
        )
        assert result.returncode == 0, f"infra.sh {command} exited {result.returncode}:\n{result.stderr}"

    def up(self) -> None:
        self.run("up")

    def down(self) -> None:
        self.run("down")

    def restart_kafka(self) -> None:
        self.run("restart-kafka")

    def restart_redis(self) -> None:
        self.run("restart-redis")
