"""A deployment of Switchboard roles as separate OS processes, started with the `switchboard` CLI."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from services.runtime.settings import KafkaSettings, RedisSettings
from tests.support.kafka import eventually, group_members, unique

SWITCHBOARD = str(Path(sys.executable).parent / "switchboard")


@dataclass
class Deployment:
    """Services as separate processes sharing one namespace, Kafka and Redis."""

    root: Path
    env: dict[str, str]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return self.env["SWITCHBOARD_NAMESPACE"]

    @property
    def kafka(self) -> KafkaSettings:
        return KafkaSettings(bootstrap_servers=self.env["KAFKA_BOOTSTRAP_SERVERS"])

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def start(self, name: str, *args: str, **env: str) -> None:
        with self.log(name).open("ab") as out:
            self.processes[name] = subprocess.Popen(
                [SWITCHBOARD, "serve", *args], env={**self.env, **env}, stdout=out, stderr=subprocess.STDOUT,
            )

    def kill(self, name: str) -> None:
        process = self.processes.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def assert_alive(self) -> None:
        dead = {n: p.returncode for n, p in self.processes.items() if p.poll() is not None}
        assert not dead, f"services exited: {dead}; see logs in {self.root}"

    def stop(self) -> None:
        for process in self.processes.values():
            process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        self.processes.clear()

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SWITCHBOARD, *args], env={**self.env, "COLUMNS": "200"}, capture_output=True, text=True, timeout=timeout
        )

    async def members(self, group: str) -> int:
        return await group_members(self.kafka, f"{self.namespace}.{group}")

    async def members_settled(self, expected: dict[str, int], timeout: float = 120) -> None:
        """Wait until every consumer group has its members and a settled assignment."""

        async def settled() -> bool:
            self.assert_alive()
            counts = [await self.members(group) for group in expected]
            return counts == list(expected.values())

        await eventually(settled, timeout=timeout, interval=0.5)

    def wait_for_members(self, expected: dict[str, int], timeout: float = 120) -> None:
        asyncio.run(self.members_settled(expected, timeout))


def make_deployment(
    root: Path, partitions: int = 4, kafka: str | None = None, redis: str | None = None, **extra: str
) -> Deployment:
    """Services on the given Kafka and Redis; by default the ones the test run was pointed at."""
    kafka, redis = kafka or KafkaSettings().bootstrap_servers, redis or RedisSettings().url
    if not kafka or not redis:
        raise RuntimeError("this needs real Kafka and Redis: run it through `make test` or `make bench`")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SWITCHBOARD_", "AGENT_", "LLM_", "TOOLS_", "MEMORY_"))},
        "KAFKA_BOOTSTRAP_SERVERS": kafka,
        "REDIS_URL": redis,
        "SWITCHBOARD_NAMESPACE": unique("e2e"),
        "SWITCHBOARD_DATA_DIR": str(root / "data"),
        "SWITCHBOARD_PARTITIONS": str(partitions),
        "QDRANT_PATH": str(root / "qdrant"),
        "KAFKA_SESSION_TIMEOUT_MS": "6000",
        "KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
        # Every process here would take the default metrics port 9464 and all but one would exit;
        # a test that scrapes one passes SWITCHBOARD_METRICS_PORT to `start` for that process.
        "SWITCHBOARD_METRICS_PORT": "0",
        **extra,
    }
    return Deployment(root, env)


