"""The planner's files and fields: profile, plan and cluster files round-trip, and every bad field
or file is named in one line; the shipped cluster files load; a cluster from Ray's node list."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from planner_util import make_cluster, make_profile, profile_dict

from orchestrator.cluster import load_cluster, spec_from_nodes
from orchestrator.errors import UserError
from orchestrator.planner import ClusterSpec, Plan, Profile, plan

REPO = Path(__file__).resolve().parents[1]


def test_plan_json_round_trip(tmp_path: Path) -> None:
    result = plan(make_profile(gradient_noise_scale=500.0), make_cluster(),
                  total_samples=1_000_000, deadline_s=10_000.0)
    again = Plan.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again == result
    assert Plan.load(result.save(tmp_path / "plan.json")) == result
    data = result.to_dict()
    assert data["workers"] == result.workers and data["explanation"] == result.explanation
    assert data["choice"]["gpus"] == result.choice.gpus


def test_profile_round_trip(tmp_path: Path) -> None:
    profile = make_profile(data_samples_per_s=3000.0, precision="bf16", meta={"oom_at": 256})
    assert Profile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile
    assert Profile.load(profile.save(tmp_path / "profile.json")) == profile


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"samples": [{"local_batch": 8, "step_time_s": 0.01},
                      {"local_batch": 16, "step_time_s": 0.02},
                      {"local_batch": 32, "step_time_s": -1}]},
         r"^profile\.samples\[2\]\.step_time_s: must be > 0, got -1$"),
        ({"grad_bytes": None}, r"^profile\.grad_bytes: required field is missing$"),
        ({"param_count": "many"}, r"^profile\.param_count: must be an integer, got 'many'$"),
        ({"samples": []}, r"^profile\.samples: must be a non-empty list, got \[\]$"),
        ({"samples": [{"local_batch": 8, "step_time": 0.1}]},
         r"^profile\.samples\[0\]\.step_time: unknown key"),
        ({"max_local_batch": 4}, r"^profile\.max_local_batch: must be >= the smallest"),
        ({"gradient_noise_scale": 0}, r"^profile\.gradient_noise_scale: must be > 0, got 0$"),
        ({"batch": 3}, r"^profile\.batch: unknown key"),
        ({"samples": [{"local_batch": 8, "step_time_s": 0.1},
                      {"local_batch": 8, "step_time_s": 0.2}]},
         r"^profile\.samples\[1\]\.local_batch: duplicate local batch 8$"),
        ({"node_samples": [{"gpus_per_node": 4, "local_batch": 8, "step_time_s": 0.12},
                           {"gpus_per_node": 4, "local_batch": 8, "step_time_s": 0.3}]},
         r"^profile\.node_samples\[1\]: duplicate of gpus_per_node 4 at local batch 8$"),
        # the batch `plan` holds by default: no batch was taken for none, and the batch let vary
        ({"meta": {"global_batch_size": -5}}, r"^profile\.meta\.global_batch_size: must be > 0, got -5$"),
        ({"meta": {"global_batch_size": 0}}, r"^profile\.meta\.global_batch_size: must be > 0, got 0$"),
        ({"meta": {"global_batch_size": 2.5}}, r"^profile\.meta\.global_batch_size: must be an integer, got 2\.5$"),
        ({"meta": {"global_batch_size": True}}, r"^profile\.meta\.global_batch_size: must be an integer, got True$"),
    ],
)
def test_bad_profile_fields_are_named(change: dict[str, Any], message: str) -> None:
    raw = {k: v for k, v in profile_dict(**change).items() if v is not None}
    with pytest.raises(UserError, match=message):
        Profile.from_dict(raw)


@pytest.mark.parametrize("version", [2, 0, None, "1", "9" * 5000])
def test_another_profile_version_is_refused(version: Any) -> None:
    raw = profile_dict(version=version)
    with pytest.raises(UserError, match=r"^profile\.version: this planner reads profile version 1") as info:
        Profile.from_dict({k: v for k, v in raw.items() if v is not None})
    assert len(str(info.value)) < 300  # a long one is cut, not echoed whole


def test_a_newer_profile_reports_its_version_not_its_new_keys() -> None:
    raw = {**profile_dict(version=2), "activation_bytes": 123}
    with pytest.raises(UserError, match=r"^profile\.version: .* got version 2; re-run"):
        Profile.from_dict(raw)


def test_profile_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    with pytest.raises(UserError, match=r"p\.json: profile file not found"):
        Profile.load(path)
    path.write_text("{not json")
    with pytest.raises(UserError, match=r"p\.json: not valid JSON \(line 1\)"):
        Profile.load(path)
    path.write_text(json.dumps(profile_dict(device="")))
    with pytest.raises(UserError, match=r"p\.json: profile\.device: must be a non-empty string"):
        Profile.load(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"nodes": 0}, r"cluster\.nodes: must be > 0, got 0"),
        ({"gpus_per_node": 2.5}, r"cluster\.gpus_per_node: must be an integer, got 2\.5"),
        ({"link_efficiency": 1.5}, r"cluster\.link_efficiency: must be <= 1, got 1\.5"),
        ({"intra_node_bw": 5}, r"cluster\.intra_node_bw: unknown key"),
        ({"allreduce_samples": [{"bytes": 1024, "nodes": 1, "gpus_per_node": 2, "seconds": 0}]},
         r"cluster\.allreduce_samples\[0\]\.seconds: must be > 0, got 0"),
    ],
)
def test_bad_cluster_fields_are_named(change: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=message):
        make_cluster(**change)


def test_cluster_file_errors_name_the_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    with pytest.raises(UserError, match=r"c\.yaml: cluster file not found"):
        load_cluster(path)
    path.write_text("nodes: 2\ngpus_per_node: 8\nintra_node_GBps: 0\ninter_node_GBps: 25\n")
    with pytest.raises(UserError, match=r"c\.yaml: cluster\.intra_node_GBps: must be > 0, got 0"):
        load_cluster(path)
    path.write_text("nodes: [1\n")
    with pytest.raises(UserError, match=r"c\.yaml: not valid YAML"):
        load_cluster(path)


@pytest.mark.parametrize("name", ["clusters/cpu_local.yaml", "clusters/dgx_a100.yaml"])
def test_shipped_cluster_files_load(name: str) -> None:
    cluster = load_cluster(REPO / "configs" / name)
    assert cluster.gpus >= 2
    assert ClusterSpec.from_dict(cluster.to_dict()) == cluster


def test_cluster_from_ray_nodes() -> None:
    def node(alive: bool = True, **resources: float) -> dict[str, Any]:
        return {"Alive": alive, "Resources": resources}

    gpus = [node(CPU=16, GPU=8, **{"accelerator_type:A100": 1}), node(CPU=16, GPU=4),
            node(alive=False, CPU=16, GPU=8), node(CPU=4)]
    spec = spec_from_nodes(gpus, {"inter_node_GBps": 25})
    assert (spec.nodes, spec.gpus_per_node, spec.gpu, spec.inter_node_GBps) == (1, 8, "A100", 25)
    same = spec_from_nodes([node(CPU=8, GPU=4), node(CPU=8, GPU=4)])
    assert (same.nodes, same.gpus_per_node) == (2, 4)
    cpu = spec_from_nodes([node(CPU=2), node(CPU=3)], cpus_per_worker=1)
    assert (cpu.nodes, cpu.gpus_per_node, cpu.gpu) == (2, 2, "cpu")
    with pytest.raises(UserError, match="no alive node"):
        spec_from_nodes([node(alive=False, CPU=8)])


@pytest.mark.parametrize("path", [None, 5, b"profile.json"])
def test_a_path_that_is_no_path_is_a_user_error(path: Any) -> None:
    """`Profile.load(None)`, `load_cluster(5)`, `save(b"...")` raised pathlib's TypeError from deep inside."""
    from orchestrator.planner import load_observations

    kind = type(path).__name__
    for load, what in ((Profile.load, "profile"), (load_cluster, "cluster"), (load_observations, "observations")):
        with pytest.raises(UserError, match=rf"^the {what} file: must be a path \(a str or pathlib.Path\), got {kind}$"):
            load(path)
    with pytest.raises(UserError, match=rf"^the file to write: must be a path \(a str or pathlib.Path\), got {kind}$"):
        make_profile().save(path)


def test_json_files_with_a_byte_order_mark_are_read(tmp_path: Path) -> None:
    """A profile, plan or observations file saved with a UTF-8 BOM (Notepad, PowerShell) was refused
    as 'not valid JSON (line 1)', where a cluster YAML with one was read."""
    from orchestrator.planner import Observation, load_observations

    profile = make_profile()
    result = plan(profile, make_cluster())
    obs = Observation(profile=profile, nodes=2, gpus_per_node=8, local_batch=32, step_time_s=0.2)
    for name, data, load, expected in (
            ("p.json", profile.to_dict(), Profile.load, profile),
            ("plan.json", result.to_dict(), Plan.load, result),
            ("obs.json", [obs.to_dict()], load_observations, [obs])):
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + json.dumps(data).encode())
        assert load(tmp_path / name) == expected


def _run_example(doc: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Runs the first Python block of `doc` in a folder with profile.json and the DGX cluster file."""
    code = (REPO / doc).read_text().split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "profile.json").write_text(json.dumps(profile_dict()))
    (tmp_path / "configs" / "clusters").mkdir(parents=True)
    (tmp_path / "configs" / "clusters" / "dgx_a100.yaml").write_text((REPO / "configs" / "clusters" / "dgx_a100.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    names: dict[str, Any] = {}
    exec(compile(code, doc, "exec"), names)
    return names


def test_the_python_example_of_docs_planner_md_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its `profile` was never defined and its observation list ended in `...` (an Ellipsis that
    calibrate refuses): copied into Python, it failed on its third line."""
    names = _run_example("docs/planner.md", tmp_path, monkeypatch)
    assert names["cluster2"].calibration.observations == 1 and names["best"].to_dict()["global_batch"] == 256


def test_the_python_api_of_the_readme_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 3 asks for the planner's stable Python API "documented in README (other tools will call
    it)"; README named no Python API at all, only a link to docs/planner.md."""
    names = _run_example("README.md", tmp_path, monkeypatch)
    assert names["p"].step_time_s > 0 and names["best"].workers >= 1
    assert type(names["cluster2"]) is type(names["cluster"]) and names["cluster2"].calibration.observations == 1
