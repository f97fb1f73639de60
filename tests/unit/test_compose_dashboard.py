"""The compose monitoring stays true to the code: the dashboard's queries use only metrics and labels
the services and the lag exporter define, every panel uses the provisioned data source, and
Prometheus scrapes every Switchboard service of docker-compose.yml."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from schemas.events import GoalFailed, LLMCallRecorded
from services.ops.lag import GroupLag, LagStatus, PartitionLag
from services.ops.lag_cli import LagCollector
from services.runtime.metrics import Metrics

COMPOSE_DIR = Path(__file__).resolve().parents[2] / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
PROMETHEUS_CONFIG = COMPOSE_DIR / "prometheus" / "prometheus.yml"
GRAFANA_DIR = COMPOSE_DIR / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "switchboard.json"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA_DIR / "provisioning" / "dashboards" / "switchboard.yml"

PROMETHEUS_SERIES = {"up": set()}
"""Series Prometheus itself writes for every target."""
TARGET_LABELS = {"job", "instance"}
"""Labels Prometheus adds to every scraped series."""


# ---- what the code defines ----------------------------------------------------------------------


def _record_once(metrics: Metrics) -> None:
    """Calls every hook once, so that each labelled metric has a child and its labels show."""
    metrics.step("orchestrator", "goal.submitted", "ok", 0.1)
    metrics.dead_letter("orchestrator", "sb.goals", "poison")
    metrics.retry("orchestrator", "sb.goals", 1)
    metrics.llm_call(LLMCallRecorded(
        tenant="acme", goal_id="g1", purpose="step", agent="researcher", model="offline/default",
        prompt_version="v1", prompt_hash="h", messages=[], response={}, input_tokens=3, output_tokens=2,
        cost_usd=0.01, latency_ms=5.0, instance="test:1",
    ))
    metrics.llm_call(LLMCallRecorded(
        tenant="acme", goal_id="g1", purpose="step", agent="researcher", model="offline/default",
        prompt_version="v1", prompt_hash="h", messages=[], response={}, input_tokens=0, output_tokens=0,
        cost_usd=0.0, latency_ms=0.1, instance="test:1", cache_hit=True, saved_tokens=5, saved_cost_usd=0.01,
    ))
    metrics.tool_call("calculator", 0.2, "failed")
    metrics.circuit("calculator", "open")
    metrics.produced(GoalFailed(tenant="acme", goal_id="g1", reason="runaway_loop"))
    metrics.gateway_request("/goals/{goal_id}", "GET", 200)
    metrics.gateway_streams.set(1)
    metrics.gateway_events.inc()


def _lag_collector() -> LagCollector:
    collector = LagCollector()
    partition = PartitionLag(
        group="sb.tools", topic="sb.tools", partition=0, committed=5, end=7, lag_seconds=1.5, owner=None,
        status=LagStatus.WARN,
    )
    collector.groups = [GroupLag("sb.tools", "Stable", (partition,))]
    return collector


def _series_labels() -> dict[str, set[str]]:
    """Every series name the services and the lag exporter can serve, with its labels. A metric
    with labels but no samples yet is named by its family (with its type's suffixes), without labels."""
    metrics = Metrics()
    _record_once(metrics)
    families = [*metrics.registry.collect(), *_lag_collector().collect()]
    series: dict[str, set[str]] = {}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    for family in families:
        for suffix in suffixes.get(family.type, ("",)):
            series.setdefault(family.name + suffix, set())
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


KNOWN_SERIES = {**_series_labels(), **PROMETHEUS_SERIES}


# ---- what the dashboard and the configs say -----------------------------------------------------


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return dashboard


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _queries() -> Iterator[tuple[str, dict[str, Any]]]:
    for panel in _panels(_dashboard()["panels"]):
        for query in panel.get("targets", []):
            yield panel["title"], query


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_MATCHERS = re.compile(r"\{([^}]*)\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_NUMBER = re.compile(r"(?<![\w:])\d[\w.]*")
_IDENTIFIER = re.compile(r"[A-Za-z_:][\w:]*")
_KEYWORDS = {"offset", "bool", "and", "or", "unless", "inf", "nan", "atan2", "by", "without", "on", "ignoring", "group_left", "group_right"}


def parse_promql(expr: str) -> tuple[set[str], set[str]]:
    """The metric names and label names an expression uses: enough PromQL for the dashboard's
    queries (selectors, matchers, ranges, aggregations with by/without, arithmetic)."""
    text = _VARIABLE.sub("", _STRING.sub('""', expr))
    labels: set[str] = set()
    for matchers in _MATCHERS.findall(text):
        labels.update(m.group() for part in matchers.split(",") if (m := _IDENTIFIER.match(part.strip())))
    for grouping in _GROUPING.findall(text):
        labels.update(name.strip() for name in grouping.split(",") if name.strip())
    text = _NUMBER.sub(" ", _RANGE.sub(" ", _GROUPING.sub(" ", _MATCHERS.sub(" ", text))))
    metrics = {
        m.group() for m in _IDENTIFIER.finditer(text)
        if m.group().lower() not in _KEYWORDS and not text[m.end():].lstrip().startswith("(")
    }
    return metrics, labels


def test_parse_promql_finds_metrics_and_labels() -> None:
    metrics, labels = parse_promql(
        'histogram_quantile(0.95, sum by (service, le) (rate(switchboard_step_seconds_bucket{job="tools"}[$__rate_interval]))) '
        "* 60 + on (tool) group_left max(up offset 5m)"
    )
    assert metrics == {"switchboard_step_seconds_bucket", "up"}
    assert labels == {"service", "le", "job", "tool"}


# ---- the dashboard ------------------------------------------------------------------------------


def test_every_dashboard_query_uses_metrics_the_code_defines() -> None:
    unknown = {
        (title, name)
        for title, query in _queries()
        for name in parse_promql(query["expr"])[0]
        if name not in KNOWN_SERIES
    }
    assert not unknown, f"metrics neither services/runtime/metrics.py nor the lag exporter define: {sorted(unknown)}"


def test_every_dashboard_query_groups_and_filters_by_labels_its_metrics_have() -> None:
    wrong = []
    for title, query in _queries():
        metrics, labels = parse_promql(query["expr"])
        known = set(TARGET_LABELS).union(*(KNOWN_SERIES.get(name, set()) for name in metrics))
        legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", query.get("legendFormat", "")))
        if (labels | legend) - known:
            wrong.append((title, query["refId"], sorted((labels | legend) - known)))
    assert not wrong, f"labels the query's metrics do not have: {wrong}"


def test_every_dashboard_query_has_a_metric() -> None:
    empty = [(title, query.get("refId")) for title, query in _queries() if not parse_promql(query.get("expr", ""))[0]]
    assert not empty


def test_the_dashboard_covers_every_switchboard_metric() -> None:
    """A metric added to the code shows up here until it gets a panel (or is listed as left out)."""
    used = {name for _, query in _queries() for name in parse_promql(query["expr"])[0]}
    families = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in used}
    defined = {re.sub(r"_(total|bucket|sum|count|created)$", "", name) for name in KNOWN_SERIES if name.startswith("switchboard_")}
    assert defined - families == set()


def test_every_panel_uses_the_provisioned_data_source() -> None:
    (datasource,) = _load_yaml(DATASOURCES)["datasources"]
    wrong = []
    for panel in _panels(_dashboard()["panels"]):
        if panel["type"] == "row":
            continue
        refs = [panel.get("datasource"), *(query.get("datasource") for query in panel.get("targets", []))]
        if any(ref != {"type": datasource["type"], "uid": datasource["uid"]} for ref in refs):
            wrong.append(panel["title"])
    assert not wrong, f"panels not on data source uid {datasource['uid']!r}: {wrong}"


def test_dashboard_panels_have_unique_ids_and_a_place_on_the_grid() -> None:
    panels = list(_panels(_dashboard()["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]


# ---- compose and Prometheus ---------------------------------------------------------------------


def _services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = _load_yaml(COMPOSE_FILE)["services"]
    return services


def _switchboard_services() -> dict[str, dict[str, Any]]:
    """The services built from compose/Dockerfile: the roles, and the lag exporter."""
    return {
        name: service for name, service in _services().items()
        if isinstance(service.get("build"), dict) and service["build"].get("dockerfile") == "compose/Dockerfile"
    }


def _scrape_targets(job: dict[str, Any]) -> set[tuple[str, int]]:
    targets = set()
    for sd in job.get("dns_sd_configs", []):
        assert sd.get("type", "SRV") == "A", f"{job['job_name']}: an A lookup finds every replica"
        targets.update((name, int(sd["port"])) for name in sd["names"])
    for static in job.get("static_configs", []):
        for target in static["targets"]:
            host, port = target.rsplit(":", 1)
            targets.add((host, int(port)))
    return targets


def test_prometheus_scrapes_every_switchboard_service_in_a_job_named_after_it() -> None:
    jobs = {job["job_name"]: _scrape_targets(job) for job in _load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]}
    services = _switchboard_services()
    assert {"orchestrator", "agent-researcher", "agent-writer", "tools", "memory", "lag-exporter"} <= services.keys()
    for name, service in services.items():
        (port,) = (int(p) for p in service["expose"])
        assert jobs.get(name) == {(name, port)}, f"{name}: expected a job {name!r} scraping {name}:{port}"


def test_the_lag_exporter_serves_the_port_it_exposes() -> None:
    exporter = _services()["lag-exporter"]
    command = exporter["command"]
    assert command[:1] == ["lag"]
    assert command[command.index("--serve") + 1] == "9465" and exporter["expose"] == ["9465"]


def _bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path, for the volumes that are paths in the repository."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            mounts[target] = (COMPOSE_DIR / source).resolve()
    return mounts


@pytest.mark.parametrize("service", ["prometheus", "grafana"])
def test_mounted_config_exists_in_the_repository(service: str) -> None:
    mounts = _bind_mounts(_services()[service])
    assert mounts
    missing = [str(path) for path in mounts.values() if not path.exists()]
    assert not missing


def test_prometheus_reads_the_mounted_config() -> None:
    prometheus = _services()["prometheus"]
    (flag,) = [arg for arg in prometheus["command"] if arg.startswith("--config.file=")]
    assert _bind_mounts(prometheus)[flag.split("=", 1)[1]] == PROMETHEUS_CONFIG


def test_grafana_provisions_the_data_source_and_the_dashboard_folder_compose_mounts() -> None:
    mounts = _bind_mounts(_services()["grafana"])
    assert mounts["/etc/grafana/provisioning"] == GRAFANA_DIR / "provisioning"
    (provider,) = _load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert provider["type"] == "file"
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent
    (datasource,) = _load_yaml(DATASOURCES)["datasources"]
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in _services()
