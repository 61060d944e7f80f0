"""Kubernetes manifests for one training job: a KubeRay RayJob, or a standalone RayCluster.

Pure functions from a JobConfig and a plan (the planner's plan.json as a dict) to Kubernetes
objects as plain dicts; nothing here talks to a cluster. The namespace-wide pieces the objects use
(the Ray token Secret, the shared volume, the service accounts, MLflow) are installed once from
``deploy/k8s`` (``kubectl apply -k deploy/k8s/overlays/<name>``), whose RayCluster has the same
shape as the ones rendered here.
"""

from __future__ import annotations

import math
import posixpath
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestrator.config import JobConfig, WorkerRange, load_config
from orchestrator.errors import UserError
from orchestrator.files import read_json

NAMESPACE = "ray-training"
RAY_VERSION = "2.60.0"
IMAGE = "ray-gpu-orchestrator:0.1.0"  # built by deploy/docker/Dockerfile, tagged -cpu / -cuda
AUTH_SECRET = "ray-auth-token"
SHARED_CLAIM = "ray-shared"  # ReadWriteMany: checkpoints and data every Ray pod sees
SHARED_MOUNT = "/mnt/shared"
CONFIG_DIR = "/etc/orchestrator"  # where the job's ConfigMap is mounted in the head pod
CONFIG_FILE = "job.yaml"
MLFLOW_SERVICE = "mlflow"
MLFLOW_PORT = 5000
RAY_UID, RAY_GID = 1000, 100  # the `ray` user of the Ray base image

HEAD_CPUS, HEAD_MEMORY_GI, HEAD_SHM_GI = 2, 8, 2
MEMORY_GI_PER_CPU = 4
MEMORY_GI_PER_GPU = 16
AUTOSCALER_IDLE_S = 300
# A job killed at its deadline loses at most the work since its last checkpoint; the margin
# covers pod scheduling, image pulls and the autoscaler.
DEADLINE_FACTOR = 2.0
DEADLINE_MARGIN_S = 15 * 60
DEFAULT_DEADLINE_S = 24 * 3600  # without a plan or a resources.deadline_hours
TTL_AFTER_FINISHED_S = 3600  # keep a finished job's cluster this long for its logs

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
PART_OF = {"app.kubernetes.io/part-of": "ray-gpu-orchestrator"}


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerGroup:
    """The Ray worker pods of one job: `pods` alike, `workers` Ray Train workers over them."""

    pods: int
    workers: int
    gpus_per_pod: int  # 0: CPU workers
    cpus_per_pod: int
    memory_gi: int

    @property
    def gpu(self) -> bool:
        return self.gpus_per_pod > 0

    def __str__(self) -> str:
        per_pod = f"{self.gpus_per_pod} GPU" if self.gpu else f"{self.cpus_per_pod} CPU"
        return f"{self.workers} worker(s) on {self.pods} pod(s) of {per_pod}"


# ---------------------------------------------------------------------------------------------
# Sizing from the plan


def worker_group(config: JobConfig, plan: Mapping[str, Any] | None) -> WorkerGroup:
    """Pods from the plan's placement; without a plan, one pod per configured worker."""
    if plan is not None:
        if config.resources.use_gpu is False:
            raise UserError("resources.use_gpu: false, but the plan places the job on GPUs")
        pods, gpus_per_pod, workers = plan_placement(plan)
    else:
        workers = _configured_workers(config)
        pods, gpus_per_pod = workers, 1 if config.resources.use_gpu is True else 0
    cpus = math.ceil(config.resources.cpus_per_worker * math.ceil(workers / pods)) + 1
    return WorkerGroup(
        pods=pods, workers=workers, gpus_per_pod=gpus_per_pod, cpus_per_pod=cpus,
        memory_gi=MEMORY_GI_PER_CPU * cpus + MEMORY_GI_PER_GPU * gpus_per_pod,
    )


def _configured_workers(config: JobConfig) -> int:
    workers = config.resources.workers
    if isinstance(workers, WorkerRange):
        return workers.max
    return workers if isinstance(workers, int) else 1


def plan_placement(plan: Mapping[str, Any]) -> tuple[int, int, int]:
    """(nodes, GPUs per node, workers) of the plan's choice."""
    choice = plan.get("choice")
    if not isinstance(choice, Mapping):
        raise UserError("plan.choice: missing; expected the plan.json that `orchestrator plan` writes")
    nodes = _positive_int(choice, "nodes")
    gpus_per_node = _positive_int(choice, "gpus_per_node")
    workers = plan.get("workers", choice.get("gpus", nodes * gpus_per_node))
    if not isinstance(workers, int) or isinstance(workers, bool) or not 0 < workers <= nodes * gpus_per_node:
        raise UserError(f"plan.workers: must be between 1 and {nodes * gpus_per_node} "
                        f"(nodes x gpus_per_node), got {workers!r}")
    return nodes, gpus_per_node, workers


def _positive_int(section: Mapping[str, Any], key: str) -> int:
    value = section.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(f"plan.choice.{key}: must be a positive integer, got {value!r}")
    return value


def predicted_seconds(plan: Mapping[str, Any]) -> float | None:
    """The plan's predicted time to finish, when it has one."""
    choice = plan.get("choice")
    for source in (plan, choice if isinstance(choice, Mapping) else {}):
        value = source.get("time_to_finish_s")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
    return None


def deadline_seconds(config: JobConfig, plan: Mapping[str, Any] | None) -> int:
    """activeDeadlineSeconds: the predicted (or the config's deadline) time, doubled, plus margin."""
    expected = predicted_seconds(plan) if plan is not None else None
    if expected is None and config.resources.deadline_hours is not None:
        expected = config.resources.deadline_hours * 3600
    if expected is None:
        return DEFAULT_DEADLINE_S
    return math.ceil(DEADLINE_FACTOR * expected + DEADLINE_MARGIN_S)


# ---------------------------------------------------------------------------------------------
# The job's config as the cluster runs it


def resource_name(config: JobConfig) -> str:
    """config.name as a DNS label short enough for the names KubeRay derives from it."""
    name = re.sub(r"[^a-z0-9-]+", "-", config.name.lower()).strip("-")[:40].rstrip("-")
    return name or "job"


def default_mlflow_uri(namespace: str = NAMESPACE) -> str:
    return f"http://{MLFLOW_SERVICE}.{namespace}.svc:{MLFLOW_PORT}"


def default_image(*, gpu: bool) -> str:
    return f"{IMAGE}-{'cuda' if gpu else 'cpu'}"


def cluster_job_config(config: JobConfig, *, mlflow_uri: str) -> dict[str, Any]:
    """The config with relative paths on the shared volume, the in-cluster MLflow and Ray."""
    data = config.to_dict()
    storage = _on_shared_volume(config.checkpoint.storage_path, "checkpoint.storage_path")
    if not (storage.startswith(SHARED_MOUNT + "/") or "://" in storage):
        raise UserError(f"checkpoint.storage_path: {storage} is not on the shared volume; use a "
                        f"relative path, one under {SHARED_MOUNT}/, or an s3:// URI")
    data["checkpoint"]["storage_path"] = storage
    paths = [_on_shared_volume(p, "data.path") for p in config.data.paths]
    data["data"]["path"] = paths[0] if isinstance(config.data.path, str) else paths
    data["tracking"]["tracking_uri"] = mlflow_uri
    data["ray"]["address"] = "auto"  # the job's driver runs on the head of a running cluster
    return data


def _on_shared_volume(path: str, field: str) -> str:
    if "://" in path or posixpath.isabs(path):
        return path
    joined = posixpath.normpath(posixpath.join(SHARED_MOUNT, path))
    if not joined.startswith(SHARED_MOUNT + "/"):
        raise UserError(f"{field}: {path} leaves the shared volume {SHARED_MOUNT}")
    return joined


def render_job_configmap(config: JobConfig, *, namespace: str = NAMESPACE,
                         mlflow_uri: str | None = None) -> dict[str, Any]:
    """The ConfigMap mounted at CONFIG_DIR in the RayJob's head pod."""
    job = cluster_job_config(config, mlflow_uri=mlflow_uri or default_mlflow_uri(namespace))
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(f"{resource_name(config)}-config", namespace, config, "job-config"),
        "data": {CONFIG_FILE: yaml.safe_dump(job, sort_keys=False)},
    }


# ---------------------------------------------------------------------------------------------
# Objects


def render_rayjob(config: JobConfig, *, config_path: str, plan: Mapping[str, Any] | None,
                  image: str, namespace: str = NAMESPACE, mlflow_uri: str | None = None) -> dict[str, Any]:
    """A RayJob that brings up a cluster sized for the plan, trains, and shuts the cluster down.

    `config_path` is the config's path inside the head pod: the job's ConfigMap mounted at
    CONFIG_DIR (see render_job_configmap), or a file baked into the image.
    """
    group = worker_group(config, plan)
    mlflow_uri = mlflow_uri or default_mlflow_uri(namespace)
    name = resource_name(config)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": _metadata(name, namespace, config, "ray-job"),
        "spec": {
            "entrypoint": f"orchestrator run {shlex.quote(config_path)} --workers {group.workers}",
            "runtimeEnvYAML": yaml.safe_dump({"env_vars": {"MLFLOW_TRACKING_URI": mlflow_uri}}),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": TTL_AFTER_FINISHED_S,
            "activeDeadlineSeconds": deadline_seconds(config, plan),
            "submissionMode": "K8sJobMode",
            "submitterPodTemplate": _submitter_template(image),
            "rayClusterSpec": _cluster_spec(group, image=image, mlflow_uri=mlflow_uri, autoscale=False,
                                            config_map=f"{name}-config"),
        },
    }


def render_raycluster(config: JobConfig, *, plan: Mapping[str, Any] | None, image: str,
                      namespace: str = NAMESPACE, mlflow_uri: str | None = None) -> dict[str, Any]:
    """A long-lived autoscaling RayCluster: workers from 0 up to the plan's pods, on demand."""
    group = worker_group(config, plan)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": _metadata(resource_name(config), namespace, config, "ray-cluster"),
        "spec": _cluster_spec(group, image=image, mlflow_uri=mlflow_uri or default_mlflow_uri(namespace),
                              autoscale=True, config_map=None),
    }


def _metadata(name: str, namespace: str, config: JobConfig, component: str) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": "ray", "app.kubernetes.io/component": component,
              "app.kubernetes.io/instance": resource_name(config), **PART_OF}
    return {"name": name, "namespace": namespace, "labels": labels}


def _cluster_spec(group: WorkerGroup, *, image: str, mlflow_uri: str, autoscale: bool,
                  config_map: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "rayVersion": RAY_VERSION,
        "authOptions": {"mode": "token", "secretName": AUTH_SECRET},
        "enableInTreeAutoscaling": autoscale,
    }
    if autoscale:
        spec["autoscalerOptions"] = _autoscaler_options()
    spec["headGroupSpec"] = _head_group(image, mlflow_uri, config_map)
    spec["workerGroupSpecs"] = [_worker_group(group, image, mlflow_uri, autoscale=autoscale)]
    return spec


def _autoscaler_options() -> dict[str, Any]:
    return {
        "version": "v2",
        "upscalingMode": "Default",
        "idleTimeoutSeconds": AUTOSCALER_IDLE_S,
        "imagePullPolicy": "IfNotPresent",
        "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
        "securityContext": {**_container_security(), "readOnlyRootFilesystem": True, "runAsNonRoot": True},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }


def _head_group(image: str, mlflow_uri: str, config_map: str | None) -> dict[str, Any]:
    container = _ray_container("ray-head", image, _resources(HEAD_CPUS, HEAD_MEMORY_GI), mlflow_uri)
    container["ports"] = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
    ]
    volumes = _ray_volumes(HEAD_SHM_GI)
    if config_map is not None:
        # optional: a RayJob whose config is baked into the image needs no ConfigMap.
        volumes.append({"name": "job-config", "configMap": {"name": config_map, "optional": True}})
        container["volumeMounts"].append({"name": "job-config", "mountPath": CONFIG_DIR, "readOnly": True})
    return {
        "serviceType": "ClusterIP",
        # The head schedules no training; the dashboard is reached through the ClusterIP service.
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        "template": {
            "metadata": {"labels": _pod_labels("head")},
            "spec": {"serviceAccountName": "ray-head", "securityContext": _pod_security(),
                     "containers": [container], "volumes": volumes},
        },
    }


def _worker_group(group: WorkerGroup, image: str, mlflow_uri: str, *, autoscale: bool) -> dict[str, Any]:
    resources = _resources(group.cpus_per_pod, group.memory_gi, group.gpus_per_pod)
    spec: dict[str, Any] = {
        "serviceAccountName": "ray-worker",
        "automountServiceAccountToken": False,
        "securityContext": _pod_security(),
    }
    if group.gpu:
        spec["tolerations"] = [GPU_TOLERATION]
    spec["containers"] = [_ray_container("ray-worker", image, resources, mlflow_uri)]
    spec["volumes"] = _ray_volumes(max(1, group.memory_gi // 3))
    return {
        "groupName": "gpu" if group.gpu else "cpu",
        # A job's cluster is fixed at the plan's size; a standing cluster scales 0..that.
        "replicas": 0 if autoscale else group.pods,
        "minReplicas": 0 if autoscale else group.pods,
        "maxReplicas": group.pods,
        "rayStartParams": {},
        "template": {"metadata": {"labels": _pod_labels("worker")}, "spec": spec},
    }


def _submitter_template(image: str) -> dict[str, Any]:
    """The pod that runs `ray job submit`; labelled so the network policy lets it reach the head."""
    container = {
        "name": "ray-job-submitter",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
        "securityContext": _container_security(),
    }
    return {
        "metadata": {"labels": _pod_labels("ray-submitter")},
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": "ray-worker",
            "automountServiceAccountToken": False,
            "securityContext": _pod_security(),
            "containers": [container],
        },
    }


def _ray_container(name: str, image: str, resources: dict[str, Any], mlflow_uri: str) -> dict[str, Any]:
    # Probes are left to the operator, which injects the Ray health checks into Ray containers.
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "env": [{"name": "MLFLOW_TRACKING_URI", "value": mlflow_uri}],
        "resources": resources,
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "shm", "mountPath": "/dev/shm"},
            {"name": "shared", "mountPath": SHARED_MOUNT},
        ],
    }


def _ray_volumes(shm_gi: int) -> list[dict[str, Any]]:
    return [
        {"name": "tmp", "emptyDir": {}},
        # Ray's object store lives in /dev/shm, which container runtimes size at 64 MiB.
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_gi}Gi"}},
        {"name": "shared", "persistentVolumeClaim": {"claimName": SHARED_CLAIM}},
    ]


def _resources(cpus: int, memory_gi: int, gpus: int = 0) -> dict[str, Any]:
    amount: dict[str, str] = {"cpu": str(cpus), "memory": f"{memory_gi}Gi"}
    if gpus:
        amount["nvidia.com/gpu"] = str(gpus)
    return {"requests": dict(amount), "limits": dict(amount)}


def _pod_labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "ray", "app.kubernetes.io/component": component, **PART_OF}


def _pod_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": RAY_UID, "runAsGroup": RAY_GID, "fsGroup": RAY_GID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _container_security() -> dict[str, Any]:
    # Ray writes session state, runtime environments and compiler caches under its home
    # directory, so its root filesystem stays writable.
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": False, "capabilities": {"drop": ["ALL"]}}


# ---------------------------------------------------------------------------------------------
# Output and the `orchestrator k8s render` command


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (runtimeEnvYAML, the job config) as readable `|` blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def dump_manifests(objs: list[dict[str, Any]]) -> str:
    """Objects as one multi-document YAML stream, for `kubectl apply -f`."""
    return "---\n".join(yaml.dump(o, Dumper=_Dumper, sort_keys=False, width=4096) for o in objs)


def load_plan(path: str | Path) -> dict[str, Any]:
    raw = read_json(path, "plan")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    try:
        plan_placement(raw)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    return raw


def k8s_render_command(config_path: str, *, plan_path: str | None, image: str | None,
                       output: str | None, cluster: bool, overrides: list[str]) -> str:
    """`orchestrator k8s render`: the manifests as YAML, or when `output` is set, a note of what
    was written there. Without `cluster`: the job's ConfigMap and RayJob; with it: a RayCluster.
    `image` None picks the -cuda or -cpu tag of IMAGE by whether the workers get GPUs."""
    config = load_config(config_path, overrides)
    plan = load_plan(plan_path) if plan_path else None
    group = worker_group(config, plan)
    image = image or default_image(gpu=group.gpu)
    if cluster:
        objs = [render_raycluster(config, plan=plan, image=image)]
    else:
        objs = [render_job_configmap(config),
                render_rayjob(config, config_path=f"{CONFIG_DIR}/{CONFIG_FILE}", plan=plan, image=image)]
    text = dump_manifests(objs)
    if output is None:
        return text
    try:
        Path(output).write_text(text)
    except OSError as exc:
        raise UserError(f"{output}: cannot write ({exc.strerror})") from None
    names = ", ".join(f"{o['kind']} {o['metadata']['name']}" for o in objs)
    return f"wrote {names} ({group}) to {output}"
