"""Credentials never leave through a logged, shipped or rendered URI or config (pure)."""

from __future__ import annotations

import pytest

from orchestrator.redact import REDACTED, is_secret_name, redact, redact_uri, scrub, tracking_credentials, userinfo


@pytest.mark.parametrize("uri, expected", [
    ("http://alice:s3cr%40t@mlflow.example:5000/path?x=1", "http://mlflow.example:5000/path?x=1"),
    ("https://token@host", "https://host"),
    ("postgresql://u:p@db:5432/mlflow?sslmode=require&password=p", "postgresql://db:5432/mlflow?sslmode=require"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("runs/local", "runs/local"),
    ("http://bob:2024/Qz@mlflow.example:5000", "http://***@mlflow.example:5000"),  # k8s render's env, as is
    ("http://h:5000/#access_token=X", "http://h:5000/#access_token=***"),  # a fragment: in manifests as given
    ("http://u:p@h:5000/?a=1#token=X", "http://h:5000/?a=1#token=***"),
    # a password holding '@' then '/' (urllib: host `ss`), or cut short beside a secret parameter: it
    # showed `http://ss/w0rd@h:5000` and `http://bob:2024/Qz@h:5000?token=***`
    ("http://user:p@ss/w0rd@h:5000", "http://***@h:5000"), ("http://user:p@ss?w0rd@h:5000/x", "http://***@h:5000/x"),
    ("http://bob:2024/Qz@h:5000?token=X", "http://***@h:5000?token=***"),
    ("s3://A:K@bucket/v1@2024/m.pt", "s3://bucket/v1@2024/m.pt"),
    # ... then a host with no port, or an IPv6 one: it showed `https://ss/w0rd@mlflow.example.com/x`
    ("https://user:p@ss/w0rd@mlflow.example.com/x", "https://***@mlflow.example.com/x"),
    ("http://user:p@ss/w0rd@[::1]:5000", "http://***@[::1]:5000"),
    ("https://user:p@ss?w0rd@mlflow.example.com", "https://***@mlflow.example.com"),
    # paths holding '@' stay as they are without userinfo, whatever follows the '@'
    ("s3://bucket/v1@2024", "s3://bucket/v1@2024"), ("file:///data/run@2", "file:///data/run@2"),
    ("http://h/users/a@b.com/x", "http://h/users/a@b.com/x"), ("s3://bucket/m@v1.2", "s3://bucket/m@v1.2"),
])
def test_redact_uri_drops_userinfo_and_secret_parameters(uri: str, expected: str) -> None:
    assert redact_uri(uri) == expected


def test_credentials_move_to_mlflows_variables() -> None:
    assert userinfo("http://alice:s3cr%40t@host") == ("alice", "s3cr@t")
    assert userinfo("http://host") is None and userinfo("plain") is None
    assert tracking_credentials("http://alice:s3cr%40t@host") == {
        "MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "s3cr@t"}
    assert tracking_credentials("http://host:5000") == {}


def test_redact_walks_a_config() -> None:
    config = {"tracking": {"tracking_uri": "http://a:b@h", "experiment": "x"},
              "data": {"path": ["s3://k:v@bucket/p", "local"]}, "extra": {"api_token": "abc", "empty_password": ""}}
    assert redact(config) == {"tracking": {"tracking_uri": "http://h", "experiment": "x"},
                              "data": {"path": ["s3://bucket/p", "local"]},
                              "extra": {"api_token": REDACTED, "empty_password": ""}}
    assert "b@" not in str(redact(config))


@pytest.mark.parametrize(("text", "expected"), [
    ("got 'http://user:s3cr3t/Pa55@host:5000'", "got 'http://host:5000'"),  # a password urllib cannot split
    ("http://user:hunter2#x@host:5000", "http://host:5000"),
    ("http://user:p@ss@host:99999/x", "http://host:99999/x"),
    ("see http://bob:BOBPW@db:5432/x and s3://AKIA:S3SECRET@bucket/x", "see http://db:5432/x and s3://bucket/x"),
    ("--address http://127.0.0.1:9/?token=SECRETQ: cannot reach", "--address http://127.0.0.1:9/?token=***: cannot reach"),
    ("http://h/x?a=1&api_key=zz&b=2", "http://h/x?a=1&api_key=***&b=2"),
    ("sqlite:////tmp/a.db and mail a@b", "sqlite:////tmp/a.db and mail a@b"),
    ("got \"http://alice:s3'cr3t@[::1\"", "got \"http://[::1\""),  # a quote is legal in a password
    # a password of digits then a quote: the digits are no port (urllib and requests take it whole)
    ("http://user:12\"34@host:8265", "http://host:8265"), ("got \"http://u:2024'Pw@h:1\"", "got \"http://h:1\""),
    ("'http://h:5000', mail a@b", "'http://h:5000', mail a@b"),
    ('{"u":"http://h:5000","m":"a@b"}', '{"u":"http://h:5000","m":"a@b"}'),
    ("?password=a'b end", "?password=*** end"),
    ("got 'http://h/?token=abc'", "got 'http://h/?token=***'"),
    ("http://user:p@ss@host:99999/x", "http://host:99999/x"),
    # paths holding '@' are no userinfo
    ("file:///data/run@2/x.parquet s3://bucket/v1@2024/m.pt docker://r/img@sha256:ab",
     "file:///data/run@2/x.parquet s3://bucket/v1@2024/m.pt docker://r/img@sha256:ab"),
    # a password starting with digits reads as a port (RFC 3986: host u, path /ab@host): masked, as is
    # a path holding '@' after a port, which cannot be told from it
    ("http://u:12/ab@host", "http://***@host"), ("--address http://bob:2024/Qz@h:9: no", "--address http://***@h:9: no"),
    ("http://u:12?ab@host http://u:12#ab@host", "http://***@host http://***@host"),
    ("http://h:5000/e/1@x", "http://***@x"), ("http://h:5000/x ok, a@b", "http://h:5000/x ok, a@b"),
    ("http://h:5000/#access_token=X&a=1", "http://h:5000/#access_token=***&a=1"),  # a fragment's secret too
    # a cut-short password holding '@' too: up to the last '@' of the word (it showed `http://ss@host`)
    ("http://u:p/a@ss@host/x", "http://host/x"), ("http://bob:2024/Qz@h@host:9", "http://***@host:9"),
    ("got 'http://user:p@ss/w0rd@127.0.0.1:5000' now", "got 'http://***@127.0.0.1:5000' now"),
    ("sqlite:////tmp/run@2/mlflow.db http://[::1]:8080/x@y", "sqlite:////tmp/run@2/mlflow.db http://[::1]:8080/x@y"),
    ("see https://user:p@ss/w0rd@mlflow.example.com/x, 'http://user:p@ss/w0rd@[::1]:5000' or http://u:p@ss#w@a.b",
     "see https://***@mlflow.example.com/x, 'http://***@[::1]:5000' or http://***@a.b"),
    ("s3://bucket/v1@2024.01/m docker://r/img@sha256:ab file:///d/run@2.1 http://h/a@b.com",
     "s3://bucket/v1@2024.01/m docker://r/img@sha256:ab file:///d/run@2.1 http://h/a@b.com"),
])
def test_scrub_finds_credentials_anywhere_in_a_text(text: str, expected: str) -> None:
    assert scrub(text) == expected


@pytest.mark.parametrize("uri", ["https://user:p@ss/w0rd@mlflow.example.com/x", "http://user:p@ss/w0rd@[::1]:5000"])
def test_the_tracking_servers_name_holds_no_part_of_a_password(uri: str) -> None:
    """The name said in every tracking message (and digested into spill files' names)."""
    from orchestrator.tracking.ops import server_name

    assert "w0rd" not in server_name(uri) and "ss" not in server_name(uri).removeprefix("https")


def test_scrub_is_linear_on_adversarial_text() -> None:
    """The first regex backtracked: 100,000 characters of 'a://' took 43 s (every error line is scrubbed).
    Here 400,000 characters of each pattern: seconds in all at worst, not hours; no timing asserted."""
    for pattern in ("a://", "a://b:c", "a://b:1/", "a://x", "?a=", "@", "a://b:c@", "a://b@/@x", "a://b@/@x.y"):
        assert len(scrub(pattern * 100_000)) <= len(pattern) * 100_000


@pytest.mark.parametrize(("name", "secret"), [
    ("private_key", True), ("AWS_KEY", True), ("signing-key", True), ("pwd", True), ("pg_pass", True),
    ("hf_token", True), ("MLFLOW_TRACKING_PASSWORD", True), ("key", True),
    ("run_key", False), ("floor_key", False), ("orchestrator.run_key", False), ("plan.cluster_key", False), ("monkey", False), ("tracking_uri", False), ("hidden", False),
    ("max_tokens", False), ("num_passes", False), ("author", False), ("ACCESS_KEY_ID", False), ("apiKey", True),
    ("X-Amz-Signature", True), ("sig", True),
])
def test_secret_names_include_keys_but_not_this_programs_own_keys(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret


def test_what_the_command_line_prints_and_logs_holds_no_credential(tmp_path) -> None:
    """The sinks: an error line, validate's ok line, a tracking URI problem, an address, the params
    and description a run logs (a URI inside a longer text, a secret-named model kwarg)."""
    from live_servers import ROOT, base_env, run_cli

    from orchestrator.tracking.ops import dataset_op, describe, params_op, tags_op

    digits = str(ROOT / "configs" / "digits.yaml")
    for args, env in (
        (["validate", digits, "--set", "data.dataset=null", "--set", "data.path=s3://AKIA:S3CRETKEY@bucket/digits"], {}),
        (["validate", digits, "--set", "data.path=s3://AKIA:S3CRETKEY@bucket/digits"], {}),  # an error line
        (["validate", digits, "--set", "tracking.tracking_uri=http://u:S3CRETKEY/x@host:5000"], {}),
        (["validate", digits], {"MLFLOW_TRACKING_URI": "http://bob:S3CRETKEY/Qz@127.0.0.1:9"}),
        (["jobs", "list", "--address", "http://bob:S3CRETKEY/x@127.0.0.1:9"], {}),
        (["jobs", "list", "--address", "http://bob:2024/S3CRETKEY@127.0.0.1:9"], {}),
        (["jobs", "list", "--address", "127.0.0.1:9?password=S3CRETKEY"], {}),
    ):
        proc = run_cli(args, env=base_env(**env), cwd=tmp_path)
        assert "S3CRETKEY" not in proc.stdout + proc.stderr and proc.stdout + proc.stderr, args
    params = params_op("h", {"model.kwargs.private_key": "S3CRETKEY", "data.note": "see s3://a:S3CRETKEY@b/x"})
    tags = tags_op("h", {"mlflow.note.content": "data on `s3://AKIA:S3CRETKEY@bucket/digits`"})
    data = dataset_op("h", name="d", uri="s3://AKIA:S3CRETKEY@bucket/d", rows=1, schema={}, new_run_only=True)
    assert "S3CRETKEY" not in str([params, tags, data, describe(ValueError("GET http://x/?token=S3CRETKEY failed"))])


@pytest.mark.parametrize("path", ["s3://AKIA:S3CRETKEY@bucket", "s3://AKIA:S3CRETKEY@bucket/", "s3://AKIA:S3/CRETKEY@b"])
def test_the_data_sets_name_in_mlflow_holds_no_credential(path: str) -> None:
    from live_servers import ROOT

    from orchestrator.config import load_config
    from orchestrator.driver.run_record import dataset_name

    job = load_config(ROOT / "configs" / "digits.yaml", ["data.dataset=null", f"data.path={path}"])
    assert "S3" not in dataset_name(job) and dataset_name(job)


@pytest.mark.parametrize(("override", "env"), [
    ("data.path=s3://AKIA:S3CRETKEY@bucket/model@v1.2/x", {}),  # shipped as s3://v1.2/x: another bucket
    ("tracking.tracking_uri=https://u:p@S3CRETKEY/x@mlflow.example.com/x", {}),
    ("training.epochs=1", {"MLFLOW_TRACKING_URI": "http://u:p@S3CRETKEY/x@[::1]:5000"}),
    ("training.epochs=1", {"ORCH_MIRROR": "see http://mlflow.example:5000/team@a"}),  # shipped as `see http://a`
])
def test_a_value_redaction_can_only_mask_is_refused_not_shipped_as_another_host(
        override: str, env: dict[str, str], tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from live_servers import ROOT

    from orchestrator.errors import UserError
    from orchestrator.submit import build_submission

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError) as err:
        build_submission(ROOT / "configs" / "digits.yaml", staging=tmp_path, overrides=["data.dataset=null", "data.path=s3://b/d", override])
    assert f"{[*env, override.partition('=')[0]][0]}: an '@' after a '/', '?' or '#'" in str(err.value)
    assert "S3CRETKEY" not in str(err.value) and not list(tmp_path.iterdir())


def test_a_value_with_an_at_sign_in_its_path_is_shipped_as_it_is(tmp_path) -> None:
    from live_servers import ROOT

    from orchestrator.submit import build_submission

    sub = build_submission(ROOT / "configs" / "digits.yaml", staging=tmp_path,
                           overrides=["data.dataset=null", "data.path=s3://AKIA:S3CRETKEY@bucket/v1@2024/x"])
    assert "--set data.path=s3://bucket/v1@2024/x" in sub.entrypoint


def test_no_name_this_program_writes_reads_as_a_secret() -> None:
    """A tag or param masked as '***' loses what it says: `plan.cluster_key` (which calibrate groups
    runs by) was masked when names ending in 'key' became secret. Every tag this program sets and
    every field of the shipped configs stays as written."""
    from pathlib import Path

    from orchestrator.calibrations import CLUSTER_KEY_TAG
    from orchestrator.config import flatten, load_config
    from orchestrator.tracking.ops import DESCRIPTION_TAG, HANDLE_TAG, RUN_KEY_TAG

    names = [RUN_KEY_TAG, CLUSTER_KEY_TAG, HANDLE_TAG, DESCRIPTION_TAG]
    for config in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        names += flatten(load_config(config).to_dict())
    assert [n for n in names if is_secret_name(n)] == []
