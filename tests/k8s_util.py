"""A minimal kustomize for the tests: the features deploy/k8s uses, with kustomize's semantics.

resources (files and folders), namespace, images, secretGenerator and configMapGenerator (envs,
files, literals, a namespace per generator; only with generatorOptions.disableNameSuffixHash:
true), and patches (targets by kind, name and namespace): strategic
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
                  "CustomResourceDefinition", "PriorityClass", "ValidatingAdmissionPolicy",
                  "ValidatingAdmissionPolicyBinding"}

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
    if "namespace" in gen:
        obj["metadata"]["namespace"] = gen["namespace"]
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
    meta = body["metadata"]
    target = _find(objs, patch.get("target") or {"kind": body["kind"], **meta})
    objs[objs.index(target)] = strategic_merge(target, body)


def _find(objs: list[Obj], target: Obj) -> Obj:
    """The one object of the target's kind and name (and namespace, when the target names one)."""
    found = [o for o in objs if o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"]
             and target.get("namespace") in (None, o["metadata"].get("namespace"))]
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


# ---------------------------------------------------------------------------------------------
# What the tests render: both overlays, and every `orchestrator k8s render` variant

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
OVERLAYS = ("dev", "gpu")
DIGITS = str(Path(__file__).resolve().parents[1] / "configs" / "digits.yaml")
OWNER = "alice@example.com"


def real_plan(**goal: Any) -> dict[str, Any]:
    """A plan.json as the planner writes it, for 4 nodes of 8 GPUs."""
    from orchestrator.planner import ClusterSpec, Profile, plan

    profile = Profile.from_dict({
        "version": 1, "model": "cnn", "device": "A100", "param_count": 25_000_000,
        "grad_bytes": 100_000_000, "max_local_batch": 128,
        "samples": [
            {"local_batch": 32, "step_time_s": 0.040, "optimizer_s": 0.004},
            {"local_batch": 64, "step_time_s": 0.070, "optimizer_s": 0.004},
            {"local_batch": 128, "step_time_s": 0.130, "optimizer_s": 0.004},
        ],
    })
    cluster = ClusterSpec.from_dict({"nodes": 4, "gpus_per_node": 8, "intra_node_GBps": 300,
                                     "inter_node_GBps": 25, "gpu_hour_cost": 2.0})
    return plan(profile, cluster, total_samples=50_000_000, **goal).to_dict()


PLAN = real_plan()
SMALL_PLAN = {"workers": 3, "time_to_finish_s": 1200.0,
              "choice": {"nodes": 2, "gpus_per_node": 2, "time_to_finish_s": 1200.0}}

# name -> (k8s_render_command keyword arguments, the plan it uses)
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {
    "job-cpu": ({"cluster": False, "overrides": ["resources.workers=2"]}, None),
    "job-gpu-no-plan": ({"cluster": False, "overrides": ["resources.use_gpu=true", "resources.workers=3"]}, None),
    "job-gpu-plan": ({"cluster": False, "overrides": []}, PLAN),
    "job-gpu-small-plan": ({"cluster": False, "overrides": ["resources.cpus_per_worker=4"]}, SMALL_PLAN),
    "cluster-cpu": ({"cluster": True, "overrides": ["resources.workers=2"]}, None),
    "cluster-gpu-plan": ({"cluster": True, "overrides": []}, PLAN),
}


def deploy_copy(folder: Path) -> Path:
    """deploy/k8s copied into `folder`, every secrets/*.env written from its placeholder example."""
    import shutil

    copied = folder / "k8s"
    shutil.copytree(DEPLOY, copied, ignore=shutil.ignore_patterns("*.env"))
    for example in copied.glob("overlays/*/secrets/*.env.example"):
        shutil.copy(example, example.with_suffix(""))
    return copied


def render_variants(folder: Path) -> dict[str, list[Obj]]:
    """Each `orchestrator k8s render` variant, through the command and its YAML output."""
    import json

    from orchestrator.k8s.command import k8s_render_command

    rendered = {}
    for name, (kwargs, plan_dict) in VARIANTS.items():
        plan_path = None
        if plan_dict is not None:
            plan_path = folder / f"{name}.json"
            plan_path.write_text(json.dumps(plan_dict))
        text = k8s_render_command(DIGITS, plan_path=plan_path and str(plan_path), image=None, output=None,
                                  owner=OWNER, **kwargs).text
        rendered[name] = [doc for doc in yaml.safe_load_all(text) if doc]
    return rendered


def all_objects(manifests: dict[str, list[Obj]]) -> list[tuple[str, Obj]]:
    return [(f"{source}: {o['kind']}/{o['metadata']['name']}", o) for source, objs in manifests.items() for o in objs]


def by_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in by_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_templates(obj: Obj) -> list[tuple[str, Obj]]:
    """(where, pod template) of every pod an object describes, custom resources included."""
    spec = obj.get("spec", {})
    found = []
    if obj["kind"] in ("Deployment", "StatefulSet"):
        found.append(("template", spec["template"]))
    if obj["kind"] in ("RayCluster", "RayJob"):
        cluster = spec.get("rayClusterSpec", spec)
        found.append(("head", cluster["headGroupSpec"]["template"]))
        found += [(f"worker group {g['groupName']}", g["template"]) for g in cluster.get("workerGroupSpecs", [])]
    if obj["kind"] == "RayJob":
        found.append(("submitter", spec["submitterPodTemplate"]))
    return found


def containers(template: Obj) -> list[Obj]:
    return template["spec"].get("initContainers", []) + template["spec"]["containers"]


def tool_venv(package: str, version: str) -> Path:
    """The bin folder of a venv under .cache that holds `package==version`: a test tool (checkov,
    cel-python) whose dependencies must not touch the product's. Skips when pip cannot install it."""
    import fcntl
    import shutil
    import subprocess
    import sys

    import pytest

    cache = Path(__file__).resolve().parents[1] / ".cache"
    venv = cache / f"{package}-venv"
    cache.mkdir(exist_ok=True)
    (cache / ".gitignore").write_text("*\n")
    stamp = venv / ".installed"
    with open(cache / f"{package}-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one install when several test runs start at once
        if stamp.exists() and stamp.read_text() == version:
            return venv / "bin"
        # Built in place: a venv's scripts name its interpreter by absolute path, so it cannot move.
        shutil.rmtree(venv, ignore_errors=True)
        try:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
            pip = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", f"{package}=={version}"],
                                 capture_output=True, text=True, timeout=1200)
        except (subprocess.SubprocessError, OSError) as exc:
            pytest.skip(f"cannot create a venv for {package}: {exc}")
        if pip.returncode != 0:
            pytest.skip(f"pip cannot install {package}=={version}: {pip.stderr.strip().splitlines()[-1:]}")
        stamp.write_text(version)
    return venv / "bin"


def mlflow_uris(obj: Obj) -> list[str]:
    """Every MLFLOW_TRACKING_URI a job or cluster sets, and its job config's tracking_uri."""
    uris = [e["value"] for _, t in pod_templates(obj) for c in containers(t) for e in c.get("env", [])
            if e["name"] == "MLFLOW_TRACKING_URI"]
    if obj["kind"] == "RayJob":
        uris.append(yaml.safe_load(obj["spec"]["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"])
    from orchestrator.k8s.names import CONFIG_FILE

    if obj["kind"] == "ConfigMap" and CONFIG_FILE in obj.get("data", {}):
        uris.append(yaml.safe_load(obj["data"][CONFIG_FILE])["tracking"]["tracking_uri"])
    return uris
