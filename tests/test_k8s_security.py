"""The Kubernetes items of issue 12 (and issue 14's `k8s render` notes), each tried on what
`orchestrator k8s render` and the overlays produce: names that collide, paths that climb out,
credentials in a URI, API tokens, the "restricted" Pod Security level, read-only roots, the
database password on a command line, disruption budgets, moving image tags, shared storage."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from k8s_fixtures import deploy_dir, manifests, overlays, variants  # noqa: F401 (fixtures)
from k8s_util import DEPLOY, DIGITS, OWNER, all_objects, by_kind, containers, one, pod_templates

from orchestrator.errors import UserError
from orchestrator.k8s import names
from orchestrator.k8s.command import k8s_render_command

Obj = dict[str, Any]
# What the "restricted" Pod Security Standard allows (kubernetes.io/docs/concepts/security/pod-security-standards).
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def render(*overrides: str, **kwargs: Any) -> list[Obj]:
    text = k8s_render_command(DIGITS, plan_path=None, image=None, output=None, cluster=False,
                              overrides=["resources.workers=2", *overrides], owner=OWNER, **kwargs).text
    return [d for d in yaml.safe_load_all(text) if d]


# ---------------------------------------------------------------------------------------------
# Names and paths (item 7)


def test_names_that_kubernetes_would_merge_render_apart() -> None:
    long = "a-very-long-experiment-name-shared-by-two-jobs-"
    originals = ["My_Job", "my.job", "my-job", long + "one", long + "two", "9lives"]
    rendered = {}
    for original in originals:
        objs = render(f"name={original}")
        rendered[original] = {o["kind"]: o["metadata"]["name"] for o in objs}
        for name in rendered[original].values():
            assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= names.MAX_NAME + 7, name
    for kind in ("RayJob", "ConfigMap", "NetworkPolicy"):
        found = [r[kind] for r in rendered.values()]
        assert len(set(found)) == len(originals), f"{kind}: {found}"
    assert rendered["my-job"]["RayJob"] == "my-job"  # a valid name is kept as it is
    assert names.resource_name("My_Job") == names.resource_name("My_Job")  # stable


@pytest.mark.parametrize("path", ["/mnt/shared/../../tmp/x", "../../etc", "/mnt/shared/../datasets2",
                                  "runs/../../../home/ray"])
def test_paths_that_climb_out_of_the_job_storage_are_refused(path: str) -> None:
    with pytest.raises(UserError, match=re.escape(f"checkpoint.storage_path: {path} is outside the job's storage")):
        render(f"checkpoint.storage_path={path}")


@pytest.mark.parametrize("override, shown", [("checkpoint.storage_path=file:///etc", "checkpoint.storage_path: file:///etc"),
                                              ("data.path=file://localhost/mnt/datasets/../../etc", "data.path: file://")])
def test_a_file_uri_is_a_path_in_the_pod_and_cannot_climb_out_either(override: str, shown: str) -> None:
    # was passed through as any URI is: the job read and wrote the pod's /etc, past the storage check
    with pytest.raises(UserError, match=re.escape(shown) + ".* is outside the job's storage"):
        render("data.dataset=null", override)  # data put there, not a built-in set (prepared into a folder only)
    objs = render("checkpoint.storage_path=file:///mnt/shared/a/../ckpt")
    config = yaml.safe_load(one(objs, "ConfigMap")["data"][names.CONFIG_FILE])
    assert config["checkpoint"]["storage_path"] == "file:///mnt/shared/ckpt"


def test_paths_on_the_job_storage_are_normalized() -> None:
    objs = render("checkpoint.storage_path=/mnt/shared/runs/../ckpt", "data.path=/mnt/datasets/./digits")
    config = yaml.safe_load(one(objs, "ConfigMap")["data"][names.CONFIG_FILE])
    assert config["checkpoint"]["storage_path"] == "/mnt/shared/ckpt"
    assert config["data"]["path"] == "/mnt/datasets/digits"


# ---------------------------------------------------------------------------------------------
# Credentials (items 4 and 5)


def test_credentials_in_a_tracking_uri_never_reach_the_manifests() -> None:
    uri = "http://trainer:s3cr3t-pw@mlflow.example:5000/?token=t0ken-value"
    for overrides, kwargs in (([f"tracking.tracking_uri={uri}"], {}), ([], {"mlflow_uri": uri})):
        rendered = k8s_render_command(DIGITS, plan_path=None, image=None, output=None, cluster=False,
                                      overrides=["resources.workers=2", *overrides], owner=OWNER, **kwargs)
        for secret in ("s3cr3t-pw", "trainer:", "t0ken-value"):
            assert secret not in rendered.text, (kwargs, secret)
        assert any("credentials removed" in note for note in rendered.notes)
    job = one(render(mlflow_uri=uri), "RayJob")
    env = {e["name"]: e for _, t in pod_templates(job) for c in containers(t) for e in c.get("env", [])}
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow.example:5000/"
    for key in names.MLFLOW_CREDENTIAL_ENV:  # the job signs in with the Secret instead
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": names.MLFLOW_SECRET, "key": key}


def test_credentials_in_storage_uris_are_removed_and_said() -> None:
    """They were dropped from the ConfigMap without a word: the job then failed on the cluster to
    read data its config could read here."""
    rendered = k8s_render_command(DIGITS, plan_path=None, image=None, output=None, cluster=False, owner=OWNER,
                                  overrides=["data.dataset=null", "data.path=s3://AKIAKEY:s3cr3t@bucket/digits",
                                             "checkpoint.storage_path=s3://AKIAKEY:s3cr3t@bucket/runs"])
    assert "s3cr3t" not in rendered.text and "AKIAKEY" not in rendered.text
    said = [n for n in rendered.notes if "credentials removed" in n]
    assert [n.split(":")[0] for n in said] == ["data.path", "checkpoint.storage_path"], rendered.notes
    assert all("service account" in n for n in said)


def test_the_job_spills_onto_its_storage_whatever_spill_dir_the_config_names() -> None:
    """`tracking.spill_dir: /home/alice/spill` went into the ConfigMap as given: on the pod's
    read-only filesystem the job failed as it opened its run; without it, spills went to an emptyDir
    gone with the pod."""
    for overrides in ([], ["tracking.spill_dir=/home/alice/spill"]):
        rendered = k8s_render_command(DIGITS, plan_path=None, image=None, output=None, cluster=False, owner=OWNER,
                                      overrides=overrides)
        config = yaml.safe_load(one(list(yaml.safe_load_all(rendered.text)), "ConfigMap")["data"][names.CONFIG_FILE])
        assert config["tracking"]["spill_dir"] == f"{names.SHARED_MOUNT}/tracking-spill"
        assert any(n.startswith("tracking.spill_dir: the job spills to /mnt/shared/tracking-spill") for n in
                   rendered.notes) == bool(overrides)


def test_a_raycluster_says_nothing_of_a_job_config_it_does_not_hold() -> None:
    """--cluster renders no ConfigMap: its notes said the job spills to /mnt/shared/tracking-spill and
    that a ConfigMap's storage URIs lost their credentials, when `submit` runs the config as given."""
    rendered = k8s_render_command(DIGITS, plan_path=None, image=None, output=None, cluster=True,
                                  overrides=["tracking.spill_dir=/home/alice/spill", "data.dataset=null",
                                             "data.path=s3://AKIAKEY:s3cr3t@bucket/digits"])
    assert "ConfigMap" not in {o["kind"] for o in yaml.safe_load_all(rendered.text) if o}
    assert not [n for n in rendered.notes if n.startswith(("tracking.spill_dir", "data.path"))], rendered.notes


@pytest.mark.parametrize("uri, error", [
    ("", "--mlflow-uri: empty; leave it out for the in-cluster MLflow"),
    ("ftp://mlflow.example", "--mlflow-uri: scheme 'ftp' is no MLflow tracking store"),
    ("http://trainer:s3cr3t-pw@mlflow.example:99999", "--mlflow-uri: not a valid URI (Port out of range 0-65535), got 'http://mlflow.example:99999'"),
    # rendered, then denied by the admission policy, which admits a one-word MLFLOW_TRACKING_URI only
    ("http://mlflow.example:5000/team a", "--mlflow-uri: holds a space; percent-encode it (%20)"),
    # urlsplit drops the newline, so the check passed and the pods' MLFLOW_TRACKING_URI held it
    ("http://trainer:s3cr3t-pw@mlflow.example\n:5000", "--mlflow-uri: holds a control character (such as a newline "
                                                        "or tab); give the URI on one line, got 'http://mlflow.example\\n:5000'"),
])
def test_a_bad_mlflow_uri_is_one_line_without_its_credentials(uri: str, error: str) -> None:
    with pytest.raises(UserError) as err:
        k8s_render_command(DIGITS, plan_path=None, image=None, output=None, cluster=False, overrides=[],
                           owner=OWNER, mlflow_uri=uri)
    assert str(err.value).startswith(error) and "s3cr3t" not in str(err.value), str(err.value)


def test_a_long_mlflow_uri_keeps_the_one_line_runtime_env_the_admission_policy_admits() -> None:
    # was folded by the YAML emitter at 80 columns (a quoted scalar with escaped line breaks): denied
    policy, _binding = yaml.safe_load_all((DEPLOY / "base" / "admission" / "rayjobs.yaml").read_text())
    (expression,) = [v["expression"] for v in policy["spec"]["validations"] if "runtimeEnvYAML.matches" in v["expression"]]
    admitted = re.search(r"runtimeEnvYAML\.matches\('(.*)'\)", expression).group(1).encode().decode("unicode_escape")
    uri = "http://mlflow.example:5000/" + "\u00e9quipe" * 20
    job = one(render(mlflow_uri=uri), "RayJob")
    assert re.fullmatch(admitted, job["spec"]["runtimeEnvYAML"]), job["spec"]["runtimeEnvYAML"]
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"] == uri


@pytest.mark.parametrize("uri", ["http://mlflow.example:5000/team@a",
                                 "http://trainer:2024/s3cr3t@mlflow.example:5000",
                                 "https://trainer:p@s3cr3t/x@mlflow.example.com/x", "http://u:p@s3cr3t/x@[::1]:5000"])
def test_an_mlflow_uri_redaction_can_only_mask_is_refused_not_rendered_as_another_host(uri: str) -> None:
    # was rendered as MLFLOW_TRACKING_URI http://***@a and tracking_uri http://a: the job's MLflow at host a
    with pytest.raises(UserError) as err:
        k8s_render_command(DIGITS, plan_path=None, image=None, output=None, cluster=False, overrides=[],
                           owner=OWNER, mlflow_uri=uri)
    assert str(err.value).startswith("--mlflow-uri: an '@' after a '/', '?' or '#' reads as a path's and as a "
                                     "password's end alike"), str(err.value)
    assert "s3cr3t" not in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("override", ["data.path=s3://AKIA:s3cr3t@bucket/model@v1.2/x",
                                      "checkpoint.storage_path=s3://AKIA:s3cr3t@bucket/ck@h:5000"])
def test_a_config_value_redaction_can_only_mask_is_refused_not_rendered_as_another_bucket(override: str) -> None:
    # was written into the ConfigMap as s3://v1.2/x and s3://h:5000: the job read and wrote another bucket
    with pytest.raises(UserError) as err:
        render("data.dataset=null", override)
    assert str(err.value).startswith(f"{override.partition('=')[0]}: an '@' after a '/'"), str(err.value)
    assert "s3cr3t" not in str(err.value)
    assert "path: s3://bucket/v1@2024/x" in yaml.safe_dump_all(render("data.dataset=null",
                                                                      "data.path=s3://AKIA:s3cr3t@bucket/v1@2024/x"))


def test_mlflow_has_authentication_and_no_password_on_its_command_line(overlays: dict[str, list[Obj]]) -> None:
    for objs in overlays.values():
        pod = one(objs, "Deployment", "mlflow")["spec"]["template"]["spec"]
        server = pod["containers"][0]
        assert "--app-name=basic-auth" in server["args"]
        assert not [a for a in server["args"] + server.get("command", []) if "PASSWORD" in a or "@" in a]
        store = [a for a in server["args"] if a.startswith("--backend-store-uri=")][0]
        assert store.endswith("?sslmode=prefer")
        env = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") for e in server["env"]}
        assert env["PGPASSWORD"] == "postgres-credentials" and env["MLFLOW_AUTH_ADMIN_PASSWORD"] == "mlflow-auth"
        setup = one(objs, "ConfigMap", "mlflow-auth")["data"]
        assert "sslmode=prefer" in setup["basic_auth.ini"] and "password" not in setup["basic_auth.ini"].split("[mlflow]")[1]
        assert [c["name"] for c in pod["initContainers"]][0] == "auth-setup"


def test_job_pods_hold_no_api_token_and_only_the_autoscaler_does(manifests: dict[str, list[Obj]]) -> None:
    token_dir = "/var/run/secrets/kubernetes.io/serviceaccount"
    for where, obj in all_objects(manifests):
        for role, template in pod_templates(obj):
            pod = template["spec"]
            assert pod["automountServiceAccountToken"] is False, f"{where} {role}"
            assert not [c for c in containers(template) for m in c.get("volumeMounts", [])
                        if m["mountPath"].startswith(token_dir)], f"{where} {role}: a container mounts a token"
            if obj["kind"] == "RayJob":
                assert pod["serviceAccountName"] == names.JOB_SERVICE_ACCOUNT, where
        if obj["kind"] == "RayCluster":  # the autoscaler sidecar alone mounts the projected token
            mounts = obj["spec"]["autoscalerOptions"]["volumeMounts"]
            assert {"name": "kube-api-access", "mountPath": token_dir, "readOnly": True} in mounts, where
    for objs in manifests.values():
        for account in by_kind(objs, "ServiceAccount"):
            assert account["automountServiceAccountToken"] is False, account["metadata"]["name"]


def test_submitters_get_no_secrets(overlays: dict[str, list[Obj]]) -> None:
    for objs in overlays.values():
        role = one(objs, "Role", "ray-job-submitter")
        assert role["metadata"]["namespace"] == names.NAMESPACE
        granted = {r for rule in role["rules"] for r in rule["resources"]}
        assert "secrets" not in granted and "*" not in granted
        assert not [r for r in role["rules"] if "*" in r["verbs"] or "escalate" in r["verbs"] or "bind" in r["verbs"]]
        # MLflow's config, its Secrets and the databases are in another namespace than the jobs.
        for name in ("mlflow-config", "mlflow-auth", "postgres-credentials", "mlflow-s3-credentials"):
            assert {o["metadata"]["namespace"] for o in objs if o["metadata"]["name"] == name} == {"ml-tracking"}
        for kind in ("Deployment", "StatefulSet"):
            assert {o["metadata"]["namespace"] for o in by_kind(objs, kind)} == {"ml-tracking"}


# ---------------------------------------------------------------------------------------------
# Pod Security "restricted" (item 3) and container hygiene (item 9)


def restricted_violations(template: Obj, injected: list[Obj]) -> list[str]:
    """What the "restricted" level refuses in a pod (with the containers an operator adds)."""
    pod, found = template["spec"], []
    security = pod.get("securityContext", {})
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            found.append(field)
    found += [f"volume {v['name']}" for v in pod.get("volumes", []) if not set(v) - {"name"} <= RESTRICTED_VOLUMES]
    for c in containers(template) + injected:
        sc = c.get("securityContext", {})
        if sc.get("privileged") or sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{c['name']}: privilege escalation")
        if sc.get("capabilities", {}).get("drop") != ["ALL"] or set(sc.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{c['name']}: capabilities")
        if not (sc.get("runAsNonRoot", security.get("runAsNonRoot")) is True):
            found.append(f"{c['name']}: runAsNonRoot")
        if sc.get("runAsUser", security.get("runAsUser")) == 0:
            found.append(f"{c['name']}: runAsUser 0")
        seccomp = sc.get("seccompProfile", security.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{c['name']}: seccomp")
        if any("hostPort" in p for p in c.get("ports", [])):
            found.append(f"{c['name']}: hostPort")
    return found


def operator_containers(obj: Obj, role: str, template: Obj) -> list[Obj]:
    """What KubeRay adds: wait-gcs-ready (with the Ray container's securityContext) to workers,
    the autoscaler (with autoscalerOptions' securityContext) to an autoscaling head."""
    if role.startswith("worker"):
        return [{"name": "wait-gcs-ready", "securityContext": template["spec"]["containers"][0]["securityContext"]}]
    options = obj["spec"].get("autoscalerOptions")
    if role == "head" and options:
        return [{"name": "autoscaler", "securityContext": options["securityContext"]}]
    return []


def test_every_pod_meets_the_restricted_level(manifests: dict[str, list[Obj]]) -> None:
    for objs in manifests.values():
        for namespace in by_kind(objs, "Namespace"):
            assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for where, obj in all_objects(manifests):
        for role, template in pod_templates(obj):
            assert not restricted_violations(template, operator_containers(obj, role, template)), f"{where} {role}"
    # and the check itself refuses what "restricted" refuses
    template = dict(pod_templates(one(manifests["job-cpu"], "RayJob")))["head"]
    bad = yaml.safe_load(yaml.safe_dump(template))
    bad["spec"]["volumes"].append({"name": "root", "hostPath": {"path": "/"}})
    bad["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    assert len(restricted_violations(bad, [{"name": "x", "securityContext": {}}])) >= 3


def test_ray_containers_have_read_only_roots_and_sized_scratch(manifests: dict[str, list[Obj]]) -> None:
    for where, obj in all_objects(manifests):
        if obj["kind"] not in ("RayCluster", "RayJob"):
            continue
        for role, template in pod_templates(obj):
            volumes = {v["name"]: v for v in template["spec"]["volumes"]}
            for c in containers(template):
                assert c["securityContext"]["readOnlyRootFilesystem"] is True, f"{where} {role}"
                mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
                for path in ("/tmp", "/home/ray/.cache"):  # Ray's session dir is /tmp/ray
                    assert "sizeLimit" in volumes[mounts[path]]["emptyDir"], f"{where} {role} {path}"


def test_images_are_pinned_and_not_pulled_on_every_start(manifests: dict[str, list[Obj]]) -> None:
    for where, obj in all_objects(manifests):
        found = [c for _, t in pod_templates(obj) for c in containers(t)]
        if obj["kind"] == "RayCluster":
            assert obj["spec"]["autoscalerOptions"]["imagePullPolicy"] == "IfNotPresent"
        for c in found:
            image = c["image"]
            assert "@sha256:" in image or re.search(r":[^/:]*\d[^/:]*$", image), f"{where}: {image} has no version"
            assert not image.endswith(":latest") and c["imagePullPolicy"] == "IfNotPresent", f"{where}: {image}"


def test_disruption_budgets_keep_the_head_mlflow_and_postgres(overlays: dict[str, list[Obj]]) -> None:
    for objs in overlays.values():
        budgets = {b["metadata"]["name"]: b for b in by_kind(objs, "PodDisruptionBudget")}
        assert budgets["ray-head"]["spec"]["selector"]["matchLabels"] == {"ray.io/cluster": "ray", "ray.io/node-type": "head"}
        assert budgets["postgres"]["spec"]["maxUnavailable"] == 0
        assert budgets["mlflow"]["spec"]["minAvailable"] == 1
        assert one(objs, "Deployment", "mlflow")["spec"]["replicas"] >= 2  # so a drain can proceed


# ---------------------------------------------------------------------------------------------
# Storage (issue 12 item 1, the Kubernetes part)


def test_each_job_mounts_only_its_own_part_of_the_shared_volume(variants: dict[str, list[Obj]]) -> None:
    subpaths = set()
    for name, objs in variants.items():
        if not name.startswith("job-"):
            continue
        job = one(objs, "RayJob")
        for role, template in pod_templates(job):
            for c in containers(template):
                for m in c["volumeMounts"]:
                    if m["name"] != "shared":
                        continue
                    own = m["subPath"] == f"jobs/{OWNER}/{job['metadata']['name']}"
                    assert own or (m["subPath"] == names.DATASETS_SUBPATH and m["readOnly"] is True), f"{name} {role}"
                    subpaths.add(m["subPath"])
    assert f"jobs/{OWNER}/digits-cnn" in subpaths
    other = one(render("name=other-job"), "RayJob")
    mounts = [m for _, t in pod_templates(other) for c in containers(t) for m in c["volumeMounts"] if m["name"] == "shared"]
    assert {m["subPath"] for m in mounts} == {f"jobs/{OWNER}/other-job", names.DATASETS_SUBPATH}


# ---------------------------------------------------------------------------------------------
# What the render assumes (issue 14 item 10)


def test_render_says_what_it_assumed_without_a_plan_or_an_image(tmp_path: Any) -> None:
    rendered = k8s_render_command(DIGITS, plan_path=None, image=None, output=None, cluster=False,
                                  overrides=["resources.workers=3"], owner=OWNER)
    assert rendered.notes[0].startswith("no --plan: 3 worker(s) on 3 pod(s)")
    assert "ray-gpu-orchestrator:0.1.0-cpu must be built" in rendered.notes[1]
    assert rendered.text.startswith("".join(f"# {note}\n" for note in rendered.notes))
    quiet = k8s_render_command(DIGITS, plan_path=None, image="registry.example/job:1", output=None, cluster=True,
                               overrides=["resources.workers=3"])
    assert [n for n in quiet.notes if "--image" in n] == []


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--image", "evil;rm -rf /", "is not a container image reference"),
    ("--image", "Upper/Case:1", "is not a container image reference"),
    # registry host names the runtime refuses (InvalidImageName once the pods were scheduled)
    ("--image", "registry..example.com/acme/orch:1.2", "is not a container image reference"),
    ("--image", "-registry-/acme/orch:1.2", "is not a container image reference"),
    ("--image", ".example.com/acme/orch:1.2", "is not a container image reference"),
    ("--owner", "a" * 254, "254 characters is too long (at most 253"),
    ("--image", "ghcr.io/" + "x" * 248 + ":1", "is 256 characters; at most 255"),
    # rendered with imagePullPolicy IfNotPresent, each node would run the build it pulled first
    ("--image", "ghcr.io/acme/orch:latest", "'ghcr.io/acme/orch:latest' is not pinned; give a version tag"),
    ("--image", "registry:5000/acme/orch", "'registry:5000/acme/orch' is not pinned; give a version tag"),
])
def test_render_refuses_an_image_or_owner_a_cluster_could_not_use(option: str, value: str, message: str) -> None:
    args = {"image": "ghcr.io/acme/orch:1.2", "owner": OWNER} | {option.removeprefix("--"): value}
    with pytest.raises(UserError, match=re.escape(f"{option}: ") + ".*" + re.escape(message)):
        k8s_render_command(str(DIGITS), plan_path=None, output=None, cluster=False, overrides=[], **args)
