"""What `orchestrator submit` packs for the cluster, without a cluster: the files (and no file a
link smuggles in), the environment (and no credential), the entry script that picks the head's
Python, and the command a stopped job prints to resume."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import yaml
from live_servers import ROOT, make_project

from orchestrator import submit
from orchestrator.errors import UserError
from orchestrator.job_entry import ENTRY_FILE, REQUIRED_MODULES, write_entry
from orchestrator.submit import RESUME_HINT_ENV, build_submission

CONFIG = "configs/digits.yaml"
PASSWORD = "pw-7c1e"


@pytest.fixture()
def project(tmp_path: Path, digits_data: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    monkeypatch.chdir(make_project(root, digits_data))
    return root


@pytest.fixture()
def staging(tmp_path: Path) -> Path:
    folder = tmp_path / "staging"
    folder.mkdir()
    return folder


def test_submission_packs_config_data_code_entry_and_safe_env(
    project: Path, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in {"MLFLOW_TRACKING_URI": "http://tracking:5000", "ORCH_JOB_POLL_S": "0.1",
                       "MLFLOW_TRACKING_PASSWORD": "hunter2", "RAY_AUTH_TOKEN": "secret-token"}.items():
        monkeypatch.setenv(key, value)
    sub = build_submission("digits.yaml", staging=staging, overrides=["training.epochs=1"], workers=2)

    assert re.fullmatch(r"digits-cnn-[0-9a-f]{6}", sub.submission_id) and sub.job_name == sub.submission_id
    assert (staging / "digits.yaml").read_bytes() == (project / "digits.yaml").read_bytes()  # comments kept
    assert list((staging / "data" / "digits").glob("*.parquet")) and (staging / ENTRY_FILE).is_file()
    assert [Path(m).name for m in sub.runtime_env["py_modules"]] == ["orchestrator", "trainers"]
    env = sub.runtime_env["env_vars"]
    assert env["MLFLOW_TRACKING_URI"] == "http://tracking:5000" and env["ORCH_JOB_POLL_S"] == "0.1"
    assert "MLFLOW_TRACKING_PASSWORD" not in env and "RAY_AUTH_TOKEN" not in env
    assert "hunter2" not in sub.entrypoint and "secret-token" not in sub.entrypoint
    assert sub.entrypoint.startswith(f"exec sh {ENTRY_FILE} run digits.yaml --address auto --workers 2 ")
    assert sub.entrypoint.endswith(f"--set training.epochs=1 --set name={sub.job_name}")
    # What a stopped job prints: the submit command that continues this job, not "the same command".
    assert env[RESUME_HINT_ENV] == (f"orchestrator submit digits.yaml --resume {sub.job_name} --workers 2 "
                                    "--set training.epochs=1")
    assert any("registered as 'digits-cnn'" in n for n in sub.notes), sub.notes
    again = build_submission("digits.yaml", staging=staging)
    assert again.job_name != sub.job_name  # the same config twice: two jobs, two runs, two checkpoint dirs


def test_resume_keeps_the_job_name_under_a_new_submission_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    sub = build_submission(CONFIG, staging=tmp_path, resume="digits-cnn-0a1b2c")
    assert sub.job_name == "digits-cnn-0a1b2c"
    assert sub.submission_id.startswith("digits-cnn-0a1b2c-resume-")
    assert sub.entrypoint.endswith("--set name=digits-cnn-0a1b2c")
    (tmp_path / "requirements.txt").write_text("tqdm\n")
    with_pip = build_submission(CONFIG, staging=tmp_path, requirements=tmp_path / "requirements.txt", workers=1)
    # the command a stopped job prints installs what the job needs again
    assert with_pip.runtime_env["env_vars"][RESUME_HINT_ENV] == (
        f"orchestrator submit {CONFIG} --resume {with_pip.job_name} --workers 1 --pip {tmp_path}/requirements.txt")
    # a job submitted with --address is resumed on that cluster (its credentials never in the hint)
    elsewhere = build_submission(CONFIG, staging=tmp_path, address="http://u:s3cret@head.example:8265", insecure=True)
    assert elsewhere.runtime_env["env_vars"][RESUME_HINT_ENV] == (
        f"orchestrator submit {CONFIG} --resume {elsewhere.job_name} --address http://head.example:8265 --insecure")
    # a password urllib and requests take whole though a quote follows its first digits
    quoted = build_submission(CONFIG, staging=tmp_path, address='u:12"s3cret@head.example:8265')
    assert "s3cret" not in quoted.runtime_env["env_vars"][RESUME_HINT_ENV]


@pytest.mark.parametrize("kwargs, error", [
    ({"resume": ""}, r"--resume: empty; give the NAME of the job to continue"),
    ({"resume": "../x"}, r"--resume: must use only letters, digits"),
    ({"requirements": Path("configs")}, r"--pip: configs is not a file \(a requirements.txt\)"),
    ({"requirements": Path("nowhere.txt")}, r"--pip: nowhere.txt not found"),
], ids=["empty-resume", "resume-path", "pip-folder", "pip-missing"])
def test_bad_flags_are_one_line_naming_the_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 kwargs: dict, error: str) -> None:
    monkeypatch.chdir(ROOT)
    with pytest.raises(UserError, match=rf"^{error}"):
        build_submission(CONFIG, staging=tmp_path, **kwargs)


def test_relative_path_outside_the_project_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    with pytest.raises(UserError, match=r"^data.path: \.\./elsewhere is outside the current directory"):
        build_submission(CONFIG, staging=tmp_path, overrides=["data.path=../elsewhere"])


def test_a_path_that_climbs_out_and_back_in_is_refused_and_nothing_is_written_outside(
        project: Path, staging: Path, tmp_path: Path) -> None:
    """`../project/data` is inside the project, but it was copied to staging/../project/data:
    outside the upload, overwriting whatever was there."""
    data = next(p for p in ("data", "data/digits") if (project / p).is_dir())
    victim = staging.parent / project.name / data / "kept.txt"
    victim.parent.mkdir(parents=True, exist_ok=True)
    victim.write_text("kept\n")
    outside = lambda: sorted(p for p in staging.parent.rglob("*") if not p.is_relative_to(staging))  # noqa: E731
    before = outside()
    with pytest.raises(UserError, match=rf"^data.path: \.\./project/{data} climbs with '\.\.'; write it from the "
                                        rf"current directory \({data}\)"):
        build_submission("digits.yaml", staging=staging, overrides=[f"data.path=../project/{data}"])
    assert victim.read_text() == "kept\n" and outside() == before


def test_secret_named_variables_stay_here_and_are_said(project: Path, staging: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_HF_TOKEN", PASSWORD)
    monkeypatch.setenv("ORCH_SIGNING_KEY", PASSWORD)
    for name in ("ORCH_AUTH_TOKEN_VALUE", "ORCH_TOKEN_2", "ORCH_GITHUB_PAT", "ORCH_API_KEYS"):  # a secret's word inside
        monkeypatch.setenv(name, PASSWORD)
    monkeypatch.setenv("ORCH_LOG_LEVEL", "INFO")
    sub = build_submission("digits.yaml", staging=staging)
    assert PASSWORD not in str(sub.runtime_env) and sub.runtime_env["env_vars"]["ORCH_LOG_LEVEL"] == "INFO"
    assert any(n.startswith("ORCH_API_KEYS, ORCH_AUTH_TOKEN_VALUE, ORCH_GITHUB_PAT, ORCH_HF_TOKEN, ORCH_SIGNING_KEY, "
                            "ORCH_TOKEN_2: not shipped") for n in sub.notes), sub.notes


def test_a_secret_named_config_value_is_refused_not_shipped(project: Path, staging: Path) -> None:
    with pytest.raises(UserError, match=r"^data\.dataset_kwargs\.private_key: a secret would be shipped"):
        build_submission("digits.yaml", staging=staging, overrides=[f"data.dataset_kwargs.private_key={PASSWORD}"])
    assert not any(staging.iterdir())  # refused before anything is staged


def test_a_secret_named_value_inside_a_list_is_refused_not_shipped(project: Path, staging: Path) -> None:
    override = f"data.dataset_kwargs.mirrors=[{{url: https://hub.example, hf_token: {PASSWORD}}}]"
    with pytest.raises(UserError, match=r"^data\.dataset_kwargs\.mirrors\[0\]\.hf_token: a secret would be shipped"):
        build_submission("digits.yaml", staging=staging, overrides=[override])
    assert not any(staging.iterdir())


def test_mistyped_builtin_data_path_is_announced_as_a_new_copy(project: Path, staging: Path) -> None:
    sub = build_submission("digits.yaml", staging=staging, overrides=["data.path=data/digts"])
    assert any(n.startswith("data.path: data/digts does not exist here, so the job prepares a new copy")
               for n in sub.notes), sub.notes


# ---------------------------------------------------------------------------------------------
# Credentials: a password in any tracking URI stays on this machine


def test_tracking_credentials_are_stripped_from_env_overrides_and_config(
    project: Path, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{PASSWORD}@tracking:5000")
    config = yaml.safe_load((project / "digits.yaml").read_text())
    config["tracking"]["tracking_uri"] = f"https://bob:{PASSWORD}@mlflow.example:443/?token={PASSWORD}"
    (project / "digits.yaml").write_text(yaml.safe_dump(config))
    override = f"tracking.tracking_uri=http://carol:{PASSWORD}@tracking:5000"

    sub = build_submission("digits.yaml", staging=staging, overrides=[override])

    shipped = [str(sub.runtime_env), sub.entrypoint, *(p.read_text(errors="replace") for p in staging.rglob("*.y*ml"))]
    assert all(PASSWORD not in text for text in shipped)
    assert sub.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://tracking:5000"
    assert "--set tracking.tracking_uri=http://tracking:5000" in sub.entrypoint
    assert yaml.safe_load((staging / "digits.yaml").read_text())["tracking"]["tracking_uri"] == "https://mlflow.example:443/"
    assert any("credentials in a URI are not shipped" in n and "MLFLOW_TRACKING_USERNAME" in n for n in sub.notes)


def test_credentials_urllib_cannot_split_or_inside_a_text_are_not_shipped(
    project: Path, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an S3 secret key holds '/' (urllib then sees no userinfo), and a variable may hold a URI in a longer text
    monkeypatch.setenv("ORCH_MIRROR", f"mirror of s3://AKIA1:{PASSWORD}@bucket/x")
    override = f"checkpoint.storage_path=s3://AKIA1:wJal/{PASSWORD}@bucket/runs"

    sub = build_submission("digits.yaml", staging=staging, overrides=[override])

    shipped = [str(sub.runtime_env), sub.entrypoint, *(p.read_text(errors="replace") for p in staging.rglob("*.y*ml"))]
    assert all(PASSWORD not in text for text in shipped)
    assert "--set checkpoint.storage_path=s3://bucket/runs" in sub.entrypoint
    assert sub.runtime_env["env_vars"]["ORCH_MIRROR"] == "mirror of s3://bucket/x"


# ---------------------------------------------------------------------------------------------
# Links in the data folder: followed only inside the project, counted as shipped


def test_link_to_a_file_outside_the_project_is_refused(project: Path, staging: Path, tmp_path: Path) -> None:
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    (project / "data" / "digits" / "notes.parquet").symlink_to(secret)
    with pytest.raises(UserError, match=r"^data.path: data/digits/notes.parquet leads to .*id_rsa, outside"):
        build_submission("digits.yaml", staging=staging)
    assert not any("PRIVATE KEY" in p.read_text(errors="replace") for p in staging.rglob("*") if p.is_file())


def test_data_folder_that_is_a_link_out_of_the_project_is_refused(
    project: Path, staging: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    (project / "data" / "digits").rename(elsewhere)
    (project / "data" / "digits").symlink_to(elsewhere)
    with pytest.raises(UserError, match=r"^data.path: data/digits leads to .*elsewhere, outside the current directory"):
        build_submission("digits.yaml", staging=staging)


def test_link_inside_the_project_ships_as_a_plain_file(project: Path, staging: Path) -> None:
    shard = next((project / "data" / "digits").glob("*.parquet"))
    (project / "data" / "digits" / "again.parquet").symlink_to(shard)
    build_submission("digits.yaml", staging=staging)
    copied = staging / "data" / "digits" / "again.parquet"
    assert copied.is_file() and not copied.is_symlink() and copied.read_bytes() == shard.read_bytes()


def test_a_data_folders_ignore_files_do_not_drop_its_data_from_the_upload(project: Path, staging: Path) -> None:
    # A data folder kept out of git by its own `.gitignore` (`*`) was staged as it is, and Ray's
    # uploader obeys every .gitignore / .rayignore in the working_dir: the job got no data.
    from ray._private.runtime_env.packaging import create_package

    data = project / "data" / "digits"
    (data / ".gitignore").write_text("*\n!.gitignore\n")
    (data / ".rayignore").write_text("*.parquet\n")
    build_submission("digits.yaml", staging=staging)
    create_package(str(staging), staging.parent / "upload.zip", include_parent_dir=False, include_gitignore=True)
    uploaded = {Path(n).name for n in zipfile.ZipFile(staging.parent / "upload.zip").namelist()}
    assert {f.name for f in data.glob("*.parquet")} <= uploaded, uploaded


def test_size_limit_counts_what_a_linked_folder_ships(
    project: Path, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = project / "data" / "digits"
    monkeypatch.setattr(submit, "SHIP_LIMIT_BYTES", sum(f.stat().st_size for f in data.iterdir()) + 1000)
    bulk = project / "bulk"
    bulk.mkdir()
    (bulk / "blob.bin").write_bytes(os.urandom(4000))
    (data / "more").symlink_to(bulk)  # inside the project, so followed: and then counted
    with pytest.raises(UserError, match=r"^data.path: data/digits is too large to ship"):
        build_submission("digits.yaml", staging=staging)


@pytest.mark.parametrize("which", ["data file", "config"])
def test_a_name_that_is_not_utf8_is_one_line_naming_it(project: Path, staging: Path, which: str) -> None:
    # Ray zips the upload under UTF-8 names: a file named with a Latin-1 byte was staged as it is
    # and the upload failed with a traceback (UnicodeEncodeError, then "must be an existing directory").
    odd = os.fsdecode(b"caf\xe9")
    if which == "config":
        config = (project / "digits.yaml").rename(project / f"{odd}.yaml").name
        expected = r"^caf\\xe9\.yaml: the name holds byte 0xe9, which is not UTF-8 text; rename it"
    else:
        config = "digits.yaml"
        (project / "data" / "digits" / f"{odd}.parquet").write_bytes(b"")
        expected = r"^data.path: data/digits/caf\\xe9\.parquet: the name holds byte 0xe9, which is not UTF-8 text"
    with pytest.raises(UserError, match=expected):
        build_submission(config, staging=staging)


# ---------------------------------------------------------------------------------------------
# The entry script: which Python runs the job on the head


def _entry(tmp_path: Path, python: str, *args: str) -> subprocess.CompletedProcess:
    write_entry(tmp_path)
    env = {**os.environ, "ORCH_PYTHON": python}
    return subprocess.run(["sh", str(tmp_path / ENTRY_FILE), *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_entry_runs_the_job_under_a_python_that_has_the_project(tmp_path: Path) -> None:
    result = _entry(tmp_path, sys.executable, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"orchestrator: running the job under {sys.executable}\n")
    assert "Usage: python -m orchestrator" in result.stdout  # the job ran `python -m orchestrator --help`


def test_entry_without_a_usable_python_fails_in_one_line(tmp_path: Path) -> None:
    bare = tmp_path / "bare-python"  # this Python with no site-packages and no PYTHONPATH
    bare.write_text(f'#!/bin/sh\nexec "{sys.executable}" -I -S "$@"\n')
    bare.chmod(0o755)
    result = _entry(tmp_path, str(bare), "--help")
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: no Python on this node can run the job ({bare}: cannot import ray, torch, ")
    assert "ORCH_PYTHON" in lines[0]
    missing = _entry(tmp_path, "/nonexistent/python", "--help")
    assert missing.returncode == 2 and "(/nonexistent/python: not found)" in missing.stderr


def test_entry_checks_every_runtime_dependency_of_the_project() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[\[<>=!~ ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}
    provided: dict[str, set[str]] = {}
    for module, dists in packages_distributions().items():
        for dist in dists:
            provided.setdefault(dist.lower().replace("_", "-"), set()).add(module)
    unchecked = {n for n in names if not provided.get(n, set()) & set(REQUIRED_MODULES)}
    assert not unchecked, f"add their import names to REQUIRED_MODULES: {unchecked}"
