"""Kubernetes deployment, validated offline: every kustomize overlay and every `k8s render` variant
is rendered, then each object is checked against the Kubernetes API schemas (kubernetes-validate,
strict), RayCluster and RayJob against the real KubeRay CRDs, the whole against checkov's
Kubernetes checks, and against our own rules (secrets resolve and are never inline, services
select pods, the MLflow URI and GPU counts are what the plan says). The attacks on these
manifests are in test_k8s_security.py, test_k8s_network.py and test_k8s_admission.py; the render
command's edges and the container image in test_k8s_render.py."""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import math
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import k8s_util
import pytest
import yaml
from k8s_fixtures import CRD_FILES, crd_validators, deploy_dir, manifests, overlays, variants  # noqa: F401 (fixtures)
from k8s_util import OVERLAYS, PLAN, VARIANTS, all_objects, by_kind, containers, mlflow_uris, one, pod_templates

from orchestrator.k8s import names
from orchestrator.k8s.command import dump_manifests
from orchestrator.redact import is_secret_name

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = k8s_util.DEPLOY
CHECKOV_VERSION = "3.3.30"
SKIPS_FILE = DEPLOY / "checkov-skips.yaml"

Obj = dict[str, Any]


def test_overlays_match_kubectl_kustomize(deploy_dir: Path, overlays: dict[str, list[Obj]]) -> None:
    """The small renderer in k8s_util is kustomize, for what these overlays use."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the overlays are rendered by tests/k8s_util.py alone")
    for name in OVERLAYS:
        out = subprocess.run([kubectl, "kustomize", str(deploy_dir / "overlays" / name)],
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
            elif field == "authOptions" and "secretName" in value:
                yield value["secretName"], "auth_token"
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


def secret_values(objs: list[Obj]) -> set[str]:
    """The values of the generated Secrets' secret-named keys (user names are not secrets)."""
    import base64

    return {base64.b64decode(v).decode() for s in by_kind(objs, "Secret") for k, v in s["data"].items()
            if is_secret_name(k)}


def test_no_secret_value_is_inline(overlays: dict[str, list[Obj]], variants: dict[str, list[Obj]]) -> None:
    values = secret_values(sum(overlays.values(), []))
    assert len(values) >= 7
    for where, obj in all_objects({**overlays, **variants}):
        if obj["kind"] == "Secret":
            continue
        text = json.dumps(obj)
        assert not [v for v in values if v in text], f"{where} contains a secret value"
        for _, template in pod_templates(obj):
            for c in containers(template):
                inline = [e["name"] for e in c.get("env", []) if "value" in e and not e["name"].endswith("_FILE")
                          and is_secret_name(e["name"])]
                assert not inline, f"{where}: {c['name']} sets {inline} inline"
    for source in DEPLOY.rglob("*.yaml"):
        assert "kind: Secret" not in source.read_text(), f"{source}: write Secrets with a secretGenerator"


def test_example_secret_files_are_placeholders() -> None:
    examples = sorted(DEPLOY.glob("overlays/*/secrets/*.env.example"))
    assert len(examples) == 10
    for example in examples:
        values = k8s_util.parse_env_file(example)
        secret_values = {k: v for k, v in values.items() if is_secret_name(k)}
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
    hosts = {"mlflow", f"mlflow.{ns}", f"mlflow.{ns}.svc", f"mlflow.{ns}.svc.cluster.local"}
    args = one(objs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["args"]
    (allowed,) = [a.split("=", 1)[1] for a in args if a.startswith("--allowed-hosts=")]
    return hosts, service["spec"]["ports"][0]["port"], allowed.split(",")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_uri_points_at_the_mlflow_service(overlay: str, overlays: dict[str, list[Obj]],
                                                 variants: dict[str, list[Obj]]) -> None:
    hosts, port, allowed = mlflow_service(overlays[overlay])
    sources = {f"overlay-{overlay}": overlays[overlay], **variants}
    ray_objects = [(w, o) for w, o in all_objects(sources) if o["kind"] in ("RayCluster", "RayJob", "ConfigMap")]
    checked = 0
    for where, obj in ray_objects:
        for uri in mlflow_uris(obj):
            url = urlparse(uri)
            assert url.scheme == "http" and url.hostname in hosts and url.port == port, f"{where}: {uri}"
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
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in group["template"]["spec"]["tolerations"]
    assert group["maxReplicas"] == choice["nodes"]
    if kwargs["cluster"]:
        assert group["minReplicas"] == 0 and obj["spec"]["enableInTreeAutoscaling"] is True
    else:
        assert group["replicas"] == group["minReplicas"] == choice["nodes"]
        assert f" --workers {plan_dict['workers']} --config-sha256 " in obj["spec"]["entrypoint"]


def test_rayjob_runs_the_config_and_cleans_up(variants: dict[str, list[Obj]]) -> None:
    configmap, job = one(variants["job-gpu-plan"], "ConfigMap"), one(variants["job-gpu-plan"], "RayJob")
    spec = job["spec"]
    path = f"{names.CONFIG_DIR}/{names.CONFIG_FILE}"
    digest = hashlib.sha256(configmap["data"][names.CONFIG_FILE].encode()).hexdigest()  # run refuses another
    assert spec["entrypoint"] == f"orchestrator run {path} --workers {PLAN['workers']} --config-sha256 {digest}"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] == math.ceil(2 * PLAN["time_to_finish_s"] + 15 * 60)
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (volume,) = [v for v in head["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    mount = {"name": volume["name"], "mountPath": names.CONFIG_DIR, "readOnly": True}
    assert mount in head["containers"][0]["volumeMounts"]
    job_config = yaml.safe_load(configmap["data"][names.CONFIG_FILE])
    assert job_config["checkpoint"]["storage_path"] == f"{names.SHARED_MOUNT}/runs"
    assert job_config["data"]["path"] == f"{names.SHARED_MOUNT}/data/digits"
    assert job_config["ray"]["address"] == "auto"
    assert "env_vars" in yaml.safe_load(spec["runtimeEnvYAML"])
    default = one(variants["job-cpu"], "RayJob")["spec"]
    assert default["activeDeadlineSeconds"] == 24 * 3600
    assert " --workers 2 --config-sha256 " in default["entrypoint"]
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
            for path in (names.SHARED_MOUNT, names.DATASETS_MOUNT):
                assert claims.get(mounts.get(path)) == names.SHARED_CLAIM, f"{where} {role} {path}"
    gpu_claim = one(manifests["overlay-gpu"], "PersistentVolumeClaim", names.SHARED_CLAIM)
    assert gpu_claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_overlay_clusters(overlays: dict[str, list[Obj]]) -> None:
    for name, objs in overlays.items():
        cluster = one(objs, "RayCluster")["spec"]
        assert cluster["authOptions"] == {"mode": "token", "secretName": names.AUTH_SECRET}
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
    """deploy/k8s and orchestrator/k8s/ describe the same pods, up to sizes and images."""

    def shape(obj: Obj) -> Obj:
        spec = copy.deepcopy(obj["spec"])
        for _, template in pod_templates({"kind": "RayCluster", "spec": spec}):
            for c in template["spec"]["containers"]:
                c.pop("resources"), c.pop("image")
            for v in template["spec"]["volumes"]:
                v.get("emptyDir", {}).pop("sizeLimit", None)
            for m in containers(template)[0]["volumeMounts"]:
                if m.get("subPath", "").startswith("clusters/"):
                    m["subPath"] = "clusters/<name>"
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
            assert pod["automountServiceAccountToken"] is False, f"{where} {role}"
            assert (obj["metadata"]["namespace"], pod["serviceAccountName"]) in service_accounts, f"{where} {role}"
            for c in containers(template):
                what = f"{where} {role} {c['name']}"
                assert c["resources"]["requests"] and c["resources"]["limits"], what
                assert {"cpu", "memory"} <= c["resources"]["limits"].keys(), what
                security = c["securityContext"]
                assert security["allowPrivilegeEscalation"] is False, what
                assert security["capabilities"] == {"drop": ["ALL"]}, what
                assert security["readOnlyRootFilesystem"] is True, what
                # Ray containers get their probes from the operator.
                if not ray and c not in pod.get("initContainers", []):
                    assert "readinessProbe" in c and "livenessProbe" in c, what


def test_default_images_are_the_overlays(overlays: dict[str, list[Obj]]) -> None:
    for overlay, gpu in (("gpu", True), ("dev", False)):
        images = {c["image"] for _, t in pod_templates(one(overlays[overlay], "RayCluster")) for c in containers(t)}
        assert images == {names.default_image(gpu=gpu)}


def test_manifests_name_the_project_ray_version(overlays: dict[str, list[Obj]]) -> None:
    for objs in overlays.values():
        assert one(objs, "RayCluster")["spec"]["rayVersion"] == names.RAY_VERSION


# ---------------------------------------------------------------------------------------------
# Security scan


def run_checkov(folder: Path) -> list[dict[str, Any]]:
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
    out = subprocess.run([str(k8s_util.tool_venv("checkov", CHECKOV_VERSION) / "checkov"), "-d", str(folder), "--framework", "kubernetes", "--output", "json",
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
        (tmp_path / f"{name}.yaml").write_text(dump_manifests(objs))
    failed = {(f["check_id"], f["resource"]) for f in run_checkov(tmp_path)}
    skips = yaml.safe_load(SKIPS_FILE.read_text())
    accepted = set()
    for entry in skips:
        assert len(entry["reason"].split()) >= 10, f"{SKIPS_FILE}: {entry['check']} needs a real reason"
        accepted |= {(entry["check"], resource) for resource in entry["resources"]}
    assert not failed - accepted, f"checkov failures without a reason in {SKIPS_FILE.name}: {sorted(failed - accepted)}"
    assert not accepted - failed, f"{SKIPS_FILE.name} lists checks that now pass: {sorted(accepted - failed)}"
