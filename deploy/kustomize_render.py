"""`kustomize build` for the subset deploy/k8s uses, so deploy/check.py validates what `kubectl apply -k` applies.

No kustomize binary ships on PyPI (the packages named after it wrap a download), so deploy/check.py renders with
this instead. Supported: resources (files and directories), components, patches (strategic merge, by the patch's
own kind and name), configMapGenerator (files; create, merge, replace; the content-hash name suffix computed as
kustomize computes it, and references to it in pod specs renamed) and images. Anything else in a kustomization
is refused rather than ignored, so a rendering never silently differs from kustomize's.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION = ("kustomize.config.k8s.io/v1beta1", "Kustomization")
COMPONENT = ("kustomize.config.k8s.io/v1alpha1", "Component")
SUPPORTED_KEYS = frozenset({"apiVersion", "kind", "resources", "components", "patches", "configMapGenerator", "images"})
GENERATOR_KEYS = frozenset({"name", "behavior", "files"})
# Strategic merge keys of the lists patched here (Kubernetes' patchMergeKey); other lists are replaced whole.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "imagePullSecrets": "name",
    "volumeMounts": "mountPath",
}
POD_TEMPLATE_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"})


class KustomizeError(Exception):
    """A kustomization this renderer cannot build, or that kustomize itself would refuse."""


@dataclass
class Rendered:
    """The resources a build yields, and every file it read (so unused files can be found)."""

    resources: list[dict[str, Any]]
    files: set[Path] = field(default_factory=set)


@dataclass
class _State:
    resources: list[dict[str, Any]] = field(default_factory=list)
    generated: set[str] = field(default_factory=set)  # ConfigMap names that get the hash suffix
    files: set[Path] = field(default_factory=set)


def render(directory: Path, components: Iterable[str] = ()) -> Rendered:
    """Builds the kustomization in directory; with components (paths relative to it), builds what an overlay with
    `resources: [directory]` and those components would."""
    state = _State()
    directory = directory.resolve()
    if components:
        _add_directory(directory, state)
        for component in components:
            _accumulate_component(directory, component, state)
    else:
        _accumulate(directory, state, KUSTOMIZATION)
    _hash_generated_names(state)
    return Rendered(state.resources, state.files)


def configmap_hash(name: str, data: dict[str, str]) -> str:
    """kustomize's name suffix: sha256 of the ConfigMap's kind, name and data as Go's json.Marshal writes them."""
    encoded = json.dumps({"data": data, "kind": "ConfigMap", "name": name}, sort_keys=True, separators=(",", ":"))
    encoded = encoded.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    digest = hashlib.sha256(encoded.encode("utf-8")).hexdigest()[:10]
    return digest.translate(str.maketrans({"0": "g", "1": "h", "3": "k", "a": "m", "e": "t"}))


def _read_kustomization(directory: Path, expected: tuple[str, str], state: _State) -> dict[str, Any]:
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    state.files.add(path)
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if (doc.get("apiVersion"), doc.get("kind")) != expected:
        raise KustomizeError(f"{path}: expected apiVersion {expected[0]}, kind {expected[1]}")
    unknown = set(doc) - SUPPORTED_KEYS
    if unknown:
        raise KustomizeError(f"{path}: {sorted(unknown)} not supported by deploy/kustomize_render.py")
    return dict(doc)


def _accumulate(directory: Path, state: _State, expected: tuple[str, str]) -> None:
    # kustomize's order: resources, then components, then this kustomization's generators, patches and images.
    doc = _read_kustomization(directory, expected, state)
    for entry in doc.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            _add_directory(path, state)
        elif path.is_file():
            state.files.add(path)
            for resource in _load_documents(path):
                _add(state, resource, path)
        else:
            raise KustomizeError(f"{directory}: resource {entry} does not exist")
    for entry in doc.get("components", []):
        _accumulate_component(directory, entry, state)
    for generator in doc.get("configMapGenerator", []):
        _generate(directory, generator, state)
    for patch in doc.get("patches", []):
        _patch(directory, patch, state)
    for image in doc.get("images", []):
        _set_image(image, state)


def _add_directory(path: Path, state: _State) -> None:
    """A kustomization used as a resource: built on its own, then its resources join the others."""
    sub = _State()
    _accumulate(path, sub, KUSTOMIZATION)
    for resource in sub.resources:
        _add(state, resource, path)
    state.generated |= sub.generated
    state.files |= sub.files


def _accumulate_component(directory: Path, entry: str, state: _State) -> None:
    path = (directory / entry).resolve()
    if not path.is_dir():
        raise KustomizeError(f"{directory}: component {entry} does not exist")
    _accumulate(path, state, COMPONENT)


def _load_documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def _identity(resource: dict[str, Any]) -> tuple[str, str]:
    return (resource.get("kind", ""), resource.get("metadata", {}).get("name", ""))


def _find(state: _State, kind: str, name: str) -> dict[str, Any] | None:
    return next((r for r in state.resources if _identity(r) == (kind, name)), None)


def _add(state: _State, resource: dict[str, Any], source: Path) -> None:
    if _find(state, *_identity(resource)) is not None:
        raise KustomizeError(f"{source}: {'/'.join(_identity(resource))} is already defined")
    state.resources.append(resource)


def _generate(directory: Path, generator: dict[str, Any], state: _State) -> None:
    unknown = set(generator) - GENERATOR_KEYS
    if unknown:
        raise KustomizeError(f"{directory}: configMapGenerator keys {sorted(unknown)} not supported")
    name, behavior = generator["name"], generator.get("behavior", "create")
    data: dict[str, str] = {}
    for entry in generator.get("files", []):
        key, _, relative = entry.partition("=") if "=" in entry else (Path(entry).name, "", entry)
        path = directory / relative
        if not path.is_file():
            raise KustomizeError(f"{directory}: configMapGenerator {name}: no file {relative}")
        state.files.add(path.resolve())
        data[key] = path.read_text(encoding="utf-8")
    existing = _find(state, "ConfigMap", name)
    if behavior == "create":
        if existing is not None:
            raise KustomizeError(f"{directory}: ConfigMap {name} already exists (behavior: merge or replace)")
        state.resources.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data})
        state.generated.add(name)
    elif behavior in ("merge", "replace"):
        if existing is None or name not in state.generated:
            raise KustomizeError(f"{directory}: behavior {behavior}: no generated ConfigMap {name} to {behavior}")
        existing["data"] = {**existing.get("data", {}), **data} if behavior == "merge" else data
    else:
        raise KustomizeError(f"{directory}: configMapGenerator {name}: unknown behavior {behavior!r}")


def _patch(directory: Path, entry: dict[str, Any], state: _State) -> None:
    if set(entry) - {"path", "patch"} or len(entry) != 1:
        raise KustomizeError(f"{directory}: a patch is one path or one inline patch (no target, no options)")
    if "path" in entry:
        path = (directory / entry["path"]).resolve()
        state.files.add(path)
        documents = _load_documents(path)
    else:
        documents = [d for d in yaml.safe_load_all(entry["patch"]) if d is not None]
    for document in documents:
        target = _find(state, *_identity(document))
        if target is None:
            raise KustomizeError(f"{directory}: patch target {'/'.join(_identity(document))} not found")
        if document.get("apiVersion") != target.get("apiVersion"):
            raise KustomizeError(f"{directory}: patch apiVersion {document.get('apiVersion')} differs from target")
        _merge(target, document, _identity(document)[0])


def _merge(base: dict[str, Any], patch: dict[str, Any], where: str) -> None:
    """Strategic merge: maps merge, lists with a merge key merge by it, other values (and lists) replace."""
    for key, value in patch.items():
        if key.startswith("$"):
            raise KustomizeError(f"{where}: patch directive {key} not supported")
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, f"{where}.{key}")
        elif isinstance(value, list) and key in MERGE_KEYS and isinstance(base.get(key), list):
            _merge_list(base[key], value, MERGE_KEYS[key], f"{where}.{key}")
        else:
            base[key] = copy.deepcopy(value)


def _merge_list(base: list[Any], patch: list[Any], merge_key: str, where: str) -> None:
    for item in patch:
        if not isinstance(item, dict) or merge_key not in item:
            raise KustomizeError(f"{where}: every item needs {merge_key}")
        directive = item.get("$patch")
        match = next((b for b in base if isinstance(b, dict) and b.get(merge_key) == item[merge_key]), None)
        if directive == "delete":
            if match is not None:
                base.remove(match)
        elif directive is not None:
            raise KustomizeError(f"{where}: patch directive $patch: {directive} not supported")
        elif match is not None:
            _merge(match, item, f"{where}[{item[merge_key]}]")
        else:
            base.append(copy.deepcopy(item))


def _pod_specs(state: _State) -> Iterator[dict[str, Any]]:
    for resource in state.resources:
        if resource.get("kind") in POD_TEMPLATE_KINDS:
            yield resource["spec"]["template"]["spec"]
        elif resource.get("kind") == "Pod":
            yield resource["spec"]


def _set_image(image: dict[str, Any], state: _State) -> None:
    if set(image) - {"name", "newName", "newTag"}:
        raise KustomizeError(f"images: {sorted(set(image) - {'name', 'newName', 'newTag'})} not supported")
    for spec in _pod_specs(state):
        for container in [*spec.get("initContainers", []), *spec.get("containers", [])]:
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}".rstrip(":")


def _hash_generated_names(state: _State) -> None:
    renamed = {}
    for resource in state.resources:
        name = resource["metadata"]["name"]
        if resource["kind"] == "ConfigMap" and name in state.generated:
            renamed[name] = f"{name}-{configmap_hash(name, resource.get('data', {}))}"
            resource["metadata"]["name"] = renamed[name]
    for spec in _pod_specs(state):
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                _rename(volume["configMap"], renamed)
            for source in volume.get("projected", {}).get("sources", []):
                if "configMap" in source:
                    _rename(source["configMap"], renamed)
        for container in [*spec.get("initContainers", []), *spec.get("containers", [])]:
            for env in container.get("env", []):
                if "configMapKeyRef" in env.get("valueFrom", {}):
                    _rename(env["valueFrom"]["configMapKeyRef"], renamed)
            for env_from in container.get("envFrom", []):
                if "configMapRef" in env_from:
                    _rename(env_from["configMapRef"], renamed)


def _rename(reference: dict[str, Any], renamed: dict[str, str]) -> None:
    reference["name"] = renamed.get(reference.get("name", ""), reference.get("name", ""))
