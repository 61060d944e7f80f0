"""Kubernetes objects for one training job, as plain dicts: the job's ConfigMap, a KubeRay RayJob
and its NetworkPolicy, or a standalone autoscaling RayCluster and its NetworkPolicy. Nothing here
talks to a cluster; deploy/k8s installs what these objects use (namespaces, service accounts, the
shared volume, the MLflow credentials Secret, the admission policy that checks RayJobs).
"""

from __future__ import annotations

import posixpath
import shlex
from collections.abc import Mapping
from typing import Any

import yaml

from orchestrator.config import JobConfig
from orchestrator.errors import UserError
from orchestrator.k8s import pods
from orchestrator.k8s.names import (
    AUTH_SECRET,
    CONFIG_DIR,
    CONFIG_FILE,
    DATASETS_MOUNT,
    HEAD_SERVICE_ACCOUNT,
    JOB_LABEL,
    JOB_SERVICE_ACCOUNT,
    NAMESPACE,
    OWNER_ANNOTATION,
    PART_OF,
    RAY_VERSION,
    SHARED_MOUNT,
    SPILL_DIR,
    WORKER_SERVICE_ACCOUNT,
    cluster_storage_subpath,
    default_mlflow_uri,
    job_storage_subpath,
    resource_name,
)
from orchestrator.k8s.sizing import WorkerGroup, deadline_seconds, worker_group
from orchestrator.redact import AMBIGUOUS_AT, masked_fields, redact, redact_uri, secret_fields

HEAD_CPUS, HEAD_MEMORY_GI, HEAD_SHM_GI = 2, 8, 2
AUTOSCALER_IDLE_S = 300
TTL_AFTER_FINISHED_S = 3600  # keep a finished job's cluster this long for its logs
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


# ---------------------------------------------------------------------------------------------
# The job's config as the cluster runs it


def cluster_job_config(config: JobConfig, *, mlflow_uri: str) -> dict[str, Any]:
    """The config with paths on the job's own storage, the in-cluster MLflow and Ray, and no
    credentials (MLflow's come from the job's Secret, not from the config)."""
    data = config.to_dict()
    if found := secret_fields(data):  # masked, the job would run with '***' in its place
        raise UserError(f"{found[0]}: a secret would be written into the job's ConfigMap, readable by anyone who "
                        "can read the namespace; the cluster's jobs take only MLflow's credentials, from their "
                        "Secret (docs/kubernetes.md)")
    data["checkpoint"]["storage_path"] = _in_pod(config.checkpoint.storage_path, "checkpoint.storage_path",
                                                 roots=(SHARED_MOUNT,))
    paths = [_in_pod(p, "data.path", roots=(SHARED_MOUNT, DATASETS_MOUNT)) for p in config.data.paths]
    data["data"]["path"] = paths[0] if isinstance(config.data.path, str) else paths
    data["tracking"]["tracking_uri"] = redact_uri(mlflow_uri)
    data["tracking"]["spill_dir"] = SPILL_DIR  # a path of the submitter's machine is no place in the pod
    data["ray"]["address"] = "auto"  # the job's driver runs on the head of a running cluster
    # A file of the submitter's machine, not in the pod (the job failed once its GPUs were scheduled):
    # the job sizes on the cluster it runs on, its network probed there (render_notes says so).
    data["resources"]["cluster"] = None
    if found := masked_fields(data):  # `redact` would write the host after the '@' in its place
        raise UserError(f"{found[0]}: {AMBIGUOUS_AT}")
    return redact(data)


def _in_pod(path: str, field: str, *, roots: tuple[str, ...]) -> str:
    """`path` as the pod sees it: relative paths land in the job's own storage; the result,
    normalized (so `..` cannot climb out), must lie under one of `roots`, or be a remote URI
    (a file:// URI names a path in the pod, so it is held to the same roots)."""
    file_uri = path[:7].lower() == "file://"
    if "://" in path and not file_uri:
        return path
    local = "/" + path[7:].partition("/")[2] if file_uri else path  # file://[HOST]/PATH: the pod's own PATH
    resolved = posixpath.normpath(posixpath.join(SHARED_MOUNT, local))
    if not any(resolved == root or resolved.startswith(root + "/") for root in roots):
        allowed = " or ".join(f"{root}/" for root in roots)
        raise UserError(f"{field}: {path} is outside the job's storage; use a relative path, "
                        f"one under {allowed}, or an s3:// URI")
    return f"file://{resolved}" if file_uri else resolved


def config_map_name(name: str) -> str:
    return f"{name}-config"


def render_job_configmap(config: JobConfig, *, owner: str, namespace: str = NAMESPACE,
                         mlflow_uri: str | None = None) -> dict[str, Any]:
    """The ConfigMap mounted at CONFIG_DIR in the RayJob's head pod."""
    job = cluster_job_config(config, mlflow_uri=mlflow_uri or default_mlflow_uri())
    name = resource_name(config.name)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(config_map_name(name), namespace, name, "job-config", owner=owner),
        "data": {CONFIG_FILE: yaml.safe_dump(job, sort_keys=False)},
    }


# ---------------------------------------------------------------------------------------------
# A RayJob: its own cluster, sized for the plan, removed when the job ends


def render_rayjob(config: JobConfig, *, owner: str, config_path: str, plan: Mapping[str, Any] | None,
                  image: str, namespace: str = NAMESPACE, mlflow_uri: str | None = None,
                  config_sha256: str | None = None) -> dict[str, Any]:
    """A RayJob that brings up a cluster sized for the plan, trains, and shuts the cluster down.

    `config_path` is the config's path inside the head pod: the job's ConfigMap mounted at
    CONFIG_DIR (see render_job_configmap), or a file baked into the image. Every pod runs as the
    token-less JOB_SERVICE_ACCOUNT and mounts only the job's own part of the shared volume.
    `config_sha256` (of the ConfigMap's file) goes into the entrypoint: `orchestrator run` refuses a
    config of another digest, so a `<name>-config` another submitter created first is never run
    on this owner's storage (no admission policy can tie the ConfigMap to the RayJob's owner).
    """
    group = worker_group(config, plan)
    uri = redact_uri(mlflow_uri or default_mlflow_uri())
    name = resource_name(config.name)
    storage = pods.Storage(subpath=job_storage_subpath(owner, name), datasets_read_only=True)
    head = _head_group(image, uri, storage, labels=pods.pod_labels("head", job=name),
                       service_account=JOB_SERVICE_ACCOUNT)
    _mount_config(head["template"]["spec"], config_map_name(name))
    spec = {
        "rayVersion": RAY_VERSION,
        # No secretName: the operator generates a token for this cluster alone.
        "authOptions": {"mode": "token"},
        "enableInTreeAutoscaling": False,
        "headGroupSpec": head,
        "workerGroupSpecs": [_worker_group(group, image, uri, storage, autoscale=False, job=name,
                                           service_account=JOB_SERVICE_ACCOUNT)],
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": _metadata(name, namespace, name, "ray-job", owner=owner),
        "spec": {
            "entrypoint": f"orchestrator run {shlex.quote(config_path)} --workers {group.workers}"
                          + (f" --config-sha256 {config_sha256}" if config_sha256 else ""),
            # One line whatever its length: the admission policy admits exactly that shape.
            "runtimeEnvYAML": yaml.safe_dump({"env_vars": {"MLFLOW_TRACKING_URI": uri}}, width=float("inf")),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": TTL_AFTER_FINISHED_S,
            "activeDeadlineSeconds": deadline_seconds(config, plan),
            "submissionMode": "K8sJobMode",
            "submitterPodTemplate": _submitter_template(image, job=name),
            "rayClusterSpec": spec,
        },
    }


def _mount_config(pod: dict[str, Any], config_map: str) -> None:
    # optional: a RayJob whose config is baked into the image needs no ConfigMap.
    pod["volumes"].append({"name": "job-config", "configMap": {"name": config_map, "optional": True}})
    pod["containers"][0]["volumeMounts"].append({"name": "job-config", "mountPath": CONFIG_DIR, "readOnly": True})


def _submitter_template(image: str, *, job: str) -> dict[str, Any]:
    """The pod that runs `ray job submit`; in the job's network group, so it reaches the head."""
    container = {
        "name": "ray-job-submitter",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "resources": pods.resources("100m", "256Mi") | {"limits": {"cpu": "1", "memory": "1Gi"}},
        "securityContext": pods.container_security(),
        "volumeMounts": pods.scratch_mounts(),
    }
    return {
        "metadata": {"labels": pods.pod_labels("ray-submitter", job=job)},
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": JOB_SERVICE_ACCOUNT,
            "automountServiceAccountToken": False,
            "securityContext": pods.pod_security(),
            "containers": [container],
            "volumes": pods.scratch_volumes(0),
        },
    }


# ---------------------------------------------------------------------------------------------
# A standing, autoscaling RayCluster (for `orchestrator submit`)


def render_raycluster(config: JobConfig, *, plan: Mapping[str, Any] | None, image: str,
                      namespace: str = NAMESPACE, mlflow_uri: str | None = None) -> dict[str, Any]:
    """A long-lived autoscaling RayCluster: workers from 0 up to the plan's pods, on demand."""
    group = worker_group(config, plan)
    uri = redact_uri(mlflow_uri or default_mlflow_uri())
    name = resource_name(config.name)
    storage = pods.Storage(subpath=cluster_storage_subpath(name), datasets_read_only=False)
    head = _head_group(image, uri, storage, labels=pods.pod_labels("head", autoscaler=True),
                       service_account=HEAD_SERVICE_ACCOUNT)
    head["template"]["spec"]["volumes"].append(pods.api_token_volume())
    spec = {
        "rayVersion": RAY_VERSION,
        "authOptions": {"mode": "token", "secretName": AUTH_SECRET},
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": pods.autoscaler_options(AUTOSCALER_IDLE_S),
        "headGroupSpec": head,
        "workerGroupSpecs": [_worker_group(group, image, uri, storage, autoscale=True, job=None,
                                           service_account=WORKER_SERVICE_ACCOUNT)],
    }
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster",
            "metadata": _metadata(name, namespace, name, "ray-cluster"), "spec": spec}


# ---------------------------------------------------------------------------------------------
# Pieces


def _metadata(name: str, namespace: str, instance: str, component: str, *, owner: str | None = None
              ) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": "ray", "app.kubernetes.io/component": component,
              "app.kubernetes.io/instance": instance, **PART_OF}
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels}
    if owner is not None:
        meta["annotations"] = {OWNER_ANNOTATION: owner}
    return meta


def _head_group(image: str, mlflow_uri: str, storage: pods.Storage, *, labels: dict[str, str],
                service_account: str) -> dict[str, Any]:
    limits = pods.resources(HEAD_CPUS, f"{HEAD_MEMORY_GI}Gi")
    container = pods.ray_container("ray-head", image, limits, mlflow_uri=mlflow_uri, storage=storage)
    container["ports"] = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
    ]
    return {
        "serviceType": "ClusterIP",
        # The head schedules no training; the dashboard is reached through the ClusterIP service.
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        "template": {
            "metadata": {"labels": labels},
            "spec": {"serviceAccountName": service_account, "automountServiceAccountToken": False,
                     "securityContext": pods.pod_security(), "containers": [container],
                     "volumes": pods.ray_volumes(memory_gi=HEAD_MEMORY_GI, shm_gi=HEAD_SHM_GI)},
        },
    }


def _worker_group(group: WorkerGroup, image: str, mlflow_uri: str, storage: pods.Storage, *, autoscale: bool,
                  job: str | None, service_account: str) -> dict[str, Any]:
    limits = pods.resources(group.cpus_per_pod, f"{group.memory_gi}Gi", group.gpus_per_pod)
    spec: dict[str, Any] = {
        "serviceAccountName": service_account,
        "automountServiceAccountToken": False,
        "securityContext": pods.pod_security(),
    }
    if group.gpu:
        spec["tolerations"] = [GPU_TOLERATION]
    spec["containers"] = [pods.ray_container("ray-worker", image, limits, mlflow_uri=mlflow_uri, storage=storage)]
    spec["volumes"] = pods.ray_volumes(memory_gi=group.memory_gi, shm_gi=max(1, group.memory_gi // 3))
    return {
        "groupName": "gpu" if group.gpu else "cpu",
        # A job's cluster is fixed at the plan's size; a standing cluster scales 0..that.
        "replicas": 0 if autoscale else group.pods,
        "minReplicas": 0 if autoscale else group.pods,
        "maxReplicas": group.pods,
        "rayStartParams": {},
        "template": {"metadata": {"labels": pods.pod_labels("worker", job=job)}, "spec": spec},
    }


# ---------------------------------------------------------------------------------------------
# Network: each cluster talks to itself only (deploy/k8s adds DNS and MLflow for every Ray pod)


def network_policy_name(name: str) -> str:
    return f"{name}-net"


def render_job_network_policy(name: str, *, owner: str, namespace: str = NAMESPACE) -> dict[str, Any]:
    """A RayJob's pods (head, workers, submitter: all carry JOB_LABEL=name) reach each other on
    any port, and nothing else of the namespace reaches them."""
    peers = [{"podSelector": {"matchLabels": {JOB_LABEL: name}}}]
    return _network_policy(network_policy_name(name), namespace, {"matchLabels": {JOB_LABEL: name}},
                           peers, name=name, owner=owner)


def render_cluster_network_policy(name: str, *, namespace: str = NAMESPACE) -> dict[str, Any]:
    """The same for a standing RayCluster, whose pods the operator labels ray.io/cluster=name."""
    selector = {"matchLabels": {"ray.io/cluster": name}}
    return _network_policy(network_policy_name(name), namespace, selector, [{"podSelector": selector}],
                           name=name, owner=None)


def _network_policy(policy: str, namespace: str, selector: dict[str, Any], peers: list[dict[str, Any]], *,
                    name: str, owner: str | None) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(policy, namespace, name, "network", owner=owner),
        "spec": {"podSelector": selector, "policyTypes": ["Ingress", "Egress"],
                 "ingress": [{"from": peers}], "egress": [{"to": peers}]},
    }
