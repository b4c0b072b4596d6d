"""A real Prometheus scrapes a real `qaserve serve` under a short load and answers every dashboard and alert query;
promtool checks the alert rules and runs their unit tests (tests/deploy/alert_rules_test.yaml)."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from qaserve.config import EMBEDDED_MODEL
from qaserve_client import QAClient, QAServeError

from qaserve_testing import SEED_CONTEXT, SEED_QUESTION, eventually, free_port, start_qaserve, wait_serving

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "deploy"))
import monitoring  # noqa: E402  (deploy/monitoring.py)

LOAD_SECONDS = 6.0


def _rules_file(directory: Path) -> Path:
    """The PrometheusRule's spec, as the plain rule file Prometheus and promtool read."""
    spec = yaml.safe_load(monitoring.RULE_FILE.read_text(encoding="utf-8"))["spec"]
    path = directory / "rules.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
async def qaserve(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[str, int]]:
    """`qaserve serve` with the embedded model twice: preloaded, and loaded on first use. Yields (target, metrics)."""
    directory = tmp_path_factory.mktemp("qaserve")
    models = directory / "models.toml"
    models.write_text(
        f'default = "embedded"\n[[models]]\nname = "embedded"\nsource = "{EMBEDDED_MODEL}"\npreload = true\n'
        f'[[models]]\nname = "on-demand"\nsource = "{EMBEDDED_MODEL}"\n',
        encoding="utf-8",
    )
    port, metrics_port = free_port(), free_port()
    process = await start_qaserve(
        "serve", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port),
        "--models-config", str(models),
    )  # fmt: skip
    target = f"127.0.0.1:{port}"
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            await wait_serving(channel, process, 120)
        yield target, metrics_port
    finally:
        process.terminate()
        await process.wait()


@pytest.fixture(scope="module")
async def prometheus(qaserve: tuple[str, int], tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """A Prometheus scraping qaserve every second, with the alert rules loaded. Yields its base URL."""
    binary = shutil.which("prometheus")
    assert binary is not None, monitoring.PROMETHEUS_MISSING
    directory = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(_rules_file(directory))],
        "scrape_configs": [{"job_name": "qaserve", "static_configs": [{"targets": [f"127.0.0.1:{qaserve[1]}"]}]}],
    }
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    address = f"127.0.0.1:{free_port()}"
    process = await asyncio.create_subprocess_exec(
        binary, f"--config.file={directory / 'prometheus.yml'}", f"--storage.tsdb.path={directory / 'data'}",
        f"--web.listen-address={address}", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://{address}"
    try:
        await eventually(lambda: _ready(url, process), "Prometheus to be ready", 60, every=0.25)
        yield url
    finally:
        process.terminate()
        await process.wait()


def _ready(url: str, process: asyncio.subprocess.Process) -> bool:
    assert process.returncode is None, "prometheus exited"
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _api(url: str, path: str, **params: str) -> Any:
    with urllib.request.urlopen(f"{url}/api/v1/{path}?{urllib.parse.urlencode(params)}", timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]


def _labels(**labels: str) -> str:
    return json.dumps(labels, sort_keys=True)


def _query(url: str, expr: str) -> dict[str, float]:
    """An instant query's samples: their labels (as _labels writes them) to their values."""
    return {_labels(**r["metric"]): float(r["value"][1]) for r in _api(url, "query", query=expr)["result"]}


@pytest.fixture(scope="module")
async def loaded(qaserve: tuple[str, int], prometheus: str) -> str:
    """Once Prometheus scrapes qaserve, runs the load (4 callers, both models, every tenth question blank, every
    third a repeat the response cache answers), then waits until Prometheus has scraped all of it."""
    target = qaserve[0]
    await eventually(lambda: _query(prometheus, 'up{job="qaserve"}') != {}, "a scrape of qaserve", 30, every=0.25)

    def caller(index: int) -> int:
        sent = 0
        with QAClient(target) as client:
            deadline = time.monotonic() + LOAD_SECONDS
            while time.monotonic() < deadline:
                sent += 1
                if sent % 10 == 0:
                    with pytest.raises(QAServeError):
                        client.answer(" ", SEED_CONTEXT)
                    continue
                model = "on-demand" if sent % 5 == 0 else "embedded"
                question = SEED_QUESTION if sent % 3 == 0 else f"{SEED_QUESTION} ({index}, {sent})"
                client.answer(question, SEED_CONTEXT, model=model)
        return sent

    def load() -> int:
        with ThreadPoolExecutor(4) as pool:
            return sum(pool.map(caller, range(4)))

    sent = await asyncio.to_thread(load)
    counted = 'sum(qaserve_request_duration_seconds_count{method="Answer"})'
    await eventually(
        lambda: _query(prometheus, counted).get("{}") == sent, f"all {sent} requests counted", 30, every=0.25
    )
    return prometheus


@pytest.mark.parametrize("title", sorted(monitoring.QUERIES))
def test_every_dashboard_query_answers_from_the_scraped_server(loaded: str, title: str) -> None:
    samples = _query(loaded, monitoring.QUERIES[title].expr)
    assert samples, f"{title}: no series"
    assert not any(math.isnan(v) for v in samples.values()), f"{title}: {samples}"


def test_the_answers_describe_the_load(loaded: str) -> None:
    def one(title: str) -> float:
        (value,) = _query(loaded, monitoring.QUERIES[title].expr).values()
        return value

    rates = _query(loaded, monitoring.QUERIES["Requests by method and code"].expr)
    assert rates[_labels(code="OK", method="Answer")] > 0
    assert rates[_labels(code="INVALID_ARGUMENT", method="Answer")] > 0
    errors = _query(loaded, monitoring.QUERIES["Errors by reason"].expr)
    assert {reason for reason, rate in errors.items() if rate > 0} == {_labels(reason="INVALID_ARGUMENT")}
    assert errors[_labels(reason="OVERLOADED")] == 0  # a reason not seen yet reads 0, not no data
    assert one("Server error ratio") == 0
    assert 0 < one("Answer p50") <= one("Answer p99")
    assert 0 < one("Response cache hit ratio") < 1
    states = _query(loaded, monitoring.QUERIES["Models by state"].expr)
    assert states[_labels(state="ready")] == 2 and states[_labels(state="failed")] == 0
    waited = _query(loaded, monitoring.QUERIES["Requests that waited for a model load, since start"].expr)
    assert waited[_labels(model="on-demand")] >= 1


def test_no_created_series_is_scraped(loaded: str) -> None:
    assert _query(loaded, 'count({job="qaserve", __name__=~".+_created"})') == {}


def test_the_alert_rules_load_and_evaluate_without_errors(loaded: str) -> None:
    groups = _api(loaded, "rules")["groups"]
    rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert set(rules) == {alert.name for alert in monitoring.ALERTS}
    for name, rule in rules.items():
        assert rule["health"] == "ok", (name, rule.get("lastError"))
        assert rule["state"] == "inactive", name  # a healthy server under a light load raises none


def test_promtool_checks_the_rules_and_passes_their_unit_tests(tmp_path: Path) -> None:
    _rules_file(tmp_path)
    shutil.copy(Path(__file__).with_name("alert_rules_test.yaml"), tmp_path)
    checked = monitoring.promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = monitoring.promtool("test", "rules", "alert_rules_test.yaml", cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr
