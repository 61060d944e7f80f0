"""`orchestrator plan` and `orchestrator calibrate` as a user runs them: real subprocesses, output
through a pipe (not a terminal), one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.calibrations import CLUSTER_ARTIFACT, cluster_key
from orchestrator.planner import (
    OBSERVATIONS_ARTIFACT,
    ClusterSpec,
    Observation,
    Profile,
    load_cluster,
    predict,
    save_observations,
)

ROOT = Path(__file__).resolve().parents[1]
DGX = ROOT / "configs" / "clusters" / "dgx_a100.yaml"
CPU_PROFILE = {
    "version": 1, "model": "cnn", "device": "cpu (x86_64, 2 cores)", "param_count": 30_000, "grad_bytes": 120_000,
    "max_local_batch": 64, "meta": {"global_batch_size": 128},
    "samples": [{"local_batch": b, "step_time_s": t} for b, t in ((8, 0.002), (16, 0.003), (32, 0.005), (64, 0.009))],
}


def orchestrator(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env={**os.environ, **(env or {})})


def test_plan_output_is_whole_says_what_it_held_assumed_and_warns(tmp_path: Path) -> None:
    (tmp_path / "profile.json").write_text(json.dumps(CPU_PROFILE))
    proc = orchestrator("plan", "--profile", "profile.json", "--cluster", str(DGX), "--total-samples", "1000000",
                        cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if "GPUs" in line and "note" in line)
    assert len(header) > 120 and "…" not in proc.stdout  # the full table, not cut to 80 columns
    assert "cost (USD)" in header and "pessimistic" in header
    assert "8 x 1 (128/16)" in proc.stdout  # why the local batch drops: the held global batch over the GPUs
    assert "global batch held at 128" in proc.stdout  # the profile's job's batch, as `run` holds it
    assert "Warning: the profile was measured on the CPU" in proc.stdout
    assert "links as given: nvlink inside nodes, infiniband between nodes" in proc.stdout
    assert "4.1 USD per GPU-hour" in proc.stdout
    varied = orchestrator("plan", "--profile", "profile.json", "--cluster", str(DGX), "--vary-batch", "--json",
                          cwd=tmp_path)
    data = json.loads(varied.stdout)
    assert data["global_batch"] is None and any("global batch not held" in a for a in data["assumptions"])
    choice = data["choice"]
    assert choice["step_time_low_s"] <= choice["step_time_s"] <= choice["step_time_high_s"]


def test_plan_refuses_contradicting_batch_options_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "profile.json").write_text(json.dumps(CPU_PROFILE))
    proc = orchestrator("plan", "--profile", "profile.json", "--cluster", str(DGX), "--vary-batch",
                        "--global-batch", "64", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--vary-batch" in proc.stderr


def test_an_output_that_is_an_input_or_the_other_output_is_refused(tmp_path: Path) -> None:
    (tmp_path / "profile.json").write_text(json.dumps(CPU_PROFILE))
    (tmp_path / "cluster.yaml").write_text(DGX.read_text())
    save_observations(_observations(), tmp_path / "obs.json")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for args, message in (
        (["plan", "--profile", "profile.json", "--cluster", "cluster.yaml", "-o", "profile.json"],
         "error: -o profile.json: the same file as --profile; write it elsewhere"),
        (["plan", "--profile", "profile.json", "--cluster", "cluster.yaml", "--plot", "./cluster.yaml"],
         "error: --plot cluster.yaml: the same file as --cluster; write it elsewhere"),
        (["plan", "--profile", "profile.json", "--cluster", "cluster.yaml", "-o", "p.json", "--plot", "x/../p.json"],
         "error: --plot x/../p.json: the same file as -o; write it elsewhere"),
        (["calibrate", "--cluster", "cluster.yaml", "--observations", "obs.json", "-o", "obs.json"],
         "error: -o obs.json: the same file as --observations obs.json; write it elsewhere"),
    ):
        proc = orchestrator(*args, cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr == message + "\n", proc.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing read was overwritten


def test_a_plot_that_cannot_be_written_leaves_the_plan_file_as_it_was(tmp_path: Path) -> None:
    """-o was replaced by the new plan before a --plot into a folder failed (exit 2)."""
    (tmp_path / "profile.json").write_text(json.dumps(CPU_PROFILE))
    (tmp_path / "plan.json").write_text("the plan before\n")
    (tmp_path / "folder").mkdir()
    proc = orchestrator("plan", "--profile", "profile.json", "--cluster", str(DGX), "-o", "plan.json",
                        "--plot", "folder", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr == "error: folder: cannot write (it is a folder; name a file)\n", proc.stderr
    assert (tmp_path / "plan.json").read_text() == "the plan before\n"


def test_calibrate_on_a_file_of_no_observations_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "obs.json").write_text("[]\n")
    proc = orchestrator("calibrate", "--cluster", str(DGX), "--observations", "obs.json", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr == "error: --observations obs.json: no observations in it\n"


@pytest.mark.parametrize(("held", "message"), [(2**60, f"must be <= 2**53, got {2**60}"), (0, "must be > 0, got 0")])
def test_a_held_global_batch_out_of_range_names_where_it_came_from(held: int, message: str, tmp_path: Path) -> None:
    """A batch of 0 (or below) was passed over without a word: the plan let the batch vary."""
    (tmp_path / "profile.json").write_text(json.dumps({**CPU_PROFILE, "meta": {"global_batch_size": held}}))
    proc = orchestrator("plan", "--profile", "profile.json", "--cluster", str(DGX), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr == f"error: profile.json: profile.meta.global_batch_size: {message}\n"


def _observations(speedup: float = 1.0) -> list[Observation]:
    """Steps of 3 models at 3 placements on 2 x 2 GPUs declared at 16 / 1.25 GB/s, achieving 4 /
    0.2 GB/s; `speedup` times that (past x4 faster than the declared lines allow)."""
    spec = ClusterSpec(nodes=2, gpus_per_node=2, intra_node_GBps=16, inter_node_GBps=1.25)
    slow = spec.replace(intra_node_GBps=4 * speedup, inter_node_GBps=0.2 * speedup)  # what the cluster really does
    out = []
    for params, step in ((25e6, 0.1), (60e6, 0.2), (8e6, 0.05)):
        p = Profile(model=f"m{int(params / 1e6)}", device="A10", param_count=int(params), grad_bytes=int(4 * params),
                    max_local_batch=64, samples=[{"local_batch": 64, "step_time_s": step}])
        for nodes, g in ((1, 2), (2, 1), (2, 2)):
            t = predict(p, slow, nodes=nodes, gpus_per_node=g, local_batch=64).step_time_s
            out.append(Observation(profile=p, nodes=nodes, gpus_per_node=g, local_batch=64, step_time_s=t))
    return out


def test_calibrate_from_files_and_from_an_mlflow_experiment(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("nodes: 2\ngpus_per_node: 2\nintra_node_GBps: 16\ninter_node_GBps: 1.25\n")
    save_observations(_observations(), tmp_path / "obs.json")
    proc = orchestrator("calibrate", "--cluster", "cluster.yaml", "--observations", "obs.json", "-o", "cal.yaml",
                        cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    from_files = load_cluster(tmp_path / "cal.yaml").calibration
    assert from_files.observations == 9 and "inter_GBps" in from_files.fitted and "cross-model" in proc.stdout
    assert "warning" not in proc.stderr  # 4 and 0.2 GB/s achieved: within the line rates

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("jobs", artifact_location=(tmp_path / "artifacts").as_uri())
    for i, obs in enumerate((_observations()[:5], _observations()[5:])):
        run = client.create_run(experiment).info.run_id
        path = save_observations(obs, tmp_path / f"run{i}" / "observations.json")
        client.log_artifact(run, str(path), OBSERVATIONS_ARTIFACT.rsplit("/", 1)[0])
    client.create_run(experiment)  # a run without observations is passed over
    proc = orchestrator("calibrate", "--cluster", "cluster.yaml", "--experiment", "jobs", "--tracking-uri", uri,
                        "-o", "from-mlflow.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert load_cluster(tmp_path / "from-mlflow.yaml").calibration.observations == 9

    missing = orchestrator("calibrate", "--cluster", "cluster.yaml", "--experiment", "nope", "--tracking-uri", uri,
                           cwd=tmp_path)
    assert missing.returncode == 2 and "no MLflow experiment named 'nope'" in missing.stderr
    (tmp_path / "bad.json").write_text("[{\"nodes\": 1}]")
    bad = orchestrator("calibrate", "--cluster", "cluster.yaml", "--observations", "bad.json", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "bad.json: observations[0]" in bad.stderr


def test_calibrate_warns_of_a_bandwidth_above_the_line_rate_and_keeps_it(tmp_path: Path) -> None:
    """Steps of a network faster than its declared lines (160 GB/s on 16, 8 GB/s on 1.25) fit
    above both line rates (~17 and ~1.6 GB/s here): that was stored without a word. Now one line
    names the figures; the fit is not clamped."""
    (tmp_path / "cluster.yaml").write_text("nodes: 2\ngpus_per_node: 2\nintra_node_GBps: 16\ninter_node_GBps: 1.25\n")
    save_observations(_observations(speedup=40), tmp_path / "obs.json")
    proc = orchestrator("calibrate", "--cluster", "cluster.yaml", "--observations", "obs.json", "-o", "cal.yaml",
                        cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cal = load_cluster(tmp_path / "cal.yaml").calibration
    assert cal.intra_GBps > 16 and cal.inter_GBps > 1.25  # as fitted
    assert proc.stderr == (
        f"warning: calibrated {cal.intra_GBps:.3g} GB/s per GPU inside a node is above the pcie line rate of 16 GB/s "
        f"(intra_node_GBps); {cal.inter_GBps:.3g} GB/s per node between nodes is above the ethernet line rate of "
        "1.25 GB/s (inter_node_GBps): no link carries more than its line rate; check the line rate the cluster file "
        "declares, or the observations (their profiles, placements and step times)\n")


def test_calibrate_an_experiment_on_the_cluster_its_runs_logged_then_plan_with_it(tmp_path: Path) -> None:
    """`orchestrator calibrate --experiment NAME -o FILE`, as issue 11 spells it: the cluster is the
    one the newest run was planned on; runs on another cluster are left out and counted; the
    result is stored, and `plan` on that cluster uses it and says so."""
    from mlflow.tracking import MlflowClient

    here = ClusterSpec(nodes=2, gpus_per_node=2, intra_node_GBps=16, inter_node_GBps=1.25)
    elsewhere = here.replace(nodes=4)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("jobs", artifact_location=(tmp_path / "artifacts").as_uri())
    obs = _observations()
    for i, (spec, part, start) in enumerate(((here, obs[:5], 1000), (elsewhere, obs[5:], 2000), (here, obs[5:], 3000))):
        run = client.create_run(experiment, start_time=start).info.run_id
        client.log_artifact(run, str(save_observations(part, tmp_path / f"run{i}" / "observations.json")), "plan")
        (tmp_path / f"run{i}" / "cluster.json").write_text(json.dumps(spec.to_dict()))
        client.log_artifact(run, str(tmp_path / f"run{i}" / "cluster.json"), CLUSTER_ARTIFACT.rsplit("/", 1)[0])
    damaged = client.create_run(experiment, start_time=500).info.run_id  # an old run with a torn artifact
    (tmp_path / "torn" / "observations.json").parent.mkdir()
    (tmp_path / "torn" / "observations.json").write_text('[{"nodes": 2')
    client.log_artifact(damaged, str(tmp_path / "torn" / "observations.json"), "plan")
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = orchestrator("calibrate", "--experiment", "jobs", "--tracking-uri", uri, "-o", "cluster.yaml",
                        cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    key = cluster_key(here)
    assert (f"jobs: 9 observations from 2 run(s) on cluster {key} (1 run(s) left out: unreadable artifacts; "
            "1 run(s) left out: on another cluster") in proc.stdout
    calibrated = load_cluster(tmp_path / "cluster.yaml")
    assert calibrated.nodes == 2 and calibrated.calibration.observations == 9
    stored = tmp_path / "cache" / "orchestrator" / "clusters" / f"calibrated-{key}.yaml"
    assert load_cluster(stored) == calibrated and str(stored) in proc.stdout

    (tmp_path / "profile.json").write_text(json.dumps(CPU_PROFILE))
    (tmp_path / "spec.yaml").write_text("nodes: 2\ngpus_per_node: 2\nintra_node_GBps: 16\ninter_node_GBps: 1.25\n")
    planned = orchestrator("plan", "--profile", "profile.json", "--cluster", "spec.yaml", "--json", cwd=tmp_path,
                           env=env)
    assert planned.returncode == 0, planned.stderr
    assert planned.stderr.startswith("calibration: the newest of this cluster, from jobs (9 observations")
    assert any("stored by `orchestrator calibrate`" in a for a in json.loads(planned.stdout)["assumptions"])
    solo = client.create_experiment("solo", artifact_location=(tmp_path / "solo").as_uri())
    run = client.create_run(solo).info.run_id
    one_gpu = [o.replace(nodes=1, gpus_per_node=1) for o in obs[:3]]
    client.log_artifact(run, str(save_observations(one_gpu, tmp_path / "solo-obs" / "observations.json")), "plan")
    client.log_artifact(run, str(tmp_path / "run0" / "cluster.json"), CLUSTER_ARTIFACT.rsplit("/", 1)[0])
    nothing = orchestrator("calibrate", "--experiment", "solo", "--tracking-uri", uri, "-o", "solo.yaml", cwd=tmp_path,
                           env=env)
    assert nothing.returncode == 0 and "not stored as cluster" in nothing.stdout, nothing.stdout + nothing.stderr
    assert load_cluster(stored) == calibrated  # one GPU says nothing of the network: the stored fit stands
    unknown = orchestrator("calibrate", "--observations", "obs.json", cwd=tmp_path, env=env)
    assert unknown.returncode == 2 and "--cluster: required without --experiment" in unknown.stderr


def test_calibrate_against_a_tracking_server_that_is_down_is_one_line_without_its_credentials(tmp_path: Path) -> None:
    # Port 1 on the loopback: nothing listens. MLflow alone retries for ~4 minutes, then a traceback.
    proc = orchestrator("calibrate", "--experiment", "jobs", "--tracking-uri", "http://bob:s3cret@127.0.0.1:1",
                        cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: --tracking-uri http://127.0.0.1:1: could not read the experiment's runs")
    assert "s3cret" not in proc.stderr + proc.stdout and "bob" not in proc.stderr


def test_plan_with_a_config_holds_its_fixed_accumulation(tmp_path: Path) -> None:
    import yaml

    job = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    job["training"].update(global_batch_size=128, grad_accumulation=4)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    (tmp_path / "profile.json").write_text(json.dumps(CPU_PROFILE))
    proc = orchestrator("plan", "--profile", "profile.json", "--cluster", str(DGX), "--config", "job.yaml", "--json",
                        cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    candidates = json.loads(proc.stdout)["candidates"]
    assert candidates and all(c["accumulation"] == 4 and c["local_batch"] * 4 * c["gpus"] == 128 for c in candidates)


def test_calibrate_says_when_a_newer_stored_calibration_stays(tmp_path: Path) -> None:
    # It printed "stored as cluster K's calibration (PATH)" for a fit it did not store: the one
    # stored was measured later (here by a clock an hour ahead), and plan and run went on using that one.
    from datetime import datetime, timedelta, timezone

    from orchestrator.calibrations import store, stored_path
    from orchestrator.planner import calibrate

    ahead = (datetime.now(timezone.utc) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")

    spec = ClusterSpec(nodes=2, gpus_per_node=2, intra_node_GBps=16, inter_node_GBps=1.25)
    spec.save(tmp_path / "c.yaml")
    save_observations(_observations(), tmp_path / "obs.json")
    cache = tmp_path / "cache" / "orchestrator" / "clusters"
    store(calibrate(spec, _observations(), measured_at=ahead), cache)
    before = stored_path(spec, cache).read_bytes()
    proc = orchestrator("calibrate", "--cluster", "c.yaml", "--observations", "obs.json", cwd=tmp_path,
                        env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert "stored as" not in proc.stdout.replace("not stored as", "") and stored_path(spec, cache).read_bytes() == before
    assert (f"not stored as cluster {cluster_key(spec)}'s calibration: a newer one is; `plan` and `run` use it "
            f"(calibration: the newest of this cluster, from jobs (9 observations, {ahead}), "
            f"{stored_path(spec, cache)}; newer than the spec's own") in proc.stdout, proc.stdout


def test_plan_with_a_config_shows_time_and_cost_for_the_samples_it_trains(tmp_path: Path) -> None:
    """`plan --config` showed '-' for time to finish and cost unless --total-samples was given,
    though the config says how long the job trains."""
    import yaml

    from trainers.data import ensure_prepared

    (tmp_path / "profile.json").write_text(json.dumps(CPU_PROFILE))
    job = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())  # 15 epochs, batch 64, 20 % held out
    (tmp_path / "epochs.yaml").write_text(yaml.safe_dump(job))
    job["training"].pop("epochs")
    job["training"]["max_steps"] = 40
    (tmp_path / "steps.yaml").write_text(yaml.safe_dump(job))

    def planned(config: str, *extra: str) -> tuple[dict, str]:
        proc = orchestrator("plan", "--profile", "profile.json", "--cluster", str(DGX), "--config", config,
                            "--json", *extra, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout), proc.stderr

    plan, said = planned("steps.yaml")
    assert plan["total_samples"] == 40 * 64 and plan["choice"]["time_to_finish_s"] > 0, plan
    assert "time and cost for the config's 40 steps of 64 samples" in said
    plan, said = planned("epochs.yaml")
    assert plan["total_samples"] is None and "give --total-samples" in said  # no data yet: its rows are unknown
    ensure_prepared("digits", tmp_path / "data" / "digits")  # 1,797 rows
    plan, said = planned("epochs.yaml")
    assert plan["total_samples"] == 15 * (int(1797 * 0.8) // 64) * 64 and plan["choice"]["cost"] is not None, plan
    assert planned("epochs.yaml", "--total-samples", "999")[0]["total_samples"] == 999
    job["training"].update(epochs=15, max_steps=None, global_batch_size=4096)  # more than the 1,437 training rows
    (tmp_path / "big.yaml").write_text(yaml.safe_dump(job))
    plan, said = planned("big.yaml")  # timed as 15 steps of a job `run` refuses
    assert plan["total_samples"] is None and "4,096 is more than the ~1,437 training rows" in said, said


def test_plan_with_a_config_of_too_many_epochs_names_the_field(tmp_path: Path) -> None:
    """A config whose epochs train past 2**53 samples was said of a --total-samples never given
    (`--total-samples: must be <= 2**53`); it names training.epochs, as `run` does."""
    import yaml

    from trainers.data import ensure_prepared

    (tmp_path / "profile.json").write_text(json.dumps(CPU_PROFILE))
    job = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    job["training"]["epochs"] = 10**20
    (tmp_path / "epochs.yaml").write_text(yaml.safe_dump(job))
    ensure_prepared("digits", tmp_path / "data" / "digits")
    proc = orchestrator("plan", "--profile", "profile.json", "--cluster", str(DGX), "--config", "epochs.yaml",
                        cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: training.epochs: 2,200,000,000,000,000,000,000 steps of 64 samples is more than 2**53 samples; "
        "no job runs that long"], proc.stderr


def test_a_bad_flag_on_a_calibrated_cluster_is_one_line(tmp_path: Path) -> None:
    """With a stored calibration of the cluster, `plan --budget 0` printed the 'calibration: the newest
    of this cluster' note before its error: two lines for one bad flag; so did --config its 'time and
    cost for the config's ...' note."""
    from orchestrator.calibrations import store
    from orchestrator.planner import calibrate

    (tmp_path / "profile.json").write_text(json.dumps(CPU_PROFILE))
    spec = load_cluster(DGX)
    profile = Profile.from_dict(CPU_PROFILE)
    obs = [Observation(profile=profile, nodes=1, gpus_per_node=g, local_batch=32, step_time_s=0.005 * g) for g in (2, 4)]
    assert store(calibrate(spec, obs), tmp_path / "cache" / "orchestrator" / "clusters") is not None
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    base = ("plan", "--profile", "profile.json", "--cluster", str(DGX))
    proc = orchestrator(*base, "--budget", "0", cwd=tmp_path, env=env)
    assert proc.returncode == 2 and proc.stderr.splitlines() == ["error: --budget: must be > 0, got 0.0"], proc.stderr
    proc = orchestrator(*base, "--json", cwd=tmp_path, env=env)  # planned: the note says which calibration
    assert proc.returncode == 0 and proc.stderr.startswith("calibration: the newest of this cluster"), proc.stderr
    import yaml

    job = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    job["training"].pop("epochs")
    job["training"]["max_steps"] = 40
    (tmp_path / "steps.yaml").write_text(yaml.safe_dump(job))
    proc = orchestrator(*base, "--config", "steps.yaml", "--min-efficiency", "2", cwd=tmp_path)  # its 'time and cost' note too
    assert proc.returncode == 2 and proc.stderr.splitlines() == ["error: --min-efficiency: must be <= 1, got 2.0"], proc.stderr


def test_plan_with_a_config_whose_data_is_not_parquet_refuses_it_as_validate_does(tmp_path: Path) -> None:
    """A truncated file under data.path was taken for data 'not here yet' (exit 0, no time or cost);
    it is there, and `run` refuses it: `plan --config` says so, in `validate`'s one line."""
    import yaml

    (tmp_path / "profile.json").write_text(json.dumps(CPU_PROFILE))
    job = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    del job["data"]["dataset"]
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    (tmp_path / "data" / "digits").mkdir(parents=True)
    (tmp_path / "data" / "digits" / "part-0000.parquet").write_bytes(b"PAR1 cut short")
    proc = orchestrator("plan", "--profile", "profile.json", "--cluster", str(DGX), "--config", "job.yaml",
                        cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: data.path: data/digits is not a readable Parquet data set ("), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
