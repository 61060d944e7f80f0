"""Connections a compromised job (or anything else) would try, against the NetworkPolicies of each
overlay plus two rendered RayJobs: only a job's own cluster, DNS and MLflow's port are open to
it; the metadata address, the API server, the internet, other jobs and the databases are not."""

from __future__ import annotations

from typing import Any

import pytest
from k8s_fixtures import deploy_dir, overlays  # noqa: F401 (fixtures)
from k8s_netpol import Address, Network, Pod
from k8s_util import DIGITS, OVERLAYS, OWNER, by_kind, one, pod_templates

from orchestrator.k8s.command import k8s_render_command

Obj = dict[str, Any]
METADATA = Address("169.254.169.254", "cloud metadata")
API_ENDPOINT = Address("10.0.0.1", "API server endpoint")
API_SERVICE = Address("10.96.0.1", "kubernetes service")
INTERNET = Address("93.184.216.34", "internet host")
BUCKET = Address("52.216.0.10", "S3 endpoint")


def rendered_job(name: str) -> list[Obj]:
    import yaml

    text = k8s_render_command(DIGITS, plan_path=None, image=None, output=None, cluster=False,
                              overrides=[f"name={name}", "resources.workers=2"], owner=OWNER).text
    return [d for d in yaml.safe_load_all(text) if d]


def ray_pod(obj: Obj, role: str, cluster: str, ip: str) -> Pod:
    """A pod of a RayCluster/RayJob as the operator creates it: its template's labels plus KubeRay's."""
    template = dict(pod_templates(obj))[role]
    labels = dict(template["metadata"]["labels"])
    if role != "submitter":
        node_type = "head" if role == "head" else "worker"
        labels |= {"ray.io/cluster": cluster, "ray.io/node-type": node_type, "ray.io/is-ray-node": "yes"}
    return Pod("ray-training", labels, ip, f"{cluster} {role}")


def workload_pod(objs: list[Obj], kind: str, name: str, ip: str) -> Pod:
    obj = one(objs, kind, name)
    return Pod(obj["metadata"]["namespace"], obj["spec"]["template"]["metadata"]["labels"], ip, name)


@pytest.fixture(scope="module", params=OVERLAYS)
def world(request: pytest.FixtureRequest, overlays: dict[str, list[Obj]]) -> dict[str, Any]:
    objs = overlays[request.param]
    job_a, job_b = rendered_job("job-a"), rendered_job("job-b")
    standing = one(objs, "RayCluster")
    pods = {
        "a-head": ray_pod(one(job_a, "RayJob"), "head", "job-a-x7k2p", "10.244.1.10"),
        "a-worker": ray_pod(one(job_a, "RayJob"), "worker group cpu", "job-a-x7k2p", "10.244.1.11"),
        "a-submitter": ray_pod(one(job_a, "RayJob"), "submitter", "", "10.244.1.12"),
        "b-head": ray_pod(one(job_b, "RayJob"), "head", "job-b-q9w3e", "10.244.2.10"),
        "b-worker": ray_pod(one(job_b, "RayJob"), "worker group cpu", "job-b-q9w3e", "10.244.2.11"),
        "ray-head": ray_pod(standing, "head", "ray", "10.244.3.10"),
        "ray-worker": ray_pod(standing, f"worker group {standing['spec']['workerGroupSpecs'][0]['groupName']}",
                              "ray", "10.244.3.11"),
        "mlflow": workload_pod(objs, "Deployment", "mlflow", "10.244.4.10"),
        "postgres": workload_pod(objs, "StatefulSet", "postgres", "10.244.4.11"),
        "dns": Pod("kube-system", {"k8s-app": "kube-dns"}, "10.244.0.2", "kube-dns"),
        "kuberay": Pod("kuberay-system", {"app.kubernetes.io/name": "kuberay-operator"}, "10.244.0.3", "operator"),
        "stranger": Pod("default", {"app": "web"}, "10.244.9.9", "a pod of another namespace"),
    }
    if request.param == "dev":
        pods["minio"] = workload_pod(objs, "StatefulSet", "minio", "10.244.4.12")
    policies = by_kind(objs, "NetworkPolicy") + by_kind(job_a, "NetworkPolicy") + by_kind(job_b, "NetworkPolicy")
    return {"overlay": request.param, "net": Network(policies), "pods": pods}


def check(world: dict[str, Any], cases: list[tuple[str, str | Address, int, bool]], protocol: str = "TCP") -> None:
    pods, net = world["pods"], world["net"]
    wrong = []
    for source, target, port, expected in cases:
        destination = pods[target] if isinstance(target, str) else target
        if net.allowed(pods[source], destination, port, protocol) != expected:
            wrong.append(f"{source} -> {destination}:{port} should be {'open' if expected else 'closed'}")
    assert not wrong, f"{world['overlay']}: " + "; ".join(wrong)


def test_a_job_reaches_its_own_cluster_dns_and_mlflow_only(world: dict[str, Any]) -> None:
    check(world, [
        ("a-head", "a-worker", 10001, True), ("a-worker", "a-head", 6379, True),
        ("a-submitter", "a-head", 8265, True), ("a-head", "mlflow", 5000, True), ("a-worker", "mlflow", 5000, True),
        ("a-head", "mlflow", 22, False), ("a-head", "postgres", 5432, False),
        ("a-submitter", "mlflow", 5000, False),
    ])
    check(world, [("a-worker", "dns", 53, True), ("a-submitter", "dns", 53, True)], protocol="UDP")


def test_jobs_cannot_reach_each_other_or_the_standing_cluster(world: dict[str, Any]) -> None:
    check(world, [
        ("a-head", "b-head", 6379, False), ("b-worker", "a-head", 8265, False), ("a-worker", "b-worker", 10001, False),
        ("a-head", "ray-head", 6379, False), ("ray-worker", "a-head", 8265, False), ("ray-head", "ray-worker", 6379, True),
        ("b-head", "b-worker", 6379, True),
    ])


def test_metadata_api_server_and_internet_are_closed(world: dict[str, Any]) -> None:
    cases = [(pod, target, port, False) for pod in ("a-head", "a-worker", "a-submitter", "ray-worker", "postgres")
             for target, port in ((METADATA, 80), (API_ENDPOINT, 6443), (API_SERVICE, 443), (INTERNET, 443))]
    # The standing head's autoscaler sidecar alone reaches the API server (private ranges, 443/6443).
    cases += [("ray-head", API_ENDPOINT, 6443, True), ("ray-head", METADATA, 80, False),
              ("ray-head", INTERNET, 443, False), ("ray-head", "a-head", 443, False)]
    bucket = world["overlay"] == "gpu"  # MLflow's artifacts: MinIO in dev, a bucket over HTTPS in gpu
    cases += [("mlflow", BUCKET, 443, bucket), ("mlflow", METADATA, 443, False), ("mlflow", METADATA, 80, False),
              ("mlflow", API_SERVICE, 443, False), ("mlflow", "postgres", 5432, True), ("mlflow", INTERNET, 80, False)]
    if world["overlay"] == "dev":
        cases += [("mlflow", "minio", 9000, True), ("a-head", "minio", 9000, False)]
    check(world, cases)


def test_only_ray_pods_reach_mlflow_and_only_the_operator_the_heads(world: dict[str, Any]) -> None:
    check(world, [
        ("stranger", "mlflow", 5000, False), ("stranger", "a-head", 8265, False), ("stranger", "ray-head", 6379, False),
        ("kuberay", "a-head", 8265, True), ("kuberay", "ray-head", 8265, True), ("kuberay", "a-worker", 8265, False),
        ("kuberay", "a-head", 6379, False), ("postgres", "mlflow", 5000, False),
    ])


def test_minio_serves_only_its_s3_port(overlays: dict[str, list[Obj]]) -> None:
    # its web console listened on 9001 for the root credentials, reachable by port-forward
    (minio,) = one(overlays["dev"], "StatefulSet", "minio")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in minio["env"]}
    assert env.get("MINIO_BROWSER") == "off" and not any("console" in a for a in minio["args"]), minio
    assert [p["containerPort"] for p in minio["ports"]] == [9000]
