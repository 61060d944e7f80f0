"""`orchestrator k8s render` at its edges (no plan, bad plans, bad flags, the written file, the
namespace) and the container image it names (Dockerfile pins and users). The rendered manifests
themselves are validated in test_k8s.py."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_fixtures import crd_validators  # noqa: F401 (fixture)
from k8s_util import DIGITS, OWNER, SMALL_PLAN, containers, mlflow_uris, one, pod_templates
from packaging.requirements import Requirement

from orchestrator.errors import UserError
from orchestrator.k8s import names, sizing
from orchestrator.k8s.command import k8s_render_command, load_plan
from orchestrator.k8s.sizing import deadline_seconds, worker_group

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# The render functions' edges


def test_render_without_a_plan_uses_the_configured_workers() -> None:
    from orchestrator.config import load_config

    config = load_config(DIGITS, ["resources.workers={min: 2, max: 5}", "resources.use_gpu=true"])
    group = worker_group(config, None)
    assert (group.pods, group.workers, group.gpus_per_pod) == (5, 5, 1)
    assert worker_group(load_config(DIGITS), None).workers == 1
    config = load_config(DIGITS, ["resources.deadline_hours=2"])
    assert deadline_seconds(config, None) == 2 * 7200 + 900


def test_a_plan_made_on_a_cpu_cluster_renders_cpu_workers(tmp_path: Path) -> None:
    # A plan on configs/clusters/cpu_local.yaml (gpu: cpu) rendered nvidia.com/gpu pods and the -cuda image.
    from orchestrator.config import load_config

    plan = {**SMALL_PLAN, "gpu": "cpu"}
    group = worker_group(load_config(DIGITS), plan)
    assert (group.pods, group.workers, group.gpus_per_pod) == (2, 3, 0) and not group.gpu
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    text = k8s_render_command(str(DIGITS), plan_path=str(path), image=None, output=None, cluster=False,
                              owner=OWNER, overrides=[]).text
    assert "nvidia.com/gpu" not in text and "-cuda" not in text and "-cpu" in text
    with pytest.raises(UserError, match=r"^resources\.use_gpu: true, but the plan places the job on CPU workers"):
        worker_group(load_config(DIGITS, ["resources.use_gpu=true"]), plan)
    with pytest.raises(UserError, match=r"^resources\.use_gpu: false, but the plan places the job on GPUs$"):
        worker_group(load_config(DIGITS, ["resources.use_gpu=false"]), SMALL_PLAN)


@pytest.mark.parametrize(("plan_dict", "message"), [
    ({}, "plan.choice: missing"),
    ({"choice": {"nodes": 0, "gpus_per_node": 8}}, "plan.choice.nodes: must be a positive integer, got 0"),
    ({"choice": {"nodes": 2, "gpus_per_node": "8"}}, "plan.choice.gpus_per_node"),
    ({"choice": {"nodes": -10**4000, "gpus_per_node": 8}},  # cut, not 4,001 characters on one line
     "plan.choice.nodes: must be a positive integer, got an integer of about 4001 digits"),
    ({"workers": 17, "choice": {"nodes": 2, "gpus_per_node": 8}}, "plan.workers: must be between 1 and 16"),
    # Past the planner's bounds (before: replicas: 10**30 rendered, an OverflowError, another version read)
    ({"choice": {"nodes": 10**30, "gpus_per_node": 2}}, "plan.choice.nodes: must be at most 65,536"),
    ({"choice": {"nodes": 300, "gpus_per_node": 300}}, "plan.choice: 300 nodes x 300 GPUs is more than the 65,536"),
    ({"time_to_finish_s": 1e308, "choice": {"nodes": 2, "gpus_per_node": 2}},
     "plan.time_to_finish_s: must be at most 3,600,000,000 s (a million hours), got 1e+308"),
    ({"choice": {"nodes": 2, "gpus_per_node": 2, "time_to_finish_s": float("inf")}},
     "plan.choice.time_to_finish_s: must be at most"),
    ({"version": 99, "choice": {"nodes": 2, "gpus_per_node": 2}},
     "plan.version: this planner reads plan version 2, got version 99"),
])
def test_bad_plans_are_user_errors(plan_dict: dict[str, Any], message: str, tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan_dict))
    with pytest.raises(UserError, match=re.escape(f"{path}: {message}")):
        load_plan(path)


def test_a_deadline_past_a_million_hours_is_one_line() -> None:
    from orchestrator.config import load_config
    from orchestrator.planner.base import MAX_DEADLINE_S
    from orchestrator.planner.types import MAX_GPUS

    assert (sizing.MAX_DEADLINE_S, sizing.MAX_PLAN_GPUS) == (MAX_DEADLINE_S, MAX_GPUS)  # the planner's, restated
    from orchestrator.config import ResourcesConfig

    assert ResourcesConfig.model_fields["deadline_hours"].metadata[-1].le == MAX_DEADLINE_S / 3600  # validated early
    with pytest.raises(UserError, match=r"^resources\.deadline_hours: must be <= 1e\+06, got 1e\+306$"):
        k8s_render_command(DIGITS, plan_path=None, image=None, output=None, cluster=False, owner=OWNER,
                           overrides=["resources.deadline_hours=1e306"])
    # 2 x 1e6 h + 15 min is 7,200,000,900 s, past the int32 of activeDeadlineSeconds (rendered before)
    assert deadline_seconds(load_config(DIGITS, ["resources.deadline_hours=1e6"]), None) == 2**31 - 1
    assert deadline_seconds(load_config(DIGITS, ["resources.deadline_hours=2"]), None) == 2 * 7200 + 900


def test_a_deadline_of_a_million_hours_renders_a_rayjob_the_crd_admits(crd_validators: Any) -> None:
    text = k8s_render_command(DIGITS, plan_path=None, image=None, output=None, cluster=False, owner=OWNER,
                              overrides=["resources.deadline_hours=1e6"]).text
    job = one([o for o in yaml.safe_load_all(text) if o], "RayJob")
    assert [e.message for e in crd_validators["RayJob"].iter_errors(job)] == []
    job["spec"]["activeDeadlineSeconds"] += 1  # the check sees the int32
    assert not crd_validators["RayJob"].is_valid(job)


def test_a_config_too_large_for_kubectl_apply_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    # Rendered before: `kubectl apply -f` refused the ConfigMap (annotations past 256 KiB) and created
    # the RayJob, which ran without its config.
    shards = [f"s3://bucket/corpus/2026-12/train/part-{i:05d}-of-04000.snappy.parquet" for i in range(4000)]
    out = tmp_path / "job.yaml"
    with pytest.raises(UserError, match=rf"^{re.escape(DIGITS)}: the job's config is [0-9,]+ bytes in its "
                                        r"ConfigMap; `kubectl apply` takes at most 258,048 \(list folders"):
        k8s_render_command(DIGITS, plan_path=None, image=None, output=str(out), cluster=False, owner=OWNER,
                           overrides=["data.dataset=null", f"data.path=[{', '.join(shards)}]"])
    assert not out.exists()


def test_a_cluster_file_of_this_machine_is_left_out_of_the_job_with_a_note() -> None:
    cluster_file = Path(DIGITS).parent / "clusters" / "dgx_a100.yaml"
    # Copied as it was, the pod's `orchestrator run` looked for the submitter's file and failed
    # once the job's GPUs were scheduled.
    rendered = k8s_render_command(DIGITS, plan_path=None, image=None, output=None, cluster=False, owner=OWNER,
                                  overrides=[f"resources.cluster={cluster_file}"])
    config_map = one([o for o in yaml.safe_load_all(rendered.text) if o], "ConfigMap")
    assert yaml.safe_load(config_map["data"]["job.yaml"])["resources"]["cluster"] is None
    assert any(n.startswith(f"resources.cluster: {cluster_file} is a file of this machine")
               for n in rendered.notes)


def test_a_line_break_in_a_config_value_a_note_echoes_adds_no_object_to_the_manifests() -> None:
    """The notes are comments on top of what `kubectl apply -f` reads: a resources.cluster or
    spill_dir holding a line break ended the comment, and the rest was applied as an object."""
    planted = "---\napiVersion: v1\nkind: Secret\nmetadata: {name: planted, namespace: ray-training}\n---\n#"
    for field in ("resources.cluster", "tracking.spill_dir"):
        for brk in ("\n", "\r", "\u2028"):
            value = "x.yaml\n" + planted
            rendered = k8s_render_command(DIGITS, plan_path=None, image=None, output=None, cluster=False,
                                          owner=OWNER, overrides=[f"{field}={value.replace(chr(10), brk)}"])
            kinds = [o["kind"] for o in yaml.safe_load_all(rendered.text) if o]
            assert "Secret" not in kinds and kinds[0] == "ConfigMap", (field, repr(brk), kinds)


def test_without_owner_the_job_is_rendered_for_the_login_name_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    # Issue 6 spells `orchestrator k8s render CONFIG [--plan plan.json] [--image IMG] [-o FILE]`: it
    # ended in "--owner: required". The cluster admits the RayJob only from the user it names.
    import getpass

    monkeypatch.setattr(getpass, "getuser", lambda: "alice")
    rendered = k8s_render_command(DIGITS, plan_path=None, image=None, output=None, cluster=False, overrides=[])
    job = one([o for o in yaml.safe_load_all(rendered.text) if o], "RayJob")
    assert job["metadata"]["annotations"]["ray-gpu-orchestrator/owner"] == "alice"
    assert any(n.startswith("no --owner: rendered for 'alice', this machine's login name") for n in rendered.notes)
    for login in ("", "../bob"):  # none known, or none the cluster takes: asked for
        monkeypatch.setattr(getpass, "getuser", lambda: login)
        with pytest.raises(UserError, match=re.escape("--owner: required for a RayJob")):
            k8s_render_command(DIGITS, plan_path=None, image=None, output=None, cluster=False, overrides=[])


def test_command_errors_name_the_field_or_file(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{nope")
    cases = [
        (dict(plan_path=str(tmp_path / "bad.json")), [], "bad.json: not valid JSON (line 1)"),
        (dict(plan_path=str(tmp_path / "missing.json")), [], "missing.json: plan file not found"),
        (dict(plan_path=None), ["checkpoint.storage_path=/data/ckpt"],
         "checkpoint.storage_path: /data/ckpt is outside the job's storage"),
        (dict(plan_path=None), ["data.path=../../etc"], "data.path: ../../etc is outside the job's storage"),
        (dict(plan_path=None, output=str(tmp_path / "bad.json" / "dir.yaml")), [], "cannot write ("),
        (dict(plan_path=None, owner="../bob"), [], "--owner: '../bob' is not a user name"),
        (dict(plan_path=None), ["model.kwargs.private_key=PRIV"], "model.kwargs.private_key: a secret would be written "
                                                                   "into the job's ConfigMap"),
    ]
    for kwargs, overrides, message in cases:
        kwargs = {"image": None, "output": None, "cluster": False, "owner": OWNER, **kwargs}
        with pytest.raises(UserError, match=re.escape(message)):
            k8s_render_command(DIGITS, overrides=overrides, **kwargs)
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(SMALL_PLAN))
    with pytest.raises(UserError, match="resources.use_gpu: false, but the plan"):
        k8s_render_command(DIGITS, plan_path=str(plan_path), image=None, output=None, cluster=False,
                           overrides=["resources.use_gpu=false"], owner=OWNER)


def test_an_output_that_is_the_config_or_the_plan_is_refused(tmp_path: Path) -> None:
    """`k8s render job.yaml -o job.yaml` replaced the job's config with its manifests (exit 0)."""
    config, plan_path = tmp_path / "job.yaml", tmp_path / "plan.json"
    config.write_text(Path(DIGITS).read_text())
    plan_path.write_text(json.dumps(SMALL_PLAN))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for output, message in ((config, "the same file as the config"), (plan_path, "the same file as --plan")):
        with pytest.raises(UserError, match=re.escape(f"-o {output}: {message}; write it elsewhere")):
            k8s_render_command(str(config), plan_path=str(plan_path), image=None, output=str(output), cluster=False,
                               overrides=[], owner=OWNER)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_config_words_that_only_look_secret_render_as_given(tmp_path: Path) -> None:
    """`max_tokens` holds the word "tokens", not a token: it reaches the job as given, not as '***'."""
    out = tmp_path / "job.yaml"
    k8s_render_command(DIGITS, plan_path=None, image=None, output=str(out), cluster=False, owner=OWNER,
                       overrides=["model.kwargs.max_tokens=64", "data.dataset_kwargs.num_passes=2"])
    assert "max_tokens: 64" in out.read_text() and "num_passes: 2" in out.read_text()


def test_command_writes_the_file(tmp_path: Path) -> None:
    out = tmp_path / "job.yaml"
    rendered = k8s_render_command(DIGITS, plan_path=None, image="registry.example/job:1", output=str(out),
                                  cluster=False, overrides=["name=digits-cnn-v2"], owner=OWNER)
    assert rendered.text.startswith("wrote ConfigMap digits-cnn-v2-config, NetworkPolicy digits-cnn-v2-net, "
                                    "RayJob digits-cnn-v2 (") and str(out) in rendered.text
    objs = [d for d in yaml.safe_load_all(out.read_text()) if d]
    assert [o["kind"] for o in objs] == ["ConfigMap", "NetworkPolicy", "RayJob"]
    images = {c["image"] for _, t in pod_templates(objs[2]) for c in containers(t)}
    assert images == {"registry.example/job:1"}


def test_namespace_moves_the_job_but_not_mlflow() -> None:
    from orchestrator.config import load_config
    from orchestrator.k8s.render import render_rayjob

    job = render_rayjob(load_config(DIGITS), owner=OWNER, config_path="configs/digits.yaml", plan=SMALL_PLAN,
                        image="img:1", namespace="team-a")
    assert job["metadata"]["namespace"] == "team-a"
    assert set(mlflow_uris(job)) == {"http://mlflow.ml-tracking.svc:5000"}
    assert job["spec"]["entrypoint"] == "orchestrator run configs/digits.yaml --workers 3"


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
    assert args["RAY_VERSION"] == names.RAY_VERSION
    assert args["BASE_IMAGE"].startswith("rayproject/ray:${RAY_VERSION}-")
    assert re.fullmatch(r"python:[\d.]+-slim-\w+", args["PYTHON_IMAGE"])
    assert '"mlflow[auth]==${MLFLOW_VERSION}"' in (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    ignored = (ROOT / ".dockerignore").read_text().split()
    # mlflow.db-*: the sqlite store's -wal and -journal beside it
    assert {".venv", ".git", "deploy/k8s/overlays/*/secrets/*.env", "mlflow.db", "mlflow.db-*"} <= set(ignored)


def test_dash_output_is_stdout_for_render_and_refused_where_a_file_is_written(tmp_path: Path) -> None:
    """`k8s render job.yaml -o -` (kubectl's spelling) wrote a file named '-' in the current folder;
    `plan -o -` did the same. Render prints to stdout; the commands that write a file say to name one."""
    from live_servers import base_env, run_cli

    proc = run_cli(["k8s", "render", DIGITS, "--owner", OWNER, "-o", "-"], env=base_env(), cwd=tmp_path, timeout_s=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [o["kind"] for o in yaml.safe_load_all(proc.stdout)] == ["ConfigMap", "NetworkPolicy", "RayJob"]
    proc = run_cli(["profile", DIGITS, "-o", "-"], env=base_env(), cwd=tmp_path, timeout_s=60)
    assert (proc.returncode, proc.stderr) == (2, "error: -o -: name a file; this command prints its summary on stdout\n")
    assert list(tmp_path.iterdir()) == []
