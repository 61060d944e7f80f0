"""A data set of many Parquet files is checked file by file, from the footers alone: one bad file
among good ones is named in one line before any worker starts. `validate` said "ok ... 40 rows" for
a second file of float labels, of 32 values per row, of string pixels or without the label, and a
corrupt second file was a pyarrow traceback (exit 1)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.errors import UserError
from trainers.compat import check_fit
from trainers.config import ColumnConfig, DataConfig, ModelConfig
from trainers.data import check_columns

ROOT = Path(__file__).resolve().parents[1]
CNN = ModelConfig(name="cnn", kwargs={"in_channels": 1, "num_classes": 10})
PIXELS = ColumnConfig(column="pixels", dtype="float32", shape=[1, 8, 8])
LABEL = ColumnConfig(column="label", dtype="int64")
F32 = pa.float32()


def table(rows: int = 20, **columns: pa.Array | None) -> pa.Table:
    """Digits-like rows: 64 float32 pixels and an int64 label 0..9; a column given None is left out."""
    base = {"pixels": pa.array([list(np.random.rand(64).astype("float32")) for _ in range(rows)], type=pa.list_(F32)),
            "label": pa.array(np.arange(rows) % 10, type=pa.int64())}
    return pa.table({k: v for k, v in {**base, **columns}.items() if v is not None})


def two_files(folder: Path, second: pa.Table, **write: object) -> tuple[DataConfig, Path]:
    """A good first file and `second`; the data config and the second file's path."""
    folder.mkdir(parents=True)
    pq.write_table(table(), folder / "part-0.parquet")
    pq.write_table(second, folder / "part-1.parquet", **write)
    return DataConfig(path=str(folder), features=PIXELS, label=LABEL), folder / "part-1.parquet"


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_an_unreadable_file_among_good_ones_is_named(tmp_path: Path, damage: str) -> None:
    data, bad = two_files(tmp_path / "d", table())
    if damage == "garbage":
        bad.write_bytes(b"PAR1" + b"x" * 100)
    else:
        bad.write_bytes(bad.read_bytes()[:300 if damage == "truncated" else 0])
    with pytest.raises(UserError, match=rf"^data\.path: {bad} is not a readable Parquet file \(.+\)$"):
        check_fit(CNN, data)


@pytest.mark.parametrize(("second", "says"), [
    (table(label=pa.array(np.zeros(20))), "data.label.dtype: column 'label' holds float64 in {bad}, expected int64"),
    (table(label=None), "data.label.column: column 'label' not found in {bad} (columns: pixels)"),
    (table(pixels=None), "data.features.column: column 'pixels' not found in {bad} (columns: label)"),
    (table(pixels=pa.array(["0.5"] * 20)), "data.features.dtype: column 'pixels' holds string in {bad}, expected "
                                            "list<float32> or float32"),
    (table(pixels=pa.array([[0.5] * 32] * 20, type=pa.list_(F32))),
     "data.features.shape: [1, 8, 8] holds 64 values but column 'pixels' has 32 per row in {bad}"),
    (table(pixels=pa.array([[0.5] * 63, [0.5] * 64] * 10, type=pa.list_(F32))),
     "data.features.shape: [1, 8, 8] holds 64 values per row but column 'pixels' has 1270 values in 20 rows in "
     "{bad} (rows of other lengths)"),
    (table(pixels=pa.array([[0.5] * 64] * 20, type=pa.large_list(F32))),
     "data.features.dtype: column 'pixels' holds large_list<element: float> in {bad} but list<element: float> "
     "in {first}; every file needs the same types"),
    (table(pixels=pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(20 * 64, "float32")), 64)),
     "data.features.dtype: column 'pixels' holds fixed_size_list<element: float>[64] in {bad} but list<element: "
     "float> in {first}"),
])
def test_a_file_written_differently_from_the_first_is_named(tmp_path: Path, second: pa.Table, says: str) -> None:
    data, bad = two_files(tmp_path / "d", second)
    with pytest.raises(UserError) as caught:
        check_columns(data.paths, PIXELS, LABEL)
    assert str(caught.value).startswith(says.format(bad=bad, first=bad.with_name("part-0.parquet")))


def test_element_names_and_nullability_may_differ_between_files(tmp_path: Path) -> None:
    """Writers differ there (`item` or `element`, non-null elements or not); a worker reads both."""
    strict = pa.list_(pa.field("item", F32, nullable=False))
    data, _ = two_files(tmp_path / "d", table(pixels=pa.array([[0.5] * 64] * 20, type=strict)))
    assert check_fit(CNN, data) == 40


@pytest.mark.parametrize("statistics", [True, False])
def test_a_null_feature_row_is_said_to_be_null(tmp_path: Path, statistics: bool) -> None:
    """The first row null read as "has 0 per row"; without statistics the count still tells."""
    nulls = pa.array([None] + [[0.5] * 64] * 19, type=pa.list_(F32))
    data, bad = two_files(tmp_path / "d", table(pixels=nulls), write_statistics=statistics)
    says = (f"data.features: column 'pixels' holds null (or empty) values in {bad}; fill or drop those rows"
            if statistics else f"column 'pixels' has 1217 values in 20 rows in {bad} (rows of other lengths)")
    with pytest.raises(UserError) as caught:
        check_columns(data.paths, PIXELS, LABEL)
    assert says in str(caught.value)


def test_the_label_column_is_matched_exactly_not_by_prefix(tmp_path: Path) -> None:
    """`label.x` is another column (its values 5000 are no labels); a map column before the label
    has two leaf columns in the footer, counted from the schema."""
    folder = tmp_path / "d"
    folder.mkdir()
    first = table(**{"label.x": pa.array([5000] * 20),
                     "meta": pa.array([[("k", 5000)]] * 20, type=pa.map_(pa.string(), pa.int64()))})
    pq.write_table(first.select(["meta", "label.x", "pixels", "label"]), folder / "part-0.parquet")
    data = DataConfig(path=str(folder), features=PIXELS, label=LABEL)
    assert check_fit(CNN, data) == 20
    pq.write_table(table(label=pa.array([12] * 20)).select(["pixels", "label"]), folder / "part-1.parquet")
    with pytest.raises(UserError, match=r"data.label: column 'label' holds labels 12..12 in .*part-1.parquet"):
        check_fit(CNN, data)


def test_validate_names_a_corrupt_second_file_in_one_line_exit_2(tmp_path: Path) -> None:
    _, bad = two_files(tmp_path / "data", table())
    bad.write_bytes(bad.read_bytes()[:300])
    out = subprocess.run([sys.executable, "-m", "orchestrator", "validate", str(ROOT / "configs" / "digits.yaml"),
                          "--set", f"data.path={tmp_path / 'data'}"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(f"error: data.path: {bad} is not a readable Parquet file (")


def test_features_of_no_configured_shape_are_checked_as_the_rows_are_stored(tmp_path: Path) -> None:
    """Without data.features.shape, validate ran no model pass and no token range check: tokens past
    the vocabulary, rows longer than the context, a CNN fed flat rows or files of two row lengths
    each said ok, and each failed on every worker once the job ran."""
    gpt = ModelConfig(name="gpt", kwargs={"vocab_size": 256, "context": 16, "n_layer": 1, "n_head": 1, "n_embd": 8})

    def tokens(name: str, high: int, length: int) -> DataConfig:
        (tmp_path / name).mkdir()
        rows = np.random.randint(0, high, (20, length)).astype(np.int64)
        rows[0, 0] = high - 1
        pq.write_table(pa.table({"tokens": pa.array(list(rows), type=pa.list_(pa.int64()))}),
                       tmp_path / name / "part-0.parquet")
        return DataConfig(path=str(tmp_path / name), features={"column": "tokens", "dtype": "int64"}, label=None)

    assert check_fit(gpt, tokens("ok", 256, 9)) == 20
    with pytest.raises(UserError, match=r"^data\.features: column 'tokens' holds token ids \d+\.\.999 in .+, but "
                                        r"model gpt predicts 256 classes"):
        check_fit(gpt, tokens("vocab", 1000, 9))
    with pytest.raises(UserError, match=r"^model\.kwargs\.context: sequence length 39 exceeds context 16"):
        check_fit(gpt, tokens("long", 256, 40))
    flat = DataConfig(path=str(tmp_path / "flat"), features={"column": "pixels", "dtype": "float32"}, label=LABEL)
    _, second = two_files(tmp_path / "flat", table(pixels=pa.array([[0.5] * 32] * 20, type=pa.list_(F32))))
    with pytest.raises(UserError, match=rf"^data\.features\.shape: \[64\] holds 64 values but column 'pixels' has 32 "
                                        rf"per row in {second}$"):
        check_fit(ModelConfig(name="mlp", kwargs={"in_features": 64}), flat)
    second.unlink()
    with pytest.raises(UserError, match=r"^model: cnn with kwargs .+ does not take data\.features \(column 'pixels', "
                                        r"float32, shape \[64\]\): Expected 3D \(unbatched\) or 4D"):
        check_fit(CNN, flat)
