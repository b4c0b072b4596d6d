"""/metrics through real servers: runtime collectors and build info over IPv6, model states, request sizes, overload."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import re
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from qaserve.config import parse_settings
from qaserve.errors import ModelFailed
from qaserve.metrics import MODEL_STATES, Metrics
from qaserve.runtime import ModelRegistry
from qaserve.runtime.model import ModelLoader, QAModel
from qaserve.runtime.spec import ModelSpec
from qaserve.server import QAServer
from qaserve_client.v1 import question_answering_pb2 as pb
from qaserve_client.v1 import question_answering_pb2_grpc as pb_grpc

from qaserve_testing import SEED_CONTEXT, SEED_QUESTION, eventually, in_process_server, tiny_settings

PATIENCE = 30.0
LONG_CONTEXT = " ".join(f"Sentence number {i} says that the river {i} flows north." for i in range(40))


def ipv6_loopback_port() -> int | None:
    """A free port on ::1, or None where the machine has no IPv6 loopback."""
    if not socket.has_ipv6:
        return None
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
            return int(s.getsockname()[1])
    except OSError:
        return None


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The samples a Prometheus scrape of `url` sees: (name, labels) -> value."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


# -- settings -----------------------------------------------------------------------------------------------------


def test_metrics_port_defaults_to_9464_and_host_to_the_grpc_host() -> None:
    settings = parse_settings([], environ={})
    assert settings.metrics_port == 9464  # 9090 is the Prometheus server's own
    assert settings.metrics_host == ""
    assert parse_settings(["--metrics-host", "::1"], environ={}).metrics_host == "::1"
    assert parse_settings([], environ={"QASERVE_METRICS_HOST": "[::1]"}).metrics_host == "[::1]"


# -- the listener over IPv6 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "metrics_host"),
    [("127.0.0.1", "::1"), ("127.0.0.1", "[::1]"), ("[::1]", "")],
    ids=["metrics-host", "bracketed-metrics-host", "follows-grpc-host"],
)
async def test_process_metrics_and_build_info_over_ipv6_loopback(
    tiny_model_dir: Path, host: str, metrics_host: str
) -> None:
    port = ipv6_loopback_port()
    if port is None:
        pytest.skip("this machine has no IPv6 loopback")
    settings = tiny_settings(tiny_model_dir, host=host, metrics_host=metrics_host, metrics_port=port)
    async with in_process_server(settings) as server:
        assert server.metrics_port == port
        samples = await asyncio.to_thread(scrape, f"http://[::1]:{port}/metrics")

        names = {name for name, _ in samples}
        for name in ("process_resident_memory_bytes", "process_open_fds", "process_start_time_seconds"):
            assert name in names
            assert samples[(name, frozenset())] > 0
        assert "python_gc_collections_total" in names
        assert "python_info" in names
        (build_labels,) = [dict(labels) for name, labels in samples if name == "qaserve_build_info"]
        assert samples[("qaserve_build_info", frozenset(build_labels.items()))] == 1
        assert build_labels["version"] == importlib.metadata.version("qaserve")
        assert build_labels["grpc"] == grpc.__version__
        assert build_labels["transformers"] == importlib.metadata.version("transformers")
        assert build_labels["python"].count(".") == 2
        assert samples[("qaserve_model_state", frozenset({"model": "tiny", "state": "ready"}.items()))] == 1

        if host == "127.0.0.1":  # bound to ::1 as asked, not to every address
            with pytest.raises(urllib.error.URLError):
                await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{port}/metrics", None, 5)


async def test_a_fresh_server_reports_its_counters_at_zero(tiny_model_dir: Path) -> None:
    """Before any request, every error reason, rejection reason and configured model's cache counters read 0 (not
    "no data"), so alerts and rates over them work from the start."""
    async with in_process_server(tiny_settings(tiny_model_dir)) as server:
        samples = await asyncio.to_thread(scrape, f"http://127.0.0.1:{server.metrics_port}/metrics")

    def value(name: str, **labels: str) -> float | None:
        return samples.get((name, frozenset(labels.items())))

    for reason in (
        "OVERLOADED",
        "DEADLINE_TOO_SHORT",
        "INVALID_ARGUMENT",
        "MODEL_NOT_FOUND",
        "INTERNAL",
        "MISSING_TOKEN",
    ):
        assert value("qaserve_errors_total", reason=reason) == 0, reason
    assert value("qaserve_rejections_total", reason="deadline") == 0
    for counter in (
        "model_cache_evictions",
        "response_cache_hits",
        "response_cache_misses",
        "response_cache_evictions",
    ):
        assert value(f"qaserve_{counter}_total", model="tiny") == 0, counter


# -- request sizes and overload, through gRPC ---------------------------------------------------------------------


@pytest.fixture(scope="module")
async def small_server(tiny_model_dir: Path) -> AsyncIterator[QAServer]:
    """One request in flight at most, so that a second one is overloaded."""
    async with in_process_server(tiny_settings(tiny_model_dir, max_in_flight=1)) as server:
        yield server


@pytest.fixture(scope="module")
async def stub(small_server: QAServer) -> AsyncIterator[pb_grpc.QuestionAnsweringServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{small_server.port}") as channel:
        yield pb_grpc.QuestionAnsweringServiceStub(channel)


async def test_request_sizes_are_observed_per_request(
    small_server: QAServer, stub: pb_grpc.QuestionAnsweringServiceStub
) -> None:
    registry = small_server.metrics.registry
    chars_before = sample(registry, "qaserve_request_context_chars_sum", model="tiny")
    count_before = sample(registry, "qaserve_request_context_chars_count", model="tiny")
    windows_before = sample(registry, "qaserve_request_windows_sum", model="tiny")
    one_window_before = sample(registry, "qaserve_request_windows_bucket", model="tiny", le="1.0")

    short = await stub.Answer(pb.AnswerRequest(question=SEED_QUESTION, context=SEED_CONTEXT), timeout=PATIENCE)
    long = await stub.Answer(
        pb.AnswerRequest(question=SEED_QUESTION, context=LONG_CONTEXT, max_seq_len=64, doc_stride=16),
        timeout=PATIENCE,
    )

    assert short.windows == 1 and long.windows > 1
    assert sample(registry, "qaserve_request_context_chars_count", model="tiny") == count_before + 2
    assert sample(registry, "qaserve_request_context_chars_sum", model="tiny") == (
        chars_before + len(SEED_CONTEXT) + len(LONG_CONTEXT)
    )
    assert sample(registry, "qaserve_request_windows_sum", model="tiny") == windows_before + 1 + long.windows
    assert sample(registry, "qaserve_request_windows_bucket", model="tiny", le="1.0") == one_window_before + 1


async def test_overload_is_counted_once(
    small_server: QAServer, stub: pb_grpc.QuestionAnsweringServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry, engine = small_server.metrics.registry, small_server.engine
    errors_before = sample(registry, "qaserve_errors_total", reason="OVERLOADED")
    gate = asyncio.Event()
    use = engine.registry.use

    @contextlib.asynccontextmanager
    async def held(name: str) -> AsyncIterator[object]:
        await gate.wait()  # keeps the admitted request in flight
        async with use(name) as serving:
            yield serving

    monkeypatch.setattr(engine.registry, "use", held)
    request = pb.AnswerRequest(question=SEED_QUESTION, context=SEED_CONTEXT)
    first = asyncio.ensure_future(stub.Answer(request, timeout=PATIENCE))
    try:
        await eventually(lambda: engine.in_flight == 1, "the first request to be admitted", PATIENCE)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Answer(request, timeout=PATIENCE)
    finally:
        gate.set()
    assert (await first).answers

    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sample(registry, "qaserve_errors_total", reason="OVERLOADED") == errors_before + 1
    assert registry.get_sample_value("qaserve_rejections_total", {"reason": "overloaded"}) is None


# -- model states -------------------------------------------------------------------------------------------------


def states(metrics: Metrics, model: str) -> dict[str, float]:
    return {state: sample(metrics.registry, "qaserve_model_state", model=model, state=state) for state in MODEL_STATES}


def one_hot(state: str) -> dict[str, float]:
    return {s: 1.0 if s == state else 0.0 for s in MODEL_STATES}


async def test_model_state_gauge_follows_load_and_unload(tiny_model_dir: Path, tmp_path: Path) -> None:
    release = threading.Event()

    class GatedLoader(ModelLoader):
        def load(self, spec: ModelSpec) -> QAModel:
            assert release.wait(PATIENCE), "the test never released the load"
            return super().load(spec)

    broken = tmp_path / "broken"
    broken.mkdir()
    specs = [
        ModelSpec("tiny", str(tiny_model_dir), device="cpu", warmup=False),
        ModelSpec("broken", str(broken), device="cpu"),
    ]
    metrics = Metrics(CollectorRegistry())
    registry = ModelRegistry(specs, "tiny", metrics, loader=GatedLoader())
    try:
        assert states(metrics, "tiny") == one_hot("unloaded")
        assert states(metrics, "broken") == one_hot("unloaded")

        loading = asyncio.create_task(registry.load("tiny"))
        await eventually(lambda: states(metrics, "tiny") == one_hot("loading"), "the load to start", PATIENCE)
        release.set()
        await asyncio.wait_for(loading, PATIENCE)
        assert states(metrics, "tiny") == one_hot("ready")

        await registry.unload("tiny")
        assert states(metrics, "tiny") == one_hot("unloaded")

        with pytest.raises(ModelFailed):
            await registry.load("broken")
        assert states(metrics, "broken") == one_hot("failed")
        await registry.unload("broken")  # clears the failure
        assert states(metrics, "broken") == one_hot("unloaded")
    finally:
        release.set()
        await registry.close()


def test_counters_and_histograms_export_no_created_series() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.errors.labels("OVERLOADED").inc()
    metrics.request_duration.labels("Answer", "tiny", "OK").observe(0.1)
    exported = generate_latest(metrics.registry).decode()
    assert "qaserve_errors_total" in exported and "qaserve_request_duration_seconds_count" in exported
    assert "_created" not in exported


def test_a_removed_model_leaves_no_state_series() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.set_model_state("gone", "ready")
    metrics.set_model_state("kept", "loading")

    metrics.forget_model("gone")
    metrics.forget_model("never-configured")

    assert all(
        metrics.registry.get_sample_value("qaserve_model_state", {"model": "gone", "state": s}) is None
        for s in MODEL_STATES
    )
    assert states(metrics, "kept") == one_hot("loading")


def test_the_observability_guide_lists_every_qaserve_series() -> None:
    guide = (Path(__file__).resolve().parents[2] / "docs" / "observability.md").read_text()
    listed = set()
    for name in re.findall(r"^\| `(qaserve_[^|]+)\|", guide, re.MULTILINE):
        for written in re.findall(r"qaserve_[a-z_{},]+", name):
            head, _, rest = written.partition("{")
            choices, _, tail = rest.partition("}")
            listed |= {f"{head}{choice}{tail}" for choice in choices.split(",")} if rest else {written}
    suffix = {"counter": "_total", "info": "_info"}
    exported = {
        family.name + suffix.get(family.type, "")
        for family in Metrics(CollectorRegistry()).registry.collect()
        if family.name.startswith("qaserve_")
    }
    assert exported == listed
