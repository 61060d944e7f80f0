"""The command line a newcomer meets, through the installed `orchestrator` command: usage mistakes
are the usage line and one error line with exit code 2, help exits 0, a token is not sent in the
clear, and the hints it prints are commands that work. No Ray is started."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from live_servers import BIN, ROOT, base_env, run_cli

from orchestrator.console_ui import ui_command
from orchestrator.quiet import quiet_noise
from orchestrator.errors import UserError
from orchestrator.ray_jobs import check_job_id, check_transport, exit_code, resolve_address
from orchestrator.ray_session import check_reachable

USAGE_ERRORS = {
    "no arguments": ([], r"Usage: orchestrator \[OPTIONS\] COMMAND", r"Missing command; one of: calibrate, data, jobs, .*validate"),
    "run without a config": (["run"], r"Usage: orchestrator run \[OPTIONS\]", r"Missing argument 'config'"),
    "unknown option": (["--bogus"], r"Usage: orchestrator \[OPTIONS\]", r"No such option: --bogus"),
    "unknown command": (["frob"], r"Usage: orchestrator \[OPTIONS\]", r"No such command 'frob'; one of: calibrate, data, .*run"),
    "mistyped command": (["jobs", "lst"], r"Usage: orchestrator jobs", r"No such command 'lst'\. Did you mean 'list'\?"),
    "group without command": (["jobs"], r"Usage: orchestrator jobs", r"Missing command; one of: list, logs, status, stop"),
    "bad option value": (["run", "configs/digits.yaml", "--workers", "two"], r"Usage: orchestrator run",
                         r"Invalid value for '--workers'"),
    "unknown option of a command": (["submit", "configs/digits.yaml", "--folow"], r"Usage: orchestrator submit",
                                    r"No such option: --folow"),
}


@pytest.mark.parametrize("args, usage, error", USAGE_ERRORS.values(), ids=USAGE_ERRORS.keys())
def test_usage_error_is_usage_line_and_one_error_line_exit_2(args: list[str], usage: str, error: str) -> None:
    result = run_cli(args, env=base_env())
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr
    assert re.match(usage, lines[0]), lines[0]
    assert re.match(rf"error: {error}.* \(see `orchestrator.*--help`\)$", lines[1]), lines[1]


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["jobs", "--help"]], ids=" ".join)
def test_help_exits_0(args: list[str]) -> None:
    result = run_cli(args, env=base_env())
    assert result.returncode == 0, result.stderr
    assert "Usage: orchestrator" in result.stdout


def test_user_error_is_one_line_exit_2() -> None:
    result = run_cli(["submit", "configs/digits.yaml", "--set", "training.lr=-0.1"], env=base_env())
    assert (result.returncode, result.stderr) == (2, "error: training.lr: must be > 0, got -0.1\n")


@pytest.mark.parametrize("name, value, error", [
    ("ORCH_SYSTEM_METRICS_S", "abc", "ORCH_SYSTEM_METRICS_S: must be a number >= 0, got 'abc'"),
    ("ORCH_PROGRESS_POLL_S", "-1", "ORCH_PROGRESS_POLL_S: must be a number >= 0, got '-1'"),
    ("ORCH_JOB_POLL_S", "inf", "ORCH_JOB_POLL_S: must be a number >= 0, got 'inf'"),
    ("ORCH_STOP_CHECK_EVERY", "0.5", "ORCH_STOP_CHECK_EVERY: must be a number of steps >= 1, got '0.5'"),
    ("MLFLOW_TRACKING_URI", "sqlite:///m\udcff.db", "MLFLOW_TRACKING_URI: not UTF-8 text, got 'sqlite:///m\\udcff.db'"),
    ("ORCH_LOG_LEVEL", "loud", "ORCH_LOG_LEVEL: must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got 'loud'"),
    ("MLFLOW_TRACKING_URI", "ftp://bob:pw@host", "MLFLOW_TRACKING_URI: scheme 'ftp' is no MLflow tracking store; use "
     "http(s)://HOST:PORT, a database URI (sqlite:///..., postgresql://...) or a local folder, got 'ftp://host'"),
])
def test_a_bad_environment_variable_is_one_line_exit_2(name: str, value: str, error: str) -> None:
    result = run_cli(["validate", "configs/digits.yaml"], env={**base_env(), name: value})
    assert (result.returncode, result.stderr) == (2, f"error: {error}\n")


def test_a_lower_case_log_level_is_taken() -> None:
    result = run_cli(["validate", "configs/digits.yaml"], env={**base_env(), "ORCH_LOG_LEVEL": "info"})
    assert result.returncode == 0, result.stderr


def test_validate_says_a_mistyped_builtin_path_means_a_new_copy_and_whose_name_registers() -> None:
    result = run_cli(["validate", "configs/digits.yaml", "--set", "data.path=data/digts", "--set", "name=mine"],
                     env=base_env())
    assert result.returncode == 0, result.stderr
    assert "data data/digts: not there yet, a new copy of the built-in 'digits' data set is prepared there" \
        in result.stdout
    assert result.stderr.strip() == ("note: the model is still registered as 'digits-cnn' (tracking.registered_model);"
                                     " --set name=... renames the job and its MLflow run only")
    assert not (ROOT / "data" / "digts").exists()  # validate prepares nothing


# ---------------------------------------------------------------------------------------------
# The token and plain http


def test_token_is_not_sent_over_plain_http_to_another_host() -> None:
    # 192.0.2.1 is a documentation address (RFC 5737): the refusal comes before any connection.
    env = base_env(RAY_AUTH_TOKEN="the-token")
    result = run_cli(["jobs", "list", "--address", "192.0.2.1:8265"], env=env, timeout_s=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == ("error: --address http://192.0.2.1:8265: the Ray token (from RAY_AUTH_TOKEN) would cross "
                             "the network unencrypted; use https://, or a tunnel to 127.0.0.1 (ssh -L, kubectl "
                             "port-forward), or pass --insecure\n")


@pytest.mark.parametrize("address, token, insecure, allowed", [
    ("http://127.0.0.1:8265", "RAY_AUTH_TOKEN", False, True),
    ("http://localhost:8265", "RAY_AUTH_TOKEN", False, True),
    ("http://[::1]:8265", "RAY_AUTH_TOKEN", False, True),
    ("https://head.example:8265", "RAY_AUTH_TOKEN", False, True),
    ("http://head.example:8265", None, False, True),  # no token, nothing secret to send
    ("http://head.example:8265", "RAY_AUTH_TOKEN", False, False),
    ("http://10.0.0.5:8265", "~/.ray/auth_token", False, False),
    ("http://10.0.0.5:8265", "RAY_AUTH_TOKEN", True, True),
])
def test_transport_check(address: str, token: str | None, insecure: bool, allowed: bool,
                         capsys: pytest.CaptureFixture[str]) -> None:
    if allowed:
        check_transport(address, token_source=token, insecure=insecure)
    else:
        with pytest.raises(UserError, match="unencrypted.*--insecure"):
            check_transport(address, token_source=token, insecure=insecure)
    warned = capsys.readouterr().err
    assert ("warning: sending the Ray token" in warned) == insecure


def test_address_without_scheme_is_http() -> None:
    assert resolve_address("127.0.0.1:8265/") == "http://127.0.0.1:8265"


@pytest.mark.parametrize("address, error", [
    ("http://[::1", "not a valid URL (Invalid IPv6 URL)"),
    ("http://127.0.0.1:99999", "not a valid URL (Port out of range 0-65535)"),
    ("127.0.0.1:abc", "not a valid URL (Port could not be cast to integer value as 'abc')"),
    ("http://:8265", "expected the Ray dashboard's http://HOST:PORT"),
])
def test_a_malformed_dashboard_address_is_one_line(address: str, error: str) -> None:
    with pytest.raises(UserError, match=rf"^--address {re.escape(address)}: {re.escape(error)}"):
        resolve_address(address)


def test_an_address_error_never_shows_its_password_or_control_characters(tmp_path: Path) -> None:
    for address in ("http://u:s3cret@127.0.0.1:99999", "u:s3cret@127.0.0.1:99999"):
        with pytest.raises(UserError, match=r"^--address (http://)?127\.0\.0\.1:99999: not a valid URL") as caught:
            resolve_address(address)
        assert "s3cret" not in str(caught.value)
    with pytest.raises(UserError, match=r"^--address: holds the character '\\x1b'; give"):
        resolve_address("http://127.0.0.1:9\x1b[31m")
    proc = run_cli(["jobs", "list", "--address", "http://u:s3cret@127.0.0.1:9"], env=base_env(), cwd=tmp_path)
    assert proc.returncode == 2 and "s3cret" not in proc.stderr + proc.stdout, proc.stderr[-2000:]
    assert "--address http://127.0.0.1:9: cannot reach the Ray dashboard" in proc.stderr, proc.stderr[-2000:]


def test_follow_exit_codes_say_the_outcome() -> None:
    assert [exit_code(s) for s in ("SUCCEEDED", "FAILED", "STOPPED", "RUNNING")] == [0, 1, 3, 1]


# ---------------------------------------------------------------------------------------------
# What the CLI prints for the user to run, and what it keeps quiet


def test_open_the_ui_names_an_mlflow_that_runs(tmp_path: Path) -> None:
    command = shlex.split(ui_command(f"sqlite:///{tmp_path / 'mlflow.db'}"))
    assert command[0] == str(BIN / "mlflow")  # the venv's, not whatever PATH holds
    result = subprocess.run([*command[:2], "--help"], capture_output=True, text=True, timeout=60,
                            env=base_env(PATH="/usr/bin:/bin"))
    assert result.returncode == 0 and "--backend-store-uri" in result.stdout
    assert ui_command("http://alice:secret@mlflow:5000") == "http://mlflow:5000"


def test_library_noise_is_dropped_and_other_warnings_kept(caplog: pytest.LogCaptureFixture) -> None:
    quiet_noise()
    with caplog.at_level(logging.WARNING):
        logging.getLogger("ray.data._internal.progress").warning("Progress bars disabled. To enable, set ...")
        logging.getLogger("mlflow.utils.requirements_utils").warning(
            "Found torch version (2.13.0+cpu) contains a local version label (+cpu).")
        logging.getLogger("mlflow.utils.requirements_utils").warning("something else")
        logging.getLogger("mlflow.store.db.utils").error("SQLAlchemy database error. The following exception is caught.")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


def test_python_dash_m_orchestrator_exits_the_same_way() -> None:
    result = subprocess.run([sys.executable, "-m", "orchestrator", "frob"], capture_output=True, text=True,
                            cwd=ROOT, env=base_env(), timeout=60)
    assert result.returncode == 2 and "No such command 'frob'" in result.stderr



UNREACHABLE = {
    # Port 1 on the loopback: nothing listens there. Ray alone retries its GCS for minutes.
    "nothing listens": ("127.0.0.1:1", r"nothing answers at 127\.0\.0\.1:1 \(Connection refused\); is the cluster up\?"),
    "Ray client": ("ray://127.0.0.1:1", r"nothing answers at 127\.0\.0\.1:1"),
    "dashboard URL": ("http://127.0.0.1:8265", r"that is a dashboard \(Jobs\) URL"),
    "no port": ("127.0.0.1:99999", r"port 99999 is not a port \(1-65535\)"),
    "no host name": ("a..b:6379", r"'a\.\.b' is not a host name \(a part between its dots is empty"),
}


@pytest.mark.parametrize("address, error", UNREACHABLE.values(), ids=UNREACHABLE.keys())
def test_a_ray_address_nothing_answers_at_is_refused_before_ray_tries(address: str, error: str) -> None:
    with pytest.raises(UserError, match=rf"^Ray address '{re.escape(address)}': {error}"):
        check_reachable(address)
    check_reachable("auto")  # Ray resolves it (and its error becomes one line in connect_ray)


def test_an_unreachable_ray_address_is_one_line_through_the_command(tmp_path: Path) -> None:
    # `run` and `profile` reach Ray through the same connect_ray (checked by hand: one line, exit 2);
    # `run` first prepares the data set, 8 s more of the suite for the same line.
    result = run_cli(["probe-network", "--address", "127.0.0.1:1"], env=base_env(), cwd=tmp_path, timeout_s=60)
    assert result.returncode == 2, result.stdout + result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Ray address '127.0.0.1:1': nothing answers"), lines


@pytest.mark.parametrize("flags, error", [
    (["--max-mib", "0"], "--max-mib: must be 1 to 1024, got 0"),
    (["--max-mib", "100000"], "--max-mib: must be 1 to 1024, got 100000"),
    (["--cpus-per-worker", "nan"], "--cpus-per-worker: must be a number > 0, got nan"),
    (["-o", "configs/digits.yaml/cluster.yaml"], "configs/digits.yaml/cluster.yaml: cannot write (configs/digits.yaml is a file, not a folder)"),
    (["-o", "-"], "-o -: name a file; this command prints its summary on stdout"),  # 748c290 missed it
], ids=["max-mib", "max-mib-huge", "cpus-per-worker", "output", "output-dash"])
def test_probe_network_flags_are_checked_before_it_connects(flags: list[str], error: str) -> None:
    # The address answers nothing: an unchecked flag would end in the address's error instead.
    result = run_cli(["probe-network", "--address", "127.0.0.1:1", *flags], env=base_env(), timeout_s=60)
    assert (result.returncode, result.stderr) == (2, f"error: {error}\n")


@pytest.mark.parametrize("job_id, why", [
    ("", "is empty"), ("a/../b", "holds '/'"), ("..", "cannot be '..'"), ("x?y", "holds '?'"),
    ("a%2fb", "holds '%'"), ("a b", "holds ' '"), ("a\nb", "holds '\\n'"), ("j" * 257, "is 257 characters"),
])
def test_a_job_id_that_would_change_the_jobs_api_path_is_refused(job_id: str, why: str) -> None:
    with pytest.raises(UserError, match=rf"^job id .*: {re.escape(why)}"):
        check_job_id(job_id)


def test_job_ids_ray_and_submit_make_pass() -> None:
    for job_id in ("raysubmit_Xy12AbCdEf", "digits-1a2b3c", "digits-resume-1a2b3c", "j" * 256):
        assert check_job_id(job_id) == job_id
    # checked before connecting: the address answers nothing, the id's error comes first
    result = run_cli(["jobs", "stop", "a/../b", "--address", "127.0.0.1:1"], env=base_env(), timeout_s=60)
    assert (result.returncode, result.stderr) == (2, "error: job id 'a/../b': holds '/'; see `orchestrator jobs list` for the ids\n")


def test_data_prepare_refuses_an_empty_out_instead_of_writing_here(tmp_path: Path) -> None:
    result = run_cli(["data", "prepare", "digits", "--out", ""], env=base_env(), cwd=tmp_path, timeout_s=60)
    assert (result.returncode, result.stderr) == (2, "error: --out: empty; give the folder to write the Parquet files into\n")
    assert not any(tmp_path.iterdir())
    # the errors named config fields (data.dataset_kwargs.rows, data.path) the user never wrote
    for args, said in ((["synthetic", "--out", "o", "--set", "rows=0"], "--set rows: must be > 0, got 0"),
                       (["digitz", "--out", "o"], "NAME: unknown data set 'digitz'; available: corpus, digits, synthetic")):
        result = run_cli(["data", "prepare", *args], env=base_env(), cwd=tmp_path, timeout_s=60)
        assert (result.returncode, result.stderr) == (2, f"error: {said}\n")


@pytest.mark.parametrize("args, flag", [
    (["run", "configs/digits.yaml", "--address", ""], "--address"),  # would start an embedded Ray instead
    (["jobs", "list", "--address", " "], "--address"),
    (["calibrate", "--experiment", "x", "--tracking-uri", ""], "--tracking-uri"),
], ids=["run", "jobs", "calibrate"])
def test_a_flag_given_empty_is_refused_not_read_as_left_out(args: list[str], flag: str) -> None:
    result = run_cli(args, env=base_env(), timeout_s=60)
    assert (result.returncode, result.stderr) == (2, f"error: {flag}: empty; leave it out for the default or give a value\n")


def test_an_error_shows_the_value_given_even_when_it_looks_like_markup() -> None:
    """The console renders rich markup; a user's value in an error is printed as typed."""
    result = run_cli(["validate", "configs/digits.yaml", "--set", "training.lr=[red]x[/red]"], env=base_env())
    assert (result.returncode, result.stderr) == (2, "error: training.lr: must be a number, got '[red]x[/red]'\n")


@pytest.mark.parametrize("then", ["stopping before training starts", "writing a final checkpoint, then stopping"])
def test_a_stop_signal_says_what_it_will_do_and_a_second_one_aborts(then: str, capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.cli.train import _graceful_stop

    stop = threading.Event()
    before = signal.getsignal(signal.SIGTERM)
    with _graceful_stop(stop, then=lambda: then) as received:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(5) and received == [signal.SIGTERM]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
    assert f"SIGTERM: {then} (again to abort)" in capsys.readouterr().err and signal.getsignal(signal.SIGTERM) is before


def test_names_and_paths_that_look_like_markup_are_printed_as_given(tmp_path: Path) -> None:
    """Rich read '[/]' in a path or a profile's model name as markup: a MarkupError traceback after
    the work was done (data written), or '[red]' silently dropped from what was printed."""
    env = base_env(XDG_CACHE_HOME=str(tmp_path / "cache"))
    odd = tmp_path / "dp[/]x[red]"
    made = run_cli(["data", "prepare", "synthetic", "--out", str(odd), "--set", "rows=16"], env=env, cwd=tmp_path)
    assert made.returncode == 0 and f"wrote synthetic to {odd}" in made.stdout, made.stderr[-2000:]
    profile = {"version": 1, "model": "[bold]x[/bold] [/]", "device": "cpu [red]", "param_count": 30_000,
               "grad_bytes": 120_000, "max_local_batch": 64,
               "samples": [{"local_batch": b, "step_time_s": t} for b, t in ((8, 0.002), (64, 0.009))]}
    (tmp_path / "p.json").write_text(json.dumps(profile))
    planned = run_cli(["plan", "--profile", "p.json", "--cluster", str(ROOT / "configs" / "clusters" / "dgx_a100.yaml")],
                      env=env, cwd=tmp_path)
    assert planned.returncode == 0 and "[bold]x[/bold] [/]: " in planned.stdout, planned.stderr[-2000:]


@pytest.mark.parametrize(("flags", "error"), [
    (["--budget", "0"], "--budget: must be > 0, got 0.0"),
    (["--min-efficiency", "2"], "--min-efficiency: must be <= 1, got 2.0"),
    (["--global-batch", "0"], "--global-batch: must be > 0, got 0"),
    (["--budget", "5"], "--total-samples: required with a deadline or budget"),
    (["--deadline-hours", "0"], "--deadline-hours: must be a number of hours > 0"),
])
def test_plan_names_the_flag_a_bad_goal_came_from(tmp_path: Path, flags: list[str], error: str) -> None:
    profile = {"version": 1, "model": "cnn", "device": "cpu", "param_count": 30_000, "grad_bytes": 120_000,
               "max_local_batch": 64, "samples": [{"local_batch": 64, "step_time_s": 0.009}]}
    (tmp_path / "p.json").write_text(json.dumps(profile))
    proc = run_cli(["plan", "--profile", "p.json", "--cluster", str(ROOT / "configs" / "clusters" / "dgx_a100.yaml"),
                    *flags], env=base_env(), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {error}"), proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1


@pytest.mark.parametrize("args", [
    ["validate", "{long}.yaml"],
    ["validate", str(ROOT / "configs" / "digits.yaml"), "--set", "data.path={long}"],
    ["tracking", "replay", "{long}.jsonl", "--tracking-uri", "http://127.0.0.1:9"],
    ["data", "prepare", "digits", "--out", "{long}"],
])
def test_a_file_name_past_255_bytes_is_one_line_exit_2(tmp_path: Path, args: list[str]) -> None:
    """Path.exists() raises ENAMETOOLONG rather than answer False: it was a traceback (exit 1)."""
    long = "a" * 300
    proc = run_cli([a.format(long=long) for a in args], env=base_env(), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: aaaa") and "(30" in proc.stderr and "File name too long" in proc.stderr


def test_a_full_disk_is_one_line_naming_the_file(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import errno

    import orchestrator.cli as cli

    def full(**_: object) -> None:  # a checkpoint record written while the disk fills (storage.write_json)
        raise OSError(errno.ENOSPC, "No space left on device", "/data/runs/digits/.job.json")

    monkeypatch.setattr(cli, "app", full)
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 2
    assert capsys.readouterr().err == "error: /data/runs/digits/.job.json: No space left on device\n"


def test_profile_refuses_an_output_that_is_its_config_or_cluster_file(tmp_path: Path) -> None:
    """`profile job.yaml -o job.yaml` replaced the job's config with the profile (exit 0)."""
    config = tmp_path / "job.yaml"
    config.write_text((ROOT / "configs" / "digits.yaml").read_text())
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text((ROOT / "configs" / "clusters" / "cpu_local.yaml").read_text())
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for args, message in (
        (["-o", "./job.yaml"], "error: -o job.yaml: the same file as the config; write it elsewhere\n"),
        (["--set", "resources.cluster=cluster.yaml", "-o", "cluster.yaml"],
         "error: -o cluster.yaml: the same file as resources.cluster; write it elsewhere\n"),
    ):
        proc = run_cli(["profile", "job.yaml", *args], env=base_env(), cwd=tmp_path, timeout_s=60)
        assert proc.returncode == 2 and proc.stderr == message, proc.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("command", [["validate"], ["run"], ["profile", "-o", "profile.json"]], ids=lambda c: c[0])
def test_a_missing_or_broken_cluster_file_or_spill_dir_is_said_before_anything_starts(tmp_path: Path, command: list[str]) -> None:
    """`resources.cluster` naming no file, or a broken one, passed `validate`; `run` and `profile`
    said it only once an embedded Ray had started."""
    (tmp_path / "broken.yaml").write_text("nodes: 1\ngpus_per_node: 2\nintra_node_GBps: .nan\ninter_node_GBps: 1\n")
    config = str(ROOT / "configs" / "digits.yaml")
    for cluster, message in (("missing.yaml", "error: missing.yaml: cluster file not found\n"),
                             ("broken.yaml", "error: broken.yaml: cluster.intra_node_GBps: must be finite, got nan\n")):
        proc = run_cli([command[0], config, *command[1:], "--set", f"resources.cluster={cluster}"], env=base_env(),
                       cwd=tmp_path, timeout_s=60)
        assert proc.returncode == 2 and proc.stderr == message, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.yaml"]
    proc = run_cli([command[0], config, *command[1:], "--set", "tracking.spill_dir=broken.yaml"], env=base_env(),
                   cwd=tmp_path, timeout_s=60)
    assert proc.returncode == 2 and proc.stderr == "error: tracking.spill_dir: cannot write to broken.yaml (not a folder)\n"
    # issue 13: a spill "to ./s3:/..." stayed in the worker's working directory, lost with the pod
    proc = run_cli([command[0], config, *command[1:], "--set", "tracking.spill_dir=s3://bucket/spill"], env=base_env(),
                   cwd=tmp_path, timeout_s=60)
    assert proc.returncode == 2 and proc.stderr == ("error: tracking.spill_dir: must be a local folder (what MLflow could "
                                                    "not take waits on this machine's disk), not a URI, got 's3://bucket/spill'\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.yaml"]


@pytest.mark.parametrize("args, error", [
    (["k8s", "render", "configs/digits.yaml", "--owner", "alice", "--mlflow-uri", "http://h\udcff:5000"],
     "--mlflow-uri: not UTF-8 text (byte 0xff)"),  # rendered into the manifest, exit 0
    (["validate", "configs/digits.yaml", "--set", "tracking.experiment=a\udcff"],
     "--set tracking.experiment=a\\udcff: not UTF-8 text (byte 0xff)"),  # a 100-line UnicodeEncodeError
])
def test_argv_bytes_of_no_utf8_text_are_one_line(args: list[str], error: str) -> None:
    result = run_cli(args, env=base_env())  # the lone surrogate goes out as the byte 0xff
    assert (result.returncode, result.stderr) == (2, f"error: {error}\n")


def test_run_refuses_a_config_of_another_digest_before_anything_starts(tmp_path: Path) -> None:
    # k8s render pins the digest of the job's ConfigMap in the RayJob's entrypoint: a <job>-config
    # another submitter created first must not train on this owner's storage.
    import hashlib

    config = tmp_path / "job.yaml"
    config.write_text((ROOT / "configs" / "digits.yaml").read_text())
    other = hashlib.sha256(b"the rendered config").hexdigest()
    result = run_cli(["run", str(config), "--config-sha256", other], env=base_env(), cwd=tmp_path, timeout_s=60)
    assert result.returncode == 2 and result.stderr.startswith(f"error: {config}: SHA-256 "), result.stderr
    assert "nothing was run" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()
    bad = run_cli(["run", str(config), "--config-sha256", "ABC"], env=base_env(), cwd=tmp_path, timeout_s=60)
    assert (bad.returncode, bad.stderr) == (2, "error: --config-sha256: must be 64 lowercase hex digits, got 'ABC'\n")
    from orchestrator.cli.train import check_digest

    check_digest(config, hashlib.sha256(config.read_bytes()).hexdigest())  # its own digest passes
