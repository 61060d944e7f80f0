"""A model and its data set are checked to fit before anything starts (trainers/compat.py): the
model takes the features (a forward pass on the meta device), labels and token ids lie within its
classes, nothing is null. Each of these was a worker's traceback once the job ran."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from orchestrator.config import load_config
from orchestrator.driver.data import check_batch_fits, steps_per_epoch
from orchestrator.errors import UserError
from trainers.compat import check_fit, output_classes
from trainers.config import DataConfig, ModelConfig

ROOT = Path(__file__).resolve().parents[1]
CNN = ModelConfig(name="cnn", kwargs={"in_channels": 1, "num_classes": 10})


def digits_like(folder: Path, labels: list[int | None], *, pixels: list | None = None, **write: object) -> DataConfig:
    folder.mkdir(parents=True, exist_ok=True)
    rows = len(labels)
    pixels = pixels if pixels is not None else [list(np.random.rand(64).astype("float32")) for _ in range(rows)]
    table = pa.table({"pixels": pa.array(pixels, type=pa.list_(pa.float32())),
                      "label": pa.array(labels, type=pa.int64())})
    pq.write_table(table, folder / "part-0.parquet", **write)
    return DataConfig(path=str(folder), features={"column": "pixels", "dtype": "float32", "shape": [1, 8, 8]},
                      label={"column": "label", "dtype": "int64"})


@pytest.mark.parametrize(("config", "classes"), [("digits", 10), ("synthetic_resnet", 10), ("tiny_gpt", 256)])
def test_the_shipped_models_take_their_data(config: str, classes: int) -> None:
    job = load_config(ROOT / "configs" / f"{config}.yaml")
    assert output_classes(job.model, job.data) == classes


@pytest.mark.parametrize(("model", "features", "message"), [
    (ModelConfig(name="cnn", kwargs={"in_channels": 3}), {"dtype": "float32", "shape": [1, 8, 8]},
     "model: cnn with kwargs {'in_channels': 3} does not take data.features (column 'x', float32, shape [1, 8, 8]): "),
    (ModelConfig(name="mlp", kwargs={"in_features": 32}), {"dtype": "float32", "shape": [1, 8, 8]},
     "model: mlp with kwargs {'in_features': 32} does not take data.features"),
    (ModelConfig(name="gpt", kwargs={}), {"dtype": "float32", "shape": [129]},
     "model: gpt with kwargs {} does not take data.features (column 'x', float32, shape [129]): Expected tensor"),
    (ModelConfig(name="gpt", kwargs={"context": 64}), {"dtype": "int64", "shape": [129]},
     "model.kwargs.context: sequence length 128 exceeds context 64"),
])
def test_a_model_that_does_not_take_the_features_is_one_line(model: ModelConfig, features: dict,
                                                             message: str) -> None:
    data = DataConfig(path="unused", features={"column": "x", **features},
                      label=None if model.name == "gpt" else {"column": "y", "dtype": "int64"})
    with pytest.raises(UserError, match=re.escape(message)) as caught:
        output_classes(model, data)
    assert "\n" not in str(caught.value)


def test_integer_features_need_a_model_with_an_embedding() -> None:
    """The meta device checks no dtypes (a Linear fed int64 passes there): said before a worker fails."""
    data = DataConfig(path="unused", features={"column": "x", "dtype": "int64", "shape": [64]},
                      label={"column": "y", "dtype": "int64"})
    with pytest.raises(UserError, match=re.escape("data.features.dtype: int64 features are token ids, and model "
                                                  "mlp has no embedding to take them; give a float column")):
        output_classes(ModelConfig(name="mlp", kwargs={}), data)
    data = DataConfig(path="unused", features={"column": "x", "dtype": "float64", "shape": [64]},
                      label={"column": "y", "dtype": "int64"})
    assert output_classes(ModelConfig(name="mlp", kwargs={}), data) == 10  # float64 columns arrive as float32


@pytest.mark.parametrize("features", [{"dtype": "float32", "shape": [1, 8, 8]}, {"dtype": "float32"}])
def test_language_modelling_needs_one_sequence_of_token_ids(features: dict) -> None:
    """`label: null` on digits' float pixels passed validate; every worker then crashed on a 0-channel input."""
    data = DataConfig(path="unused", features={"column": "x", **features}, label=None)
    with pytest.raises(UserError, match=r"^data\.label: null means language modelling, which needs one sequence "
                                        r"of integer token ids per row; data\.features is float32"):
        output_classes(CNN, data)


def test_features_of_no_configured_shape_are_not_checked() -> None:
    data = DataConfig(path="unused", features={"column": "x", "dtype": "float32"},
                      label={"column": "y", "dtype": "int64"})
    assert output_classes(CNN, data) is None


def test_labels_within_the_classes_pass(tmp_path: Path) -> None:
    assert check_fit(CNN, digits_like(tmp_path / "ok", [0, 9, 3, 3])) == 4


@pytest.mark.parametrize(("labels", "says"), [([0, 10, 3], "labels 0..10"), ([-1, 2], "labels -1..2"),
                                              ([10**12], "labels 1000000000000..1000000000000")])
def test_labels_outside_the_classes_are_refused_naming_the_file(tmp_path: Path, labels: list[int], says: str) -> None:
    data = digits_like(tmp_path / "bad", labels)
    with pytest.raises(UserError, match=re.escape(f"data.label: column 'label' holds {says} in "
                                                  f"{tmp_path / 'bad' / 'part-0.parquet'}, but model cnn predicts "
                                                  "10 classes: they must be 0..9")):
        check_fit(CNN, data)


def test_null_labels_and_null_features_are_refused(tmp_path: Path) -> None:
    refused = r"column '{}' holds null \(or empty\) values in .*; fill or drop those rows"
    with pytest.raises(UserError, match="data.label: " + refused.format("label")):
        check_fit(CNN, digits_like(tmp_path / "a", [1, None]))
    with pytest.raises(UserError, match="data.features: " + refused.format("pixels")):
        check_fit(CNN, digits_like(tmp_path / "b", [1, 2], pixels=[[0.5] * 64, None]))


def test_a_file_written_without_statistics_is_not_checked(tmp_path: Path) -> None:
    assert check_fit(CNN, digits_like(tmp_path / "plain", [0, 10], write_statistics=False)) == 2


def test_token_ids_beyond_the_vocabulary_are_refused(tmp_path: Path) -> None:
    (tmp_path / "tokens").mkdir()
    tokens = pa.array([list(range(200, 233))] * 3, type=pa.list_(pa.int64()))
    pq.write_table(pa.table({"tokens": tokens}), tmp_path / "tokens" / "part-0.parquet")
    data = DataConfig(path=str(tmp_path / "tokens"), features={"column": "tokens", "dtype": "int64", "shape": [33]})
    assert check_fit(ModelConfig(name="gpt", kwargs={"vocab_size": 256, "context": 32}), data) == 3
    with pytest.raises(UserError, match=r"data.features: column 'tokens' holds token ids 200..232 in .*, but model "
                                        r"gpt predicts 128 classes: they must be 0..127"):
        check_fit(ModelConfig(name="gpt", kwargs={"vocab_size": 128, "context": 32}), data)


def validate_on(tmp_path: Path, labels: list[int], *, data: dict | None = None,
                training: dict | None = None) -> subprocess.CompletedProcess:
    """`orchestrator validate` of the digits job on a local copy with these labels."""
    digits_like(tmp_path / "data", labels)
    config = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    config["data"] = {**config["data"], "path": str(tmp_path / "data"), **(data or {})}
    config["training"] = {**config["training"], **(training or {})}
    del config["data"]["dataset"]
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "orchestrator", "validate", str(tmp_path / "job.yaml")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)


def test_validate_refuses_labels_beyond_the_model_in_one_line(tmp_path: Path) -> None:
    out = validate_on(tmp_path, [0, 1, 12])
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("error: data.label: column 'label' holds labels 0..12 in ")


@pytest.mark.parametrize(("share", "message"), [
    (0.0, None),  # every row trains: `run`'s own message
    (0.2, "training.global_batch_size: 11 is larger than all 10 rows (the training rows are fewer: "
          "data.val_fraction is 0.2)"),
])
def test_validate_refuses_a_global_batch_larger_than_the_local_rows(share: float, message: str | None,
                                                                    tmp_path: Path) -> None:
    """`validate` said ok; only `run` refused it, once Ray had started."""
    if message is None:
        with pytest.raises(UserError) as run_says:
            steps_per_epoch(10, 11)
        message = str(run_says.value)
    out = validate_on(tmp_path, list(range(10)), data={"val_fraction": share}, training={"global_batch_size": 11})
    assert out.returncode == 2 and out.stderr == f"error: {message}\n", out.stderr


def test_a_batch_past_the_training_rows_a_split_leaves_on_average_is_a_note() -> None:
    """The split's exact count hashes every row (`run` makes it); the footers give all rows only."""
    digits = ROOT / "configs" / "digits.yaml"  # data.val_fraction 0.2
    at = {b: check_batch_fits(load_config(digits, [f"training.global_batch_size={b}"]), 1000) for b in (800, 801)}
    assert at[800] is None
    assert at[801] == ("note: training.global_batch_size: 801 is more than the ~800 training rows that "
                       "data.val_fraction 0.2 leaves of 1000 on average; `run` counts them and refuses a batch "
                       "larger than those")


@pytest.mark.parametrize(("kwargs", "shape"), [({"width": 10**12}, [1, 8, 8]), ({"width": 10**22}, [1, 8, 8]),
                                               ({"num_classes": 10**20}, [1, 8, 8]), ({"width": 10**12}, None)])
def test_model_sizes_torch_cannot_hold_are_one_line(kwargs: dict, shape: list[int] | None) -> None:
    """Storage size calculation overflowed (RuntimeError), Overflow when unpacking long long (TypeError):
    both were tracebacks from `validate`, also with no shape configured."""
    data = DataConfig(path="unused", features={"column": "x", "dtype": "float32", "shape": shape},
                      label={"column": "y", "dtype": "int64"})
    with pytest.raises(UserError, match=r"^model\.kwargs: model cnn cannot be built with \{.*\}: \S") as caught:
        output_classes(ModelConfig(name="cnn", kwargs=kwargs), data)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("shape", [[1, 10**11, 10**11], [1, 10**20, 8]])
def test_feature_shapes_torch_cannot_hold_are_one_line(shape: list[int]) -> None:
    data = DataConfig(path="unused", features={"column": "x", "dtype": "float32", "shape": shape},
                      label={"column": "y", "dtype": "int64"})
    with pytest.raises(UserError, match=re.escape(f"data.features.shape: {shape} is no tensor shape torch can hold: ")):
        output_classes(CNN, data)


def test_validate_of_a_data_set_not_there_yet_refuses_a_huge_shape_in_one_line(tmp_path: Path) -> None:
    """The built-in set is not prepared: only the meta pass runs, and its overflow was a traceback."""
    out = subprocess.run([sys.executable, "-m", "orchestrator", "validate", str(ROOT / "configs" / "digits.yaml"),
                          "--set", f"data.path={tmp_path / 'nothere'}", "--set", f"data.features.shape=[1,{10**20},8]"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(f"error: data.features.shape: [1, {10**20}, 8] is no tensor shape torch can hold: ")
