"""Names, labels and fixed places shared by the rendered objects and deploy/k8s.

deploy/k8s uses the same values (tests/test_k8s*.py check that they agree): a change here is a
change to the installed namespaces, service accounts, Secrets or admission policy as well.
"""

from __future__ import annotations

import hashlib
import re

NAMESPACE = "ray-training"  # the jobs: Ray clusters, RayJobs, their ConfigMaps
TRACKING_NAMESPACE = "ml-tracking"  # MLflow, PostgreSQL, MinIO and their Secrets
RAY_VERSION = "2.60.0"
IMAGE = "ray-gpu-orchestrator:0.1.0"  # built by deploy/docker/Dockerfile, tagged -cpu / -cuda
AUTH_SECRET = "ray-auth-token"  # the standing cluster's token; RayJobs get one generated each
JOB_SERVICE_ACCOUNT = "ray-job"  # RayJob heads, workers and submitters: no API token, no roles
HEAD_SERVICE_ACCOUNT = "ray-head"  # autoscaling clusters: only their autoscaler sidecar gets a token
WORKER_SERVICE_ACCOUNT = "ray-worker"
MLFLOW_SECRET = "mlflow-job-credentials"  # the jobs' MLflow user, in both namespaces
MLFLOW_CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")  # = the Secret's keys
MLFLOW_SERVICE = "mlflow"
MLFLOW_PORT = 5000

SHARED_CLAIM = "ray-shared"  # ReadWriteMany: checkpoints of every job, each in its own sub-path
SHARED_MOUNT = "/mnt/shared"  # a job's own sub-path of the shared volume
DATASETS_MOUNT = "/mnt/datasets"  # the volume's `datasets` sub-path: read-only in RayJobs
# What MLflow did not take waits here, on the job's storage: the pod's own disk (read-only, or an
# emptyDir) is gone with it, and a rerun of the job sends what is here.
SPILL_DIR = f"{SHARED_MOUNT}/tracking-spill"
DATASETS_SUBPATH = "datasets"
CONFIG_DIR = "/etc/orchestrator"  # where the job's ConfigMap is mounted in the head pod
CONFIG_FILE = "job.yaml"

# Pod labels. JOB_LABEL ties a RayJob's pods to its NetworkPolicy; the admission policy pins its
# value to the RayJob's name, so no job can join another's network group.
JOB_LABEL = "ray-gpu-orchestrator/job"
AUTOSCALER_LABEL = "ray-gpu-orchestrator/autoscaler"  # heads whose sidecar may reach the API server
OWNER_ANNOTATION = "ray-gpu-orchestrator/owner"  # the Kubernetes user who submitted the job
PART_OF = {"app.kubernetes.io/part-of": "ray-gpu-orchestrator"}

MAX_NAME = 40  # KubeRay derives longer names (cluster, pods, services) from a RayJob's name
HASH_CHARS = 8


def resource_name(name: str) -> str:
    """`name` as a DNS label of at most MAX_NAME characters, unique per original name.

    A name that is already a short DNS label is kept; any other gets a short stable hash of the
    original appended, so `My_Job`, `my.job` and `my-job` (and two long names sharing their
    first MAX_NAME characters) never render the same RayJob or ConfigMap.
    """
    slug = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if slug and not slug[0].isalpha():
        slug = f"job-{slug}"  # Service names must start with a letter
    if slug == name and len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:HASH_CHARS]
    stem = slug[:MAX_NAME - HASH_CHARS - 1].rstrip("-") or "job"
    return f"{stem}-{digest}"


def job_storage_subpath(owner: str, name: str) -> str:
    """A RayJob's own part of the shared volume (the admission policy pins the same path)."""
    return f"jobs/{owner}/{name}"


def cluster_storage_subpath(cluster: str) -> str:
    """A standing RayCluster's part of the shared volume, apart from every RayJob's."""
    return f"clusters/{cluster}"


def default_mlflow_uri() -> str:
    return f"http://{MLFLOW_SERVICE}.{TRACKING_NAMESPACE}.svc:{MLFLOW_PORT}"


def default_image(*, gpu: bool) -> str:
    return f"{IMAGE}-{'cuda' if gpu else 'cpu'}"
