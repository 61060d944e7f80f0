"""Pod templates of the Ray clusters we render: locked down to Kubernetes' "restricted" Pod
Security level, read-only root filesystems, and no API token in any container that runs job code.

deploy/k8s/base/jobs/raycluster.yaml describes the standing cluster's pods the same way
(tests/test_k8s.py compares the two).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestrator.k8s.names import (
    AUTOSCALER_LABEL,
    DATASETS_MOUNT,
    DATASETS_SUBPATH,
    JOB_LABEL,
    MLFLOW_CREDENTIAL_ENV,
    MLFLOW_SECRET,
    PART_OF,
    SHARED_CLAIM,
    SHARED_MOUNT,
)

RAY_UID, RAY_GID = 1000, 100  # the `ray` user of the Ray base image
RAY_HOME = "/home/ray"
CACHE_GI = 4  # pip, torch and compiler caches under ~/.cache
# Ray keeps its session (logs, sockets, runtime environments, spilled objects) under /tmp/ray.
MIN_TMP_GI = 4
SA_TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# What kubelet's own kube-api-access volume holds; 3607 s makes the API server issue the same
# extended-lifetime token it issues for that volume (the autoscaler re-reads it hourly anyway).
SA_TOKEN_EXPIRY_S = 3607
# Writable places for the tools that otherwise write under the read-only home directory.
CACHE_ENV = {"MPLCONFIGDIR": f"{RAY_HOME}/.cache/matplotlib", "TRITON_CACHE_DIR": f"{RAY_HOME}/.cache/triton"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Storage:
    """Where a cluster's pods mount the shared volume: their own sub-path at SHARED_MOUNT, and
    the shared datasets at DATASETS_MOUNT (read-only for RayJobs)."""

    subpath: str
    datasets_read_only: bool


def pod_labels(component: str, *, job: str | None = None, autoscaler: bool = False) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": "ray", "app.kubernetes.io/component": component, **PART_OF}
    if job is not None:
        labels[JOB_LABEL] = job
    if autoscaler:
        labels[AUTOSCALER_LABEL] = "true"
    return labels


def pod_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": RAY_UID, "runAsGroup": RAY_GID, "fsGroup": RAY_GID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def container_security() -> dict[str, Any]:
    # KubeRay copies this into the init container it injects (wait-gcs-ready), so that one meets
    # the "restricted" level too.
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


def resources(cpus: int | str, memory: str, gpus: int = 0) -> dict[str, Any]:
    amount: dict[str, str] = {"cpu": str(cpus), "memory": memory}
    if gpus:
        amount["nvidia.com/gpu"] = str(gpus)
    return {"requests": dict(amount), "limits": dict(amount)}


def ray_container(name: str, image: str, limits: dict[str, Any], *, mlflow_uri: str,
                  storage: Storage) -> dict[str, Any]:
    """A head or worker container. Probes are left to the operator, which injects Ray's."""
    env = [{"name": "MLFLOW_TRACKING_URI", "value": mlflow_uri}]
    env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": MLFLOW_SECRET, "key": key}}}
            for key in MLFLOW_CREDENTIAL_ENV]
    env += [{"name": key, "value": value} for key, value in CACHE_ENV.items()]
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "env": env,
        "resources": limits,
        "securityContext": container_security(),
        "volumeMounts": [
            *scratch_mounts(),
            {"name": "shm", "mountPath": "/dev/shm"},
            {"name": "shared", "mountPath": SHARED_MOUNT, "subPath": storage.subpath},
            {"name": "shared", "mountPath": DATASETS_MOUNT, "subPath": DATASETS_SUBPATH,
             "readOnly": storage.datasets_read_only},
        ],
    }


def scratch_mounts() -> list[dict[str, Any]]:
    return [{"name": "tmp", "mountPath": "/tmp"}, {"name": "cache", "mountPath": f"{RAY_HOME}/.cache"}]


def scratch_volumes(tmp_gi: int) -> list[dict[str, Any]]:
    return [
        {"name": "tmp", "emptyDir": {"sizeLimit": f"{max(MIN_TMP_GI, tmp_gi)}Gi"}},
        {"name": "cache", "emptyDir": {"sizeLimit": f"{CACHE_GI}Gi"}},
    ]


def ray_volumes(*, memory_gi: int, shm_gi: int) -> list[dict[str, Any]]:
    return [
        # Spilled objects land in /tmp/ray: room for about what the pod holds in memory.
        *scratch_volumes(memory_gi),
        # Ray's object store lives in /dev/shm, which container runtimes size at 64 MiB.
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_gi}Gi"}},
        {"name": "shared", "persistentVolumeClaim": {"claimName": SHARED_CLAIM}},
    ]


def api_token_volume() -> dict[str, Any]:
    """The service account token as kubelet would mount it, for the autoscaler sidecar only:
    the pod itself sets automountServiceAccountToken false, so the Ray container (where job
    drivers run) never sees it."""
    return {"name": "kube-api-access", "projected": {"defaultMode": 0o644, "sources": [
        {"serviceAccountToken": {"path": "token", "expirationSeconds": SA_TOKEN_EXPIRY_S}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
    ]}}


def autoscaler_options(idle_s: int) -> dict[str, Any]:
    return {
        "version": "v2",
        "upscalingMode": "Default",
        "idleTimeoutSeconds": idle_s,
        "imagePullPolicy": "IfNotPresent",
        "resources": resources("250m", "512Mi") | {"limits": {"cpu": "1", "memory": "1Gi"}},
        "securityContext": {**container_security(), "runAsNonRoot": True},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"},
                         {"name": "kube-api-access", "mountPath": SA_TOKEN_DIR, "readOnly": True}],
    }
