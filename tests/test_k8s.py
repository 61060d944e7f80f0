"""Kubernetes deployment, validated offline: every kustomize overlay and every `k8s render` variant
is rendered, then each object is checked against the Kubernetes API schemas (kubernetes-validate,
strict), RayCluster and RayJob against the real KubeRay CRDs, the whole against checkov's
Kubernetes checks, and against our own rules (secrets resolve and are never inline, services
select pods, the MLflow URI and GPU counts are what the plan says)."""

from __future__ import annotations

import copy
import fnmatch
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import k8s_util
import pytest
import yaml
from packaging.requirements import Requirement

from orchestrator import k8s
from orchestrator.errors import UserError
from orchestrator.planner import ClusterSpec, Profile, plan

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "gpu")
CRD_DIR = ROOT.parent / "shared" / "k8s-schemas"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
CHECKOV_VERSION = "3.3.30"
CHECKOV_VENV = ROOT / ".cache" / "checkov-venv"
SKIPS_FILE = DEPLOY / "checkov-skips.yaml"
DIGITS = str(ROOT / "configs" / "digits.yaml")

Obj = dict[str, Any]


def real_plan(**goal: Any) -> dict[str, Any]:
    """A plan.json as the planner writes it, for 4 nodes of 8 GPUs."""
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


# ---------------------------------------------------------------------------------------------
# Rendering


@pytest.fixture(scope="module")
def deploy_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/k8s with every secrets/*.env written from its placeholder example."""
    copy_dir = tmp_path_factory.mktemp("deploy") / "k8s"
    shutil.copytree(DEPLOY, copy_dir, ignore=shutil.ignore_patterns("*.env"))
    for example in copy_dir.glob("overlays/*/secrets/*.env.example"):
        shutil.copy(example, example.with_suffix(""))
    return copy_dir


@pytest.fixture(scope="module")
def overlays(deploy_copy: Path) -> dict[str, list[Obj]]:
    return {name: k8s_util.build(deploy_copy / "overlays" / name) for name in OVERLAYS}


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Obj]]:
    """Each `orchestrator k8s render` variant, through the command and its YAML output."""
    folder = tmp_path_factory.mktemp("plans")
    rendered = {}
    for name, (kwargs, plan_dict) in VARIANTS.items():
        plan_path = None
        if plan_dict is not None:
            plan_path = folder / f"{name}.json"
            plan_path.write_text(json.dumps(plan_dict))
        text = k8s.k8s_render_command(DIGITS, plan_path=plan_path and str(plan_path), image=None,
                                      output=None, **kwargs)
        rendered[name] = [doc for doc in yaml.safe_load_all(text) if doc]
    return rendered


@pytest.fixture(scope="module")
def manifests(overlays: dict[str, list[Obj]], variants: dict[str, list[Obj]]) -> dict[str, list[Obj]]:
    return {**{f"overlay-{k}": v for k, v in overlays.items()}, **variants}


def all_objects(manifests: dict[str, list[Obj]]) -> Iterator[tuple[str, Obj]]:
    for source, objs in manifests.items():
        for obj in objs:
            yield f"{source}: {obj['kind']}/{obj['metadata']['name']}", obj


def by_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in by_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_templates(obj: Obj) -> Iterator[tuple[str, Obj]]:
    """(where, pod template) of every pod an object describes, custom resources included."""
    spec = obj.get("spec", {})
    if obj["kind"] in ("Deployment", "StatefulSet"):
        yield "template", spec["template"]
    cluster = spec.get("rayClusterSpec", spec) if obj["kind"] in ("RayCluster", "RayJob") else None
    if cluster is not None:
        yield "head", cluster["headGroupSpec"]["template"]
        for group in cluster.get("workerGroupSpecs", []):
            yield f"worker group {group['groupName']}", group["template"]
    if obj["kind"] == "RayJob":
        yield "submitter", spec["submitterPodTemplate"]


def containers(template: Obj) -> list[Obj]:
    return template["spec"].get("initContainers", []) + template["spec"]["containers"]


def test_overlays_match_kubectl_kustomize(deploy_copy: Path, overlays: dict[str, list[Obj]]) -> None:
    """The small renderer in k8s_util is kustomize, for what these overlays use."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the overlays are rendered by tests/k8s_util.py alone")
    for name in OVERLAYS:
        out = subprocess.run([kubectl, "kustomize", str(deploy_copy / "overlays" / name)],
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0 and "unknown command" in out.stderr:
            pytest.skip(f"this kubectl has no kustomize: {out.stderr.strip()}")
        assert out.returncode == 0, out.stderr
        theirs = {k8s_util.key(o): o for o in yaml.safe_load_all(out.stdout) if o}
        ours = {k8s_util.key(o): o for o in overlays[name]}
        assert ours == theirs


# ---------------------------------------------------------------------------------------------
# Schemas


def test_core_objects_match_the_kubernetes_api(manifests: dict[str, list[Obj]]) -> None:
    from kubernetes_validate import utils as kv

    version = kv.latest_version()
    errors = []
    for where, obj in all_objects(manifests):
        if obj["kind"] in CRD_FILES:
            continue
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as exc:
            errors.append(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except kv.SchemaNotFoundError as exc:
            errors.append(f"{where}: {exc.message}")
    assert not errors, "\n".join(errors)


def closed_schema(schema: Any) -> Any:
    """The schema with unknown fields rejected wherever it declares properties."""
    if isinstance(schema, list):
        return [closed_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {k: closed_schema(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        closed["additionalProperties"] = False
    return closed


@pytest.fixture(scope="module")
def crd_validators() -> dict[str, jsonschema.protocols.Validator]:
    if not CRD_DIR.is_dir():
        pytest.skip(f"{CRD_DIR} is absent (a clone without ../shared): KubeRay CRDs not checked")
    validators = {}
    for kind, filename in CRD_FILES.items():
        crd = yaml.safe_load((CRD_DIR / filename).read_text())
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = closed_schema(v1["schema"]["openAPIV3Schema"])
        validators[kind] = jsonschema.Draft202012Validator(schema)
    return validators


def test_kuberay_objects_match_the_crds(manifests: dict[str, list[Obj]],
                                        crd_validators: dict[str, jsonschema.protocols.Validator]) -> None:
    checked, errors = 0, []
    for where, obj in all_objects(manifests):
        if obj["kind"] in crd_validators:
            assert obj["apiVersion"] == "ray.io/v1", where
            checked += 1
            errors += [f"{where}: {'.'.join(map(str, e.path))}: {e.message}"
                       for e in crd_validators[obj["kind"]].iter_errors(obj)]
    assert checked >= len(VARIANTS) + len(OVERLAYS)
    assert not errors, "\n".join(errors)


def test_crd_check_rejects_a_misspelled_field(variants: dict[str, list[Obj]],
                                              crd_validators: dict[str, jsonschema.protocols.Validator]) -> None:
    job = copy.deepcopy(one(variants["job-gpu-plan"], "RayJob"))
    job["spec"]["shutdownAfterJobFinish"] = job["spec"].pop("shutdownAfterJobFinishes")
    assert not crd_validators["RayJob"].is_valid(job)


# ---------------------------------------------------------------------------------------------
# Our own rules


def secret_refs(node: Any) -> Iterator[tuple[str, str | None]]:
    """(Secret name, key or None) of every reference in an object."""
    if isinstance(node, list):
        for item in node:
            yield from secret_refs(item)
    elif isinstance(node, dict):
        for field, value in node.items():
            if field == "secretKeyRef":
                yield value["name"], value["key"]
            elif field == "secretRef":
                yield value["name"], None
            elif field == "secret" and isinstance(value, dict) and "secretName" in value:
                yield value["secretName"], None
            elif field == "authOptions" and value.get("mode") == "token":
                yield value.get("secretName", ""), "auth_token"
            else:
                yield from secret_refs(value)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_secret_reference_resolves(overlay: str, overlays: dict[str, list[Obj]],
                                         variants: dict[str, list[Obj]]) -> None:
    """In the overlay itself and in each rendered job applied next to it."""
    secrets = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in by_kind(overlays[overlay], "Secret")}
    assert secrets, "the overlay generates no Secret"
    sources = {f"overlay-{overlay}": overlays[overlay], **variants}
    for where, obj in all_objects(sources):
        for name, key in secret_refs(obj):
            secret = secrets.get((obj["metadata"]["namespace"], name))
            assert secret is not None, f"{where}: Secret {name!r} is not generated in its namespace"
            assert key is None or key in secret["data"], f"{where}: Secret {name} has no key {key!r}"


def test_no_secret_value_is_inline(overlays: dict[str, list[Obj]], variants: dict[str, list[Obj]]) -> None:
    import base64

    values = {base64.b64decode(v).decode() for s in by_kind(sum(overlays.values(), []), "Secret")
              for v in s["data"].values()}
    values.discard("mlflow")  # the database user name is also the database name
    for where, obj in all_objects({**overlays, **variants}):
        if obj["kind"] == "Secret":
            continue
        text = json.dumps(obj)
        assert not [v for v in values if v in text], f"{where} contains a secret value"
        for _, template in pod_templates(obj):
            for c in containers(template):
                inline = [e["name"] for e in c.get("env", []) if "value" in e and not e["name"].endswith("_FILE")
                          and re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", e["name"])]
                assert not inline, f"{where}: {c['name']} sets {inline} inline"
    for source in DEPLOY.rglob("*.yaml"):
        assert "kind: Secret" not in source.read_text(), f"{source}: write Secrets with a secretGenerator"


def test_example_secret_files_are_placeholders() -> None:
    examples = sorted(DEPLOY.glob("overlays/*/secrets/*.env.example"))
    assert len(examples) == 6
    for example in examples:
        values = k8s_util.parse_env_file(example)
        secret_values = {k: v for k, v in values.items() if k not in ("POSTGRES_USER",)}
        assert secret_values and all(v.startswith("CHANGE-ME") for v in secret_values.values()), example
    ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", "deploy/k8s/overlays/dev/secrets/s3.env"],
                             cwd=ROOT, timeout=30)
    assert ignored.returncode == 0, "written secret files must be git-ignored"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_service_selects_a_pod_template(overlay: str, overlays: dict[str, list[Obj]]) -> None:
    objs = overlays[overlay]
    labels = [(o["metadata"]["namespace"], t["metadata"]["labels"]) for o in objs for _, t in pod_templates(o)]
    services = by_kind(objs, "Service")
    assert {s["metadata"]["name"] for s in services} >= {"mlflow", "postgres"}
    for service in services:
        selector = service["spec"]["selector"]
        assert any(ns == service["metadata"]["namespace"] and selector.items() <= pod.items()
                   for ns, pod in labels), f"Service {service['metadata']['name']} selects no pod"
        for workload in by_kind(objs, "Deployment") + by_kind(objs, "StatefulSet"):
            template_labels = workload["spec"]["template"]["metadata"]["labels"]
            assert workload["spec"]["selector"]["matchLabels"].items() <= template_labels.items()


def mlflow_service(objs: list[Obj]) -> tuple[set[str], int, list[str]]:
    """(the service's DNS names, its port, MLflow's --allowed-hosts patterns)."""
    service = one(objs, "Service", "mlflow")
    ns = service["metadata"]["namespace"]
    names = {"mlflow", f"mlflow.{ns}", f"mlflow.{ns}.svc", f"mlflow.{ns}.svc.cluster.local"}
    args = one(objs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["args"]
    (allowed,) = [a.split("=", 1)[1] for a in args if a.startswith("--allowed-hosts=")]
    return names, service["spec"]["ports"][0]["port"], allowed.split(",")


def mlflow_uris(obj: Obj) -> list[str]:
    """Every MLFLOW_TRACKING_URI a job or cluster sets, and its job config's tracking_uri."""
    uris = [e["value"] for _, t in pod_templates(obj) for c in containers(t) for e in c.get("env", [])
            if e["name"] == "MLFLOW_TRACKING_URI"]
    if obj["kind"] == "RayJob":
        uris.append(yaml.safe_load(obj["spec"]["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"])
    if obj["kind"] == "ConfigMap" and k8s.CONFIG_FILE in obj.get("data", {}):
        uris.append(yaml.safe_load(obj["data"][k8s.CONFIG_FILE])["tracking"]["tracking_uri"])
    return uris


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_uri_points_at_the_mlflow_service(overlay: str, overlays: dict[str, list[Obj]],
                                                 variants: dict[str, list[Obj]]) -> None:
    names, port, allowed = mlflow_service(overlays[overlay])
    sources = {f"overlay-{overlay}": overlays[overlay], **variants}
    ray_objects = [(w, o) for w, o in all_objects(sources) if o["kind"] in ("RayCluster", "RayJob", "ConfigMap")]
    checked = 0
    for where, obj in ray_objects:
        for uri in mlflow_uris(obj):
            url = urlparse(uri)
            assert url.scheme == "http" and url.hostname in names and url.port == port, f"{where}: {uri}"
            assert any(fnmatch.fnmatch(url.netloc, pattern) for pattern in allowed), \
                f"{where}: MLflow's --allowed-hosts refuses Host {url.netloc}"
            checked += 1
    assert checked >= 3 * len(VARIANTS)


def worker_groups(obj: Obj) -> list[Obj]:
    return obj["spec"].get("rayClusterSpec", obj["spec"])["workerGroupSpecs"]


def gpu_limit(group: Obj) -> int:
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return int(limits.get("nvidia.com/gpu", 0))


@pytest.mark.parametrize("name", [n for n, (_, p) in VARIANTS.items() if p is not None])
def test_worker_group_is_sized_by_the_plan(name: str, variants: dict[str, list[Obj]]) -> None:
    kwargs, plan_dict = VARIANTS[name]
    choice = plan_dict["choice"]
    obj = one(variants[name], "RayCluster" if kwargs["cluster"] else "RayJob")
    (group,) = worker_groups(obj)
    assert gpu_limit(group) == choice["gpus_per_node"]
    requests = group["template"]["spec"]["containers"][0]["resources"]["requests"]
    assert int(requests["nvidia.com/gpu"]) == choice["gpus_per_node"]
    assert k8s.GPU_TOLERATION in group["template"]["spec"]["tolerations"]
    assert group["maxReplicas"] == choice["nodes"]
    if kwargs["cluster"]:
        assert group["minReplicas"] == 0 and obj["spec"]["enableInTreeAutoscaling"] is True
    else:
        assert group["replicas"] == group["minReplicas"] == choice["nodes"]
        assert obj["spec"]["entrypoint"].endswith(f"--workers {plan_dict['workers']}")


def test_rayjob_runs_the_config_and_cleans_up(variants: dict[str, list[Obj]]) -> None:
    configmap, job = one(variants["job-gpu-plan"], "ConfigMap"), one(variants["job-gpu-plan"], "RayJob")
    spec = job["spec"]
    path = f"{k8s.CONFIG_DIR}/{k8s.CONFIG_FILE}"
    assert spec["entrypoint"] == f"orchestrator run {path} --workers {PLAN['workers']}"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] == math.ceil(2 * PLAN["time_to_finish_s"] + 15 * 60)
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (volume,) = [v for v in head["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    mount = {"name": volume["name"], "mountPath": k8s.CONFIG_DIR, "readOnly": True}
    assert mount in head["containers"][0]["volumeMounts"]
    job_config = yaml.safe_load(configmap["data"][k8s.CONFIG_FILE])
    assert job_config["checkpoint"]["storage_path"] == f"{k8s.SHARED_MOUNT}/runs"
    assert job_config["data"]["path"] == f"{k8s.SHARED_MOUNT}/data/digits"
    assert job_config["ray"]["address"] == "auto"
    assert "env_vars" in yaml.safe_load(spec["runtimeEnvYAML"])
    default = one(variants["job-cpu"], "RayJob")["spec"]
    assert default["activeDeadlineSeconds"] == k8s.DEFAULT_DEADLINE_S
    assert default["entrypoint"].endswith("--workers 2")
    (cpu_group,) = worker_groups(one(variants["job-cpu"], "RayJob"))
    assert gpu_limit(cpu_group) == 0 and "tolerations" not in cpu_group["template"]["spec"]


def test_shared_volume_is_mounted_in_every_ray_pod(manifests: dict[str, list[Obj]]) -> None:
    for where, obj in all_objects(manifests):
        if obj["kind"] not in ("RayCluster", "RayJob"):
            continue
        for role, template in pod_templates(obj):
            if role == "submitter":
                continue
            claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                      for v in template["spec"]["volumes"] if "persistentVolumeClaim" in v}
            mounts = {m["mountPath"]: m["name"] for m in template["spec"]["containers"][0]["volumeMounts"]}
            assert claims.get(mounts.get(k8s.SHARED_MOUNT)) == k8s.SHARED_CLAIM, f"{where} {role}"
    gpu_claim = one(manifests["overlay-gpu"], "PersistentVolumeClaim", k8s.SHARED_CLAIM)
    assert gpu_claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_overlay_clusters(overlays: dict[str, list[Obj]]) -> None:
    for name, objs in overlays.items():
        cluster = one(objs, "RayCluster")["spec"]
        assert cluster["authOptions"] == {"mode": "token", "secretName": k8s.AUTH_SECRET}
        assert cluster["enableInTreeAutoscaling"] is True and cluster["autoscalerOptions"]
        assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
        (group,) = cluster["workerGroupSpecs"]
        assert group["minReplicas"] == 0 and group["maxReplicas"] > 0
        assert (gpu_limit(group) > 0) == (name == "gpu")
    assert sorted(s["metadata"]["name"] for s in by_kind(overlays["dev"], "StatefulSet")) == ["minio", "postgres"]
    assert sorted(s["metadata"]["name"] for s in by_kind(overlays["gpu"], "StatefulSet")) == ["postgres"]
    for objs in overlays.values():
        args = one(objs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["args"]
        assert "--host=0.0.0.0" in args and any(a.startswith("--allowed-hosts=") for a in args)


def test_rendered_clusters_have_the_overlays_shape(overlays: dict[str, list[Obj]],
                                                  variants: dict[str, list[Obj]]) -> None:
    """deploy/k8s and orchestrator/k8s.py describe the same pods, up to sizes and images."""

    def shape(obj: Obj) -> Obj:
        spec = copy.deepcopy(obj["spec"])
        for _, template in pod_templates({"kind": "RayCluster", "spec": spec}):
            for c in template["spec"]["containers"]:
                c.pop("resources"), c.pop("image")
            for v in template["spec"]["volumes"]:
                v.get("emptyDir", {}).pop("sizeLimit", None)
        for group in spec["workerGroupSpecs"]:
            group["maxReplicas"] = None
        return spec

    for overlay, variant in (("gpu", "cluster-gpu-plan"), ("dev", "cluster-cpu")):
        assert shape(one(overlays[overlay], "RayCluster")) == shape(one(variants[variant], "RayCluster"))


def test_pods_are_locked_down(manifests: dict[str, list[Obj]]) -> None:
    service_accounts = {(o["metadata"]["namespace"], o["metadata"]["name"])
                        for objs in manifests.values() for o in by_kind(objs, "ServiceAccount")}
    for where, obj in all_objects(manifests):
        ray = obj["kind"] in ("RayCluster", "RayJob")
        for role, template in pod_templates(obj):
            pod = template["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, f"{where} {role}"
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            assert (obj["metadata"]["namespace"], pod["serviceAccountName"]) in service_accounts, f"{where} {role}"
            if pod["serviceAccountName"] != "ray-head":
                assert pod["automountServiceAccountToken"] is False, f"{where} {role}"
            for c in containers(template):
                what = f"{where} {role} {c['name']}"
                assert c["resources"]["requests"] and c["resources"]["limits"], what
                assert {"cpu", "memory"} <= c["resources"]["limits"].keys(), what
                security = c["securityContext"]
                assert security["allowPrivilegeEscalation"] is False, what
                assert security["capabilities"] == {"drop": ["ALL"]}, what
                # Ray containers: probes come from the operator, the root filesystem stays writable.
                if not ray:
                    assert security["readOnlyRootFilesystem"] is True, what
                    if c not in pod.get("initContainers", []):
                        assert "readinessProbe" in c and "livenessProbe" in c, what


def test_network_policies(overlays: dict[str, list[Obj]]) -> None:
    for name, objs in overlays.items():
        policies = {p["metadata"]["name"]: p["spec"] for p in by_kind(objs, "NetworkPolicy")}
        assert policies["default-deny-ingress"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
        ray_pods = {"podSelector": {"matchExpressions": [{"key": "ray.io/cluster", "operator": "Exists"}]}}
        assert policies["mlflow"]["ingress"][0]["from"] == [ray_pods]
        mlflow_pods = [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}]
        assert policies["postgres"]["ingress"] == [{"from": mlflow_pods, "ports": [{"port": 5432, "protocol": "TCP"}]}]
        if name == "dev":
            assert policies["minio"]["ingress"] == [{"from": mlflow_pods, "ports": [{"port": 9000, "protocol": "TCP"}]}]


# ---------------------------------------------------------------------------------------------
# The render functions' edges


def test_render_without_a_plan_uses_the_configured_workers() -> None:
    from orchestrator.config import load_config

    config = load_config(DIGITS, ["resources.workers={min: 2, max: 5}", "resources.use_gpu=true"])
    group = k8s.worker_group(config, None)
    assert (group.pods, group.workers, group.gpus_per_pod) == (5, 5, 1)
    assert k8s.worker_group(load_config(DIGITS), None).workers == 1
    config = load_config(DIGITS, ["resources.deadline_hours=2"])
    assert k8s.deadline_seconds(config, None) == 2 * 7200 + 900


@pytest.mark.parametrize(("plan_dict", "message"), [
    ({}, "plan.choice: missing"),
    ({"choice": {"nodes": 0, "gpus_per_node": 8}}, "plan.choice.nodes: must be a positive integer, got 0"),
    ({"choice": {"nodes": 2, "gpus_per_node": "8"}}, "plan.choice.gpus_per_node"),
    ({"workers": 17, "choice": {"nodes": 2, "gpus_per_node": 8}}, "plan.workers: must be between 1 and 16"),
])
def test_bad_plans_are_user_errors(plan_dict: dict[str, Any], message: str, tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan_dict))
    with pytest.raises(UserError, match=re.escape(f"{path}: {message}")):
        k8s.load_plan(path)


def test_command_errors_name_the_field_or_file(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{nope")
    cases = [
        (dict(plan_path=str(tmp_path / "bad.json")), [], "bad.json: not valid JSON (line 1)"),
        (dict(plan_path=str(tmp_path / "missing.json")), [], "missing.json: plan file not found"),
        (dict(plan_path=None), ["checkpoint.storage_path=/data/ckpt"], "checkpoint.storage_path: /data/ckpt is not on"),
        (dict(plan_path=None), ["data.path=../../etc"], "data.path: ../../etc leaves the shared volume"),
        (dict(plan_path=None, output=str(tmp_path / "no" / "such" / "dir.yaml")), [], "cannot write"),
    ]
    for kwargs, overrides, message in cases:
        kwargs = {"image": None, "output": None, "cluster": False, **kwargs}
        with pytest.raises(UserError, match=re.escape(message)):
            k8s.k8s_render_command(DIGITS, overrides=overrides, **kwargs)
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(SMALL_PLAN))
    with pytest.raises(UserError, match="resources.use_gpu: false, but the plan"):
        k8s.k8s_render_command(DIGITS, plan_path=str(plan_path), image=None, output=None, cluster=False,
                               overrides=["resources.use_gpu=false"])


def test_command_writes_the_file(tmp_path: Path) -> None:
    out = tmp_path / "job.yaml"
    note = k8s.k8s_render_command(DIGITS, plan_path=None, image="registry.example/job:1", output=str(out),
                                  cluster=False, overrides=["name=Digits_CNN.v2"])
    assert note.startswith("wrote ConfigMap digits-cnn-v2-config, RayJob digits-cnn-v2 (") and str(out) in note
    objs = [d for d in yaml.safe_load_all(out.read_text()) if d]
    assert [o["kind"] for o in objs] == ["ConfigMap", "RayJob"]
    images = {c["image"] for _, t in pod_templates(objs[1]) for c in containers(t)}
    assert images == {"registry.example/job:1"}


def test_namespace_moves_the_mlflow_uri_along() -> None:
    from orchestrator.config import load_config

    job = k8s.render_rayjob(load_config(DIGITS), config_path="configs/digits.yaml", plan=SMALL_PLAN,
                            image="img:1", namespace="team-a")
    assert job["metadata"]["namespace"] == "team-a"
    assert set(mlflow_uris(job)) == {"http://mlflow.team-a.svc:5000"}
    assert job["spec"]["entrypoint"] == "orchestrator run configs/digits.yaml --workers 3"


def test_default_images_are_the_overlays(overlays: dict[str, list[Obj]]) -> None:
    for overlay, gpu in (("gpu", True), ("dev", False)):
        images = {c["image"] for _, t in pod_templates(one(overlays[overlay], "RayCluster")) for c in containers(t)}
        assert images == {k8s.default_image(gpu=gpu)}


# ---------------------------------------------------------------------------------------------
# The image


def dockerfile_args() -> tuple[dict[str, str], list[tuple[str, str]]]:
    """(ARG defaults, [(stage, its last USER)])."""
    args: dict[str, str] = {}
    stages: list[list[str]] = []
    for line in re.sub(r"\\\n", " ", (ROOT / "deploy" / "docker" / "Dockerfile").read_text()).splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "ARG" and "=" in words[1]:
            name, value = words[1].split("=", 1)
            args[name] = value
        elif words[0] == "FROM":
            stages.append([words[-1], "root"])
        elif words[0] == "USER":
            stages[-1][1] = words[1]
    return args, [(name, user) for name, user in stages]


def test_dockerfile_pins_what_the_project_pins() -> None:
    args, stages = dockerfile_args()
    assert [name for name, _ in stages] == ["mlflow-server", "job"]
    for name, user in stages:
        assert user.split(":")[0] not in ("root", "0"), f"stage {name} runs as root"
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert (args["RAY_VERSION"], args["MLFLOW_VERSION"], args["TORCH_VERSION"]) == \
        (pins["ray"], pins["mlflow"], pins["torch"])
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = {Requirement(r).name: Requirement(r).specifier for r in project["dependencies"]}
    for package, arg in (("ray", "RAY_VERSION"), ("mlflow", "MLFLOW_VERSION"), ("torch", "TORCH_VERSION")):
        assert args[arg] in requirements[package], f"{arg}={args[arg]} is outside pyproject's {package} range"
    assert args["RAY_VERSION"] == k8s.RAY_VERSION
    assert args["BASE_IMAGE"].startswith("rayproject/ray:${RAY_VERSION}-")
    assert re.fullmatch(r"python:[\d.]+-slim-\w+", args["PYTHON_IMAGE"])
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "deploy/k8s/overlays/*/secrets/*.env"} <= set(ignored)


def test_manifests_name_the_project_ray_version(overlays: dict[str, list[Obj]]) -> None:
    for objs in overlays.values():
        assert one(objs, "RayCluster")["spec"]["rayVersion"] == k8s.RAY_VERSION


# ---------------------------------------------------------------------------------------------
# Security scan


def checkov_bin() -> Path:
    """checkov in its own venv under .cache (its dependencies must not touch the product's)."""
    import fcntl

    CHECKOV_VENV.parent.mkdir(exist_ok=True)
    (CHECKOV_VENV.parent / ".gitignore").write_text("*\n")
    installed = CHECKOV_VENV / ".installed"
    with open(CHECKOV_VENV.parent / "checkov-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one install when several test runs start at once
        if not installed.exists() or installed.read_text() != CHECKOV_VERSION:
            _install_checkov(installed)
    return CHECKOV_VENV / "bin" / "checkov"


def _install_checkov(installed: Path) -> None:
    # Built in place: a venv's scripts name its interpreter by absolute path, so it cannot move.
    shutil.rmtree(CHECKOV_VENV, ignore_errors=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(CHECKOV_VENV)], check=True, capture_output=True, timeout=300)
        pip = subprocess.run([str(CHECKOV_VENV / "bin" / "pip"), "install", "--quiet", f"checkov=={CHECKOV_VERSION}"],
                             capture_output=True, text=True, timeout=1200)
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"cannot create a venv for checkov: {exc}")
    if pip.returncode != 0:
        pytest.skip(f"pip cannot install checkov=={CHECKOV_VERSION}: {pip.stderr.strip().splitlines()[-1:]}")
    installed.write_text(CHECKOV_VERSION)


def run_checkov(folder: Path) -> list[dict[str, Any]]:
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
    out = subprocess.run([str(checkov_bin()), "-d", str(folder), "--framework", "kubernetes", "--output", "json",
                          "--quiet", "--skip-download"], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode in (0, 1), out.stderr[-2000:]
    reports = json.loads(out.stdout) if out.stdout.strip() else []
    reports = reports if isinstance(reports, list) else [reports]
    assert all(r["summary"]["parsing_errors"] == 0 for r in reports), out.stdout[-2000:]
    assert sum(r["summary"]["passed"] for r in reports) > 0, "checkov checked nothing"
    return [f for r in reports for f in r["results"]["failed_checks"]]


@pytest.mark.timeout(1800)
def test_checkov_finds_nothing_unexplained(manifests: dict[str, list[Obj]], tmp_path: Path) -> None:
    for name, objs in manifests.items():
        (tmp_path / f"{name}.yaml").write_text(k8s.dump_manifests(objs))
    failed = {(f["check_id"], f["resource"]) for f in run_checkov(tmp_path)}
    skips = yaml.safe_load(SKIPS_FILE.read_text())
    accepted = set()
    for entry in skips:
        assert len(entry["reason"].split()) >= 10, f"{SKIPS_FILE}: {entry['check']} needs a real reason"
        accepted |= {(entry["check"], resource) for resource in entry["resources"]}
    assert not failed - accepted, f"checkov failures without a reason in {SKIPS_FILE.name}: {sorted(failed - accepted)}"
    assert not accepted - failed, f"{SKIPS_FILE.name} lists checks that now pass: {sorted(accepted - failed)}"
