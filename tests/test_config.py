"""Config validation: every error is one line that names the field and the bad value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.config import apply_overrides, flatten, load_config
from orchestrator.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits.yaml"


def write(tmp_path: Path, overrides: list[str], *, drop: str | None = None) -> Path:
    raw = apply_overrides(yaml.safe_load(DIGITS.read_text()), overrides)
    if drop:
        section, key = drop.split(".")
        del raw[section][key]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["training.lr=-0.1"], "training.lr: must be > 0, got -0.1"),
        (["training.lr=.inf"], "training.lr: must be a finite number, got inf"),
        (["training.lr=.nan"], "training.lr: must be a finite number, got nan"),
        (["resources.deadline_hours=1e400"], "resources.deadline_hours: must be a finite number"),
        (["training.global_batch_size=0"], "training.global_batch_size: must be > 0, got 0"),
        (["training.global_batch_size=true"], "training.global_batch_size: must be an integer, got true"),
        (["training.lr=false"], "training.lr: must be a number, got false"),
        (["resources.workers={min: 1, max: true}"], "resources.workers.max: must be an integer, got true"),
        (["training.epochs=abc"], "training.epochs: "),
        (["training.optimizer=adamx"], "training.optimizer: must be 'adamw', 'adam' or 'sgd', got 'adamx'"),
        (["training.precision=fp8"], "training.precision: must be 'auto', 'fp32' or 'bf16', got 'fp8'"),
        (["training.seed=-1"], "training.seed: must be >= 0, got -1"),
        (["training.grad_accumulation=-2"], "training.grad_accumulation: must be > 0 or 'auto', got -2"),
        (["training.global_batch_size=64", "training.grad_accumulation=100"],
         "training.grad_accumulation: 100 micro-batches per step is more than global_batch_size 64"),
        (["training.grad_accumulation=1000000000000000000000000000000000"],
         "training.grad_accumulation: an integer of about 34 digits micro-batches per step is more than"),
        (["training.lr_typo=0.1"], "training.lr_typo: unknown key (expected one of epochs, max_steps, "),
        (["bogus=1"], "bogus: unknown key (expected one of name, model, data, training, checkpoint, resources, "
                      "tracking, ray)"),  # a cluster file's unknown key listed them, a job config's did not
        (["resources.workers={mni: 1, max: 2}"], "resources.workers.mni: unknown key (expected one of min, max)"),
        (["data.label={column: y, dtpe: int64}"], "data.label.dtpe: unknown key (expected one of column, dtype, shape)"),
        (["resources.workers=0"], "resources.workers: must be > 0"),
        (["resources.workers={min: 4, max: 2}"], "resources.workers: min must be <= max, got min=4 max=2"),
        (["resources.use_gpu=maybe"], "resources.use_gpu: must be 'auto' or true or false, got 'maybe'"),
        (["training.epochs=abc"], "training.epochs: must be an integer, got 'abc'"),
        (["data.label=5"], "data.label: must be a mapping, got 5"),
        (["checkpoint.keep_last=0"], "checkpoint.keep_last: must be > 0, got 0"),
        (["data.val_fraction=1.5"], "data.val_fraction: must be < 1"),
        (["data.path=[data/digits, data/digits]"], "data.path: lists data/digits more than once"),
        (["resources.workers=" + "1" * 43], "resources.workers: must be > 0 and at most 65,536 (the GPUs the planner"),
        (["resources.workers={min: 0, max: 1}"], "resources.workers.min: must be > 0, got 0"),
        (["resources.workers={min: 1, max: 100000}"], "resources.workers.max: must be <= 65536, got 100000"),
        (["resources.cpus_per_worker=1.0e308"], "resources.cpus_per_worker: must be <= 4096"),
        (["data.path=[d/p, ./d/p/, s3://b/x, s3://b/x/]"], "data.path: lists d/p and ./d/p/ (one place): its rows would be read twice"),
        (["data.path=[d/p/f.parquet, d/p]"], "data.path: lists d/p/f.parquet inside d/p, also listed"),
        (["data.path=[/, /]"], "data.path: lists / more than once"),  # '/' is the place '', which read as no repeat
        (["data.path=''"], "data.path: every path must name a file or folder, got ''"),
        (["data.path=[a, b]"], "data.path: a built-in data set (digits) is prepared into exactly one folder, got 2"),
        (["data.dataset=null", "data.dataset_kwargs.rows=3"], "data.dataset_kwargs: options for preparing a built-in "
         "data set, but data.dataset is not set (rows would be ignored)"),  # were dropped without a word
        (["data.label.dtype=float32"], "data.label: dtype must be int32 or int64: labels are class ids, and float "
         "ones would be cut (2.7 trains as class 2), got float32"),  # validate said ok; training cut 2.7 to class 2
        (["data.features.dtype=float16"], "data.features.dtype: must be 'float32', 'float64', 'int32' or 'int64'"),
        (["data.features.shape=[1, -8, 8]"], "data.features.shape: must be a non-empty list of positive sizes"),
        (["data.features.shape=[true, 8]"], "data.features.shape: must be a list of integers, got [true, 8]"),
        (["name=bad name!"], "name: "),
        (["name=" + "x" * 300], "name: must be at most 128 characters, got 300"),
        (["tracking.tracking_uri=ftp://host/x"], "tracking.tracking_uri: scheme 'ftp' is no MLflow tracking store"),
        ([f"tracking.tracking_uri=ftp://{'h' * 5000}"], "tracking.tracking_uri: scheme 'ftp' is no MLflow tracking store"),
        (['tracking.tracking_uri="http://h\\t:5000"'], "tracking.tracking_uri: holds a control character (such as a newline"),
        (["tracking.tracking_uri=http:///x"], "tracking.tracking_uri: no host; expected http://HOST:PORT, got 'http:///x'"),
        # urllib reads host evil.com, requests (WHATWG: '\' is '/') host h: which one the job talks to is a guess
        (["tracking.tracking_uri=http://h:5000\\@evil.com"], "tracking.tracking_uri: a backslash in its host part"),
        # every request failed ("Invalid url") and the run spilled everything it logged
        (["tracking.tracking_uri=http://mlflow server:5000"],
         "tracking.tracking_uri: a space in its host name, which no host name holds, got 'http://mlflow server:5000'"),
        # a folder: `tracking replay` retried MLflow's "unable to open database file" for ~2 minutes
        (["tracking.tracking_uri=sqlite:////tmp"], "tracking.tracking_uri: names a folder, not a database file"),
        # MLflow 3 refuses its folder store when the tracker opens it: said at validation instead
        (["tracking.tracking_uri=./mlruns"], "tracking.tracking_uri: a folder is MLflow's file store, which MLflow 3 refuses"),
        (["tracking.tracking_uri=file:///tmp/mlruns"], "tracking.tracking_uri: a folder is MLflow's file store"),
        # the credentials a URI carries are not echoed, even when it is malformed
        (["tracking.tracking_uri=http://alice:s3cret@[::1"],
         "tracking.tracking_uri: not a valid URI (Invalid IPv6 URL), got 'http://[::1'"),
        (["tracking.tracking_uri=https://alice:s3cret@h:99999"],
         "tracking.tracking_uri: not a valid URI (Port out of range 0-65535), got 'https://h:99999'"),
        (["tracking.registered_model=team/cnn"],
         "tracking.registered_model: must be a model name without '/' or ':' and not '.' or '..' (MLflow's rule), got 'team/cnn'"),
        (["tracking.registered_model=..cnn"], "tracking.registered_model: must be a model name without '/'"),
        (["tracking.registered_model=" + "m" * 257], "tracking.registered_model: must be at most 256 characters"),
        (["tracking.experiment=" + "e" * 501], "tracking.experiment: must be a name of 1 to 500 characters (MLflow's "
                                                "limit), got 501 characters"),
        (["tracking.experiment='  '"], "tracking.experiment: must be a name, got '  '"),
        # was read as the text "{width: 8, width: 9}": "model.kwargs: must be a mapping, got '{width: 8, ...'"
        (["model.kwargs={width: 8, width: 9}"], "--set model.kwargs: duplicate key 'width'"),
        # argv bytes of no UTF-8 text (`--set $'name=\xff'`): a 100-line UnicodeEncodeError in the YAML parser
        (["tracking.experiment=a\udcff"], "--set tracking.experiment=a\\udcff: not UTF-8 text (byte 0xff)"),
        (["training.epochs=null", "training.max_steps=null"], "training: set epochs or max_steps"),
        # validate said ok; run then failed in pyarrow, or prepared a built-in set into a local ./s3:/bucket
        (["checkpoint.storage_path=s3://"], "checkpoint.storage_path: s3:// names no bucket or host, got 's3://'"),
        (["data.dataset=null", "data.path=gs:///x"], "data.path: gs:// names no bucket or host, got 'gs:///x'"),
        # credentials but no bucket: passed, and `k8s render` wrote the local path s3:/x for it
        (["checkpoint.storage_path=s3://KEY:SECRET@/x"], "checkpoint.storage_path: s3:// names no bucket or host"),
        (['checkpoint.storage_path="runs\0x"'], "checkpoint.storage_path: holds a NUL byte, which no file name holds"),
        (["data.path=s3://bucket/digits"], "data.path: a built-in data set (digits) is prepared into a local folder, "
                                           "got the URI 's3://bucket/digits'"),
    ],
)
def test_bad_field_is_one_line_naming_it(tmp_path: Path, overrides: list[str], expected: str) -> None:
    with pytest.raises(UserError) as err:
        load_config(write(tmp_path, []), overrides)
    message = str(err.value)
    assert message.startswith(expected), message
    assert "\n" not in message and "got {'" not in message  # a section-wide check does not echo the section
    assert len(message) < 400, message  # a long value is shown cut


def test_missing_required_section(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^data.path: required field is missing$"):
        load_config(write(tmp_path, [], drop="data.path"))


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(UserError, match=r"bad.yaml: not valid YAML \(line \d+\)"):
        load_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="expected a mapping"):
        load_config(listed)
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        load_config(DIGITS, ["training.lr"])


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(evil)


def test_overrides_and_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    job = load_config(DIGITS, ["training.lr=0.01", "resources.workers={min: 1, max: 2}"])
    assert job.training.lr == 0.01
    assert (job.resources.workers.min, job.resources.workers.max) == (1, 2)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert job.resolved_tracking_uri() is None  # MLflow's default
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert job.resolved_tracking_uri() == "http://127.0.0.1:5999"
    job = load_config(DIGITS, ["tracking.tracking_uri=sqlite:///x.db"])
    assert job.resolved_tracking_uri() == "sqlite:///x.db"


def test_flatten_for_params() -> None:
    flat = flatten(load_config(DIGITS).to_dict())
    assert flat["training.lr"] == 0.003
    assert flat["data.features.shape"] == "[1, 8, 8]"
    assert flat["model.kwargs.width"] == 32


def test_uris_that_name_a_local_path_need_no_host(tmp_path: Path) -> None:
    # Ray Data reads local:///PATH on the driver's node, pyarrow as a local path: refused as hostless
    job = load_config(write(tmp_path, ["data.dataset=null", "data.path=local:///data/digits",
                                       "checkpoint.storage_path=file:///tmp/runs"]))
    assert (job.data.path, job.checkpoint.storage_path) == ("local:///data/digits", "file:///tmp/runs")
    job = load_config(write(tmp_path, ["data.dataset=null", "data.path=hdfs:///data/digits"]))  # the default namenode
    assert job.data.path == "hdfs:///data/digits"


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")))
def test_shipped_job_configs_validate(config: Path) -> None:
    if not {"model", "training"} <= set(yaml.safe_load(config.read_text())):
        pytest.skip(f"{config.name} is not a job config")
    load_config(config)


def test_cli_exits_2_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "validate", str(DIGITS), "--set", "training.lr=-0.1"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: training.lr: must be > 0, got -0.1"
    assert "Traceback" not in proc.stderr + proc.stdout


def test_a_job_longer_than_the_planner_can_count_is_one_line(tmp_path: Path) -> None:
    from orchestrator.driver.data import total_steps

    # max_steps alone says the length: `validate` refuses it; epochs need the data's row count
    with pytest.raises(UserError, match=r"^training.max_steps: 100,000,000,000,000,000 steps of .* more than 2\*\*53 samples; no job runs that long$"):
        load_config(write(tmp_path, []), ["training.max_steps=100000000000000000", "training.epochs=null"])
    by_epochs = load_config(write(tmp_path, []), ["training.epochs=1000000000000000", "training.max_steps=null"])
    with pytest.raises(UserError, match=r"^training.epochs: "):
        total_steps(by_epochs, per_epoch=1000)
    assert total_steps(load_config(write(tmp_path, []), ["training.max_steps=7", "training.epochs=1"]), per_epoch=10) == 7


def test_the_mlflow_name_limits_are_mlflows() -> None:
    from mlflow.store.model_registry.dbmodels.models import SqlRegisteredModel
    from mlflow.utils.validation import MAX_EXPERIMENT_NAME_LENGTH

    from orchestrator.config import MAX_EXPERIMENT_NAME, MAX_MODEL_NAME

    assert MAX_EXPERIMENT_NAME == MAX_EXPERIMENT_NAME_LENGTH
    assert MAX_MODEL_NAME == SqlRegisteredModel.__table__.c.name.type.length


def test_the_configs_bounds_are_the_planners() -> None:
    from orchestrator import config
    from orchestrator.planner.base import MAX_DEADLINE_S
    from orchestrator.planner.types import MAX_GPUS

    assert (config.MAX_WORKERS, config.MAX_DEADLINE_HOURS) == (MAX_GPUS, MAX_DEADLINE_S / 3600)
