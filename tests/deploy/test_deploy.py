"""The Dockerfile and the Kubernetes manifests pass their validators (as `make deploy-check` runs them in CI)."""

from __future__ import annotations

import copy
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_check", ROOT / "deploy" / "check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


check = _load_check()


@pytest.fixture(scope="module")
def manifests() -> list[Any]:
    return check.load()


def test_dockerfile_passes_hadolint() -> None:
    assert check.hadolint_problems() == []


def test_manifests_match_the_kubernetes_schemas(manifests: list[Any]) -> None:
    assert check.schema_problems(manifests) == []


def test_manifests_agree_with_each_other_and_the_server(manifests: list[Any]) -> None:
    assert check.consistency_problems(manifests) == []


def test_the_service_monitor_is_the_one_crd(manifests: list[Any]) -> None:
    # kubernetes-validate has no schema for it; consistency_problems checks its fields and targets.
    kinds = {m.kind for m in manifests}
    assert check.SERVICE_MONITOR in kinds
    assert {kind for _, kind in kinds} >= {
        "Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Kustomization"
    }  # fmt: skip


def _deployment(manifests: list[Any]) -> Any:
    return next(m for m in manifests if m.doc["kind"] == "Deployment")


def test_schema_check_rejects_an_unknown_field(manifests: list[Any]) -> None:
    broken = copy.deepcopy(manifests)
    container = _deployment(broken).doc["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    assert any("readinesProbe" in p for p in check.schema_problems(broken, ("1.31.0",)))


def test_consistency_check_rejects_a_shutdown_that_outlasts_the_grace_period(manifests: list[Any]) -> None:
    broken = copy.deepcopy(manifests)
    _deployment(broken).doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 20
    assert any("terminationGracePeriodSeconds" in p for p in check.consistency_problems(broken))


def test_consistency_check_rejects_a_service_monitor_without_a_port(manifests: list[Any]) -> None:
    broken = copy.deepcopy(manifests)
    monitor = next(m for m in broken if m.kind == check.SERVICE_MONITOR)
    monitor.doc["spec"]["endpoints"][0]["port"] = "web"
    assert any("ServiceMonitor" in p for p in check.consistency_problems(broken))


def test_consistency_check_rejects_unknown_settings(manifests: list[Any]) -> None:
    broken = copy.deepcopy(manifests)
    env = _deployment(broken).doc["spec"]["template"]["spec"]["containers"][0]["env"]
    env.append({"name": "QASERVE_DRAIN_SECONDS_TYPO", "value": "1"})
    env.append({"name": "QASERVE_LOG_FORMAT", "value": "xml"})
    problems = check.consistency_problems(broken)
    assert any("QASERVE_DRAIN_SECONDS_TYPO" in p for p in problems)
    assert any("refuses these settings" in p for p in problems)


def test_dockerfile_final_stage_is_unprivileged_and_self_contained() -> None:
    text = (ROOT / "Dockerfile").read_text()
    final = text[text.rindex("\nFROM ") :]
    assert re.search(r"^USER 10001:10001$", final, re.MULTILINE)
    assert re.search(r"^EXPOSE 50051 9464$", final, re.MULTILINE)
    assert re.search(r'^\s+CMD \["qaserve-client", .*"health"\]$', final, re.MULTILINE)
    assert not re.search(r"apt-get|pip install|gcc|build-essential", final)
    model = re.search(r"QASERVE_MODEL=/opt/qaserve/(\S+)", final)
    assert model is not None and (ROOT / model.group(1) / "config.json").is_file()
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    for source in re.findall(r"^COPY (?!--from)(\S+)", text, re.MULTILINE):
        assert f"!{source.rstrip('/')}/" in ignored or f"!{source}" in ignored, source
