"""The PromQL an operator asks qaserve, in one place: the Grafana dashboard and the alert rules are generated from it.

`python deploy/monitoring.py` writes deploy/k8s/components/grafana-dashboard/qaserve.json and the PrometheusRule of
deploy/k8s/components/alerts; deploy/check.py fails when either differs from what this module generates, and
tests/deploy/test_prometheus.py runs every query against a real Prometheus scraping a real qaserve.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from grafana_foundation_sdk.builders.dashboard import Dashboard as DashboardBuilder
from grafana_foundation_sdk.builders.dashboard import DatasourceVariable, Row
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD_FILE = ROOT / "deploy" / "k8s" / "components" / "grafana-dashboard" / "qaserve.json"
RULE_FILE = ROOT / "deploy" / "k8s" / "components" / "alerts" / "prometheusrule.yaml"
PROMETHEUS_MISSING = "promtool/prometheus not found on PATH: `make prometheus` installs Debian's prometheus package"
# The window of every rate(): four scrapes at the ServiceMonitor's 15 s interval.
WINDOW = "1m"
# Process metrics carry no qaserve_ prefix: keep the series of the targets that also export qaserve_build_info.
QASERVE_TARGETS = "* on (instance, job) group_left qaserve_build_info"
ANSWER = '{method="Answer"}'
# gRPC codes that are the server's fault or its overload, not the caller's request.
SERVER_ERRORS = (
    'qaserve_request_duration_seconds_count{code=~"INTERNAL|UNKNOWN|UNAVAILABLE|DATA_LOSS|RESOURCE_EXHAUSTED"}'
)


def _rate(series: str, by: str = "") -> str:
    return f"sum{f' by ({by})' if by else ''} (rate({series}[{WINDOW}]))"


def _quantile(q: float, histogram: str, matchers: str = "") -> str:
    return f"histogram_quantile({q}, {_rate(f'{histogram}_bucket{matchers}', 'le')})"


def _mean(histogram: str, by: str) -> str:
    return f"{_rate(f'{histogram}_sum', by)} / {_rate(f'{histogram}_count', by)}"


@dataclass(frozen=True)
class Query:
    """One question an operator asks, as PromQL; `legend` names a series in the dashboard."""

    title: str
    expr: str
    unit: str
    legend: str = ""


# Dashboard rows: each panel is one query.
ROWS: dict[str, tuple[Query, ...]] = {
    "Traffic": (
        Query(
            "Requests by method and code",
            _rate("qaserve_request_duration_seconds_count", "method, code"),
            "reqps",
            "{{method}} {{code}}",
        ),
        Query("Errors by reason", _rate("qaserve_errors_total", "reason"), "reqps", "{{reason}}"),
        Query(
            "Server error ratio",
            # No server error yet is a ratio of 0, not no data.
            f"({_rate(SERVER_ERRORS)} or vector(0)) / {_rate('qaserve_request_duration_seconds_count')}",
            "percentunit",
        ),
        Query("Requests in flight", "sum by (method) (qaserve_requests_in_flight)", "short", "{{method}}"),
    ),
    "Latency": (
        Query("Answer p50", _quantile(0.5, "qaserve_request_duration_seconds", ANSWER), "s"),
        Query("Answer p99", _quantile(0.99, "qaserve_request_duration_seconds", ANSWER), "s"),
        *(
            Query(f"{phase} p{int(q * 100)}", _quantile(q, f"qaserve_{phase.lower()}_duration_seconds"), "s")
            for phase in ("Queue", "Tokenize", "Forward", "Decode")
            for q in (0.5, 0.99)
        ),
    ),
    "Batching": (
        Query("Windows queued per pod", "avg by (model) (qaserve_queue_depth_windows)", "short", "{{model}}"),
        Query("Windows per forward pass (mean)", _mean("qaserve_batch_windows", "model"), "short", "{{model}}"),
        Query(
            "Padding share of forward tokens (mean)",
            _mean("qaserve_padding_ratio", "model"),
            "percentunit",
            "{{model}}",
        ),
    ),
    "Cache": (
        Query(
            "Response cache hit ratio",
            f"{_rate('qaserve_response_cache_hits_total')} / ({_rate('qaserve_response_cache_hits_total')} + "
            f"{_rate('qaserve_response_cache_misses_total')})",
            "percentunit",
        ),
        Query("Response cache bytes", "sum(qaserve_response_cache_bytes)", "bytes"),
        # Totals, not rates: a model's first miss creates its series, and rate() needs two samples of one series.
        Query(
            "Requests that waited for a model load, since start",
            "sum by (model) (qaserve_model_cache_misses_total)",
            "short",
            "{{model}}",
        ),
    ),
    "Models": (
        Query("Models by state", "sum by (state) (qaserve_model_state)", "short", "{{state}}"),
        Query("Models failed", 'max by (model) (qaserve_model_state{state="failed"})', "short", "{{model}}"),
        Query("Model bytes by device", "sum by (device) (qaserve_model_bytes)", "bytes", "{{device}}"),
    ),
    # What deploy/k8s/components/keda scales on: totals over the pods of the qaserve Service's job (KEDA divides by
    # the pod count).
    "Scaling": (
        Query("Requests in flight, all pods", 'sum(qaserve_requests_in_flight{job="qaserve"})', "short"),
        Query("Windows queued, all pods", 'sum(qaserve_queue_depth_windows{job="qaserve"})', "short"),
    ),
    "Process": (
        Query("Resident memory", f"process_resident_memory_bytes {QASERVE_TARGETS}", "bytes", "{{instance}}"),
        Query("CPU", f"rate(process_cpu_seconds_total[{WINDOW}]) {QASERVE_TARGETS}", "short", "{{instance}}"),
        Query(
            "Restarts in 15 minutes",
            f"changes(process_start_time_seconds[15m]) {QASERVE_TARGETS}",
            "short",
            "{{instance}}",
        ),
    ),
}
QUERIES = {query.title: query for row in ROWS.values() for query in row}


@dataclass(frozen=True)
class Alert:
    """An alert: one dashboard query and the condition on it that pages (or warns) for `duration`."""

    name: str
    query: str  # a title in QUERIES
    condition: str
    duration: str
    severity: str
    summary: str

    @property
    def expr(self) -> str:
        return f"{QUERIES[self.query].expr} {self.condition}"


ALERTS = (
    Alert("QAServeServerErrors", "Server error ratio", "> 0.05", "5m", "critical",
          "More than 5% of qaserve requests end in a server-side error"),
    Alert("QAServeAnswerLatencyHigh", "Answer p99", "> 1", "10m", "warning",
          "qaserve's Answer p99 latency is over 1 s"),
    Alert("QAServeQueueSustained", "Windows queued per pod", "> 32", "10m", "warning",
          "{{ $labels.model }}: more than a full batch of windows waits per pod; scale out"),
    Alert("QAServeModelFailed", "Models failed", "> 0", "1m", "critical",
          "Model {{ $labels.model }} failed to load"),
    Alert("QAServeRestarting", "Restarts in 15 minutes", "> 2", "0m", "warning",
          "qaserve at {{ $labels.instance }} restarted more than twice in 15 minutes"),
)  # fmt: skip


def dashboard() -> dict[str, Any]:
    """The Grafana dashboard: one row per ROWS entry, one time series panel per query."""
    source = DataSourceRef(type_val="prometheus", uid="${datasource}")
    builder = (
        DashboardBuilder("qaserve")
        .uid("qaserve")
        .tags(["qaserve"])
        .refresh("30s")
        .time("now-1h", "now")
        .with_variable(DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
    )
    ids = itertools.count(1)
    for row, queries in ROWS.items():
        builder = builder.with_row(Row(row).id(next(ids)))
        for query in queries:
            target = Dataquery().expr(query.expr).ref_id("A").datasource(source)
            if query.legend:
                target = target.legend_format(query.legend)
            builder = builder.with_panel(
                Timeseries()
                .id(next(ids))
                .title(query.title)
                .unit(query.unit)
                .datasource(source)
                .span(8)
                .height(8)
                .with_target(target)
            )
    encoded: dict[str, Any] = json.loads(json.dumps(builder.build(), cls=JSONEncoder))
    return encoded


def prometheus_rule() -> dict[str, Any]:
    """The PrometheusRule (Prometheus Operator) holding ALERTS."""
    rules = [
        {
            "alert": alert.name,
            "expr": alert.expr,
            "for": alert.duration,
            "labels": {"severity": alert.severity},
            "annotations": {"summary": alert.summary},
        }
        for alert in ALERTS
    ]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "qaserve", "labels": {"app.kubernetes.io/name": "qaserve"}},
        "spec": {"groups": [{"name": "qaserve", "rules": rules}]},
    }


def generated() -> dict[Path, str]:
    """The files this module writes, by path."""
    header = "# Generated by deploy/monitoring.py from its ALERTS (python deploy/monitoring.py); do not edit.\n"
    return {
        DASHBOARD_FILE: json.dumps(dashboard(), indent=2, sort_keys=True) + "\n",
        RULE_FILE: header + yaml.safe_dump(prometheus_rule(), sort_keys=False, width=120),
    }


def stale_files() -> list[str]:
    """The generated files that differ from what this module generates now."""
    return [
        f"{path.relative_to(ROOT)}: out of date (python deploy/monitoring.py)"
        for path, text in generated().items()
        if not path.is_file() or path.read_text(encoding="utf-8") != text
    ]


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Runs Prometheus's promtool; FileNotFoundError saying how to install it when it is missing."""
    binary = shutil.which("promtool")
    if binary is None:
        raise FileNotFoundError(PROMETHEUS_MISSING)
    return subprocess.run([binary, *args], capture_output=True, text=True, check=False, cwd=cwd)


def main() -> int:
    argparse.ArgumentParser(description=__doc__).parse_args()
    for path, text in generated().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
