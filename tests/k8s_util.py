"""A minimal kustomize for the tests: the features deploy/k8s uses, with kustomize's semantics.

resources (files and folders), namespace, images, secretGenerator and configMapGenerator (envs,
files, literals; only with generatorOptions.disableNameSuffixHash: true), and patches: strategic
merge (maps merged, lists replaced, null deletes: what kustomize does for custom resources and
for the map-only patches used here) or JSON 6902 (add, replace, remove). Anything else in a
kustomization.yaml is an error, so an overlay cannot rely on a feature this does not render.
test_k8s.py checks the result against `kubectl kustomize` where kubectl is installed.
"""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "images", "generatorOptions",
             "secretGenerator", "configMapGenerator", "patches"}
# Kinds that have no namespace (the ones a kustomization here could contain).
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                  "CustomResourceDefinition", "PriorityClass"}

Obj = dict[str, Any]


def build(folder: Path) -> list[Obj]:
    """Render the kustomization in `folder`, like `kubectl kustomize folder`."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text()) or {}
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise NotImplementedError(f"{folder}/kustomization.yaml: unsupported fields {sorted(unknown)}")
    objs: list[Obj] = []
    for entry in spec.get("resources", []):
        path = folder / entry
        objs += build(path) if path.is_dir() else load_all(path)
    objs += _generate(folder, spec)
    for patch in spec.get("patches", []):
        _apply_patch(objs, folder, patch)
    if "namespace" in spec:
        for obj in objs:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = spec["namespace"]
    for image in spec.get("images", []):
        for obj in objs:
            _set_image(obj, image)
    return objs


def load_all(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def key(obj: Obj) -> tuple[str, str, str]:
    return obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


# ---------------------------------------------------------------------------------------------
# Generators


def _generate(folder: Path, spec: Obj) -> list[Obj]:
    generators = [("Secret", g) for g in spec.get("secretGenerator", [])]
    generators += [("ConfigMap", g) for g in spec.get("configMapGenerator", [])]
    if generators and not spec.get("generatorOptions", {}).get("disableNameSuffixHash"):
        raise NotImplementedError(f"{folder}: generators need generatorOptions.disableNameSuffixHash: true")
    return [_generated(kind, folder, g) for kind, g in generators]


def _generated(kind: str, folder: Path, gen: Obj) -> Obj:
    values: dict[str, str] = {}
    for env_file in gen.get("envs", []):
        values.update(parse_env_file(folder / env_file))
    for entry in gen.get("files", []):
        name, _, path = entry.rpartition("=")
        values[name or Path(path).name] = (folder / path).read_text()
    for literal in gen.get("literals", []):
        name, _, value = literal.partition("=")
        values[name] = value
    obj: Obj = {"apiVersion": "v1", "kind": kind, "metadata": {"name": gen["name"]}}
    if kind == "Secret":
        obj["type"] = gen.get("type", "Opaque")
        obj["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}
    else:
        obj["data"] = values
    return obj


def parse_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; blank lines and # comments skipped (kustomize's env file format)."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, value = line.partition("=")
            if not sep:
                raise ValueError(f"{path}: expected KEY=VALUE, got {line!r}")
            values[name] = value
    return values


# ---------------------------------------------------------------------------------------------
# Patches


def _apply_patch(objs: list[Obj], folder: Path, patch: Obj) -> None:
    body = yaml.safe_load(patch["patch"] if "patch" in patch else (folder / patch["path"]).read_text())
    if isinstance(body, list):
        target = _find(objs, patch["target"])
        for op in body:
            json_patch(target, op)
        return
    target = _find(objs, patch.get("target") or {"kind": body["kind"], "name": body["metadata"]["name"]})
    objs[objs.index(target)] = strategic_merge(target, body)


def _find(objs: list[Obj], target: Obj) -> Obj:
    found = [o for o in objs if o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"]]
    if len(found) != 1:
        raise LookupError(f"patch target {target}: {len(found)} objects match")
    return found[0]


def strategic_merge(base: Any, patch: Any) -> Any:
    if not (isinstance(base, dict) and isinstance(patch, dict)):
        return copy.deepcopy(patch)
    merged = dict(base)
    for name, value in patch.items():
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = strategic_merge(base.get(name), value)
    return merged


def json_patch(obj: Obj, op: Obj) -> None:
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    node: Any = obj
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if op["op"] == "remove":
        del node[int(last) if isinstance(node, list) else last]
    elif op["op"] in ("add", "replace"):
        value = copy.deepcopy(op["value"])
        if isinstance(node, list):
            if last == "-":
                node.append(value)
            elif op["op"] == "add":
                node.insert(int(last), value)
            else:
                node[int(last)] = value
        else:
            if op["op"] == "replace" and last not in node:
                raise KeyError(f"replace {op['path']}: no such field")
            node[last] = value
    else:
        raise NotImplementedError(f"JSON patch op {op['op']!r}")


# ---------------------------------------------------------------------------------------------
# Images


def _set_image(node: Any, image: Obj) -> None:
    """kustomize's images transformer: every containers/initContainers entry, in any kind."""
    if isinstance(node, list):
        for item in node:
            _set_image(item, image)
        return
    if not isinstance(node, dict):
        return
    for field, value in node.items():
        if field in ("containers", "initContainers") and isinstance(value, list):
            for container in value:
                container["image"] = _new_image(container["image"], image)
        _set_image(value, image)


def _new_image(current: str, image: Obj) -> str:
    name, tag = current, ""
    if "@" in current:
        name, tag = current.split("@", 1)[0], "@" + current.split("@", 1)[1]
    elif ":" in current.rsplit("/", 1)[-1]:
        name, tag = current.rsplit(":", 1)[0], ":" + current.rsplit(":", 1)[1]
    if name != image["name"]:
        return current
    if "digest" in image:
        tag = "@" + image["digest"]
    elif "newTag" in image:
        tag = ":" + image["newTag"]
    return image.get("newName", name) + tag
