"""Built-in data sets and the Parquet column check."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from orchestrator.config import ColumnConfig
from orchestrator.errors import UserError
from trainers.data import DATASETS, check_columns, ensure_prepared, prepare_dataset

PIXELS = ColumnConfig(column="pixels", dtype="float32", shape=[1, 8, 8])
LABEL = ColumnConfig(column="label", dtype="int64")


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_dataset("digits", tmp_path_factory.mktemp("data") / "digits")


def _read(path: Path) -> pa.Table:
    return pads.dataset(path, format="parquet").to_table()


def test_registry_lists_data_sets() -> None:
    assert DATASETS.names() == ["corpus", "digits", "synthetic"]
    with pytest.raises(UserError, match="data.dataset: unknown data set 'mnist'; available: cor"):
        prepare_dataset("mnist", "unused")


def test_digits(digits_dir: Path) -> None:
    assert len(list(digits_dir.glob("part-*.parquet"))) > 1
    table = _read(digits_dir)
    assert table.schema.field("pixels").type == pa.list_(pa.float32())
    assert table.schema.field("label").type == pa.int64()
    pixels = np.stack(table["pixels"].to_numpy(zero_copy_only=False))
    assert pixels.shape == (1797, 64)
    assert 0.0 <= pixels.min() and pixels.max() == 1.0
    # Shuffled: the last 20 % (the validation split) holds every class.
    assert set(table["label"].to_numpy()[-360:]) == set(range(10))


def test_synthetic_is_deterministic_and_learnable(tmp_path: Path) -> None:
    kwargs = {"rows": 300, "channels": 2, "size": 4, "num_classes": 3, "seed": 1}
    first = _read(prepare_dataset("synthetic", tmp_path / "a", **kwargs))
    assert first.schema.field("image").type == pa.list_(pa.float32())
    assert first.schema.field("label").type == pa.int64()
    assert first.num_rows == 300
    assert first.equals(_read(prepare_dataset("synthetic", tmp_path / "b", **kwargs)))
    images = np.stack(first["image"].to_numpy(zero_copy_only=False))
    labels = first["label"].to_numpy()
    assert images.shape == (300, 2 * 4 * 4)
    means = np.stack([images[labels == c].mean(axis=0) for c in range(3)])
    assert np.abs(means[0] - means[1]).max() > 0.5  # classes differ beyond the noise


def test_corpus(tmp_path: Path) -> None:
    table = _read(prepare_dataset("corpus", tmp_path / "c", seq_len=16, max_bytes=10_000))
    assert table.schema.field("tokens").type == pa.list_(pa.int64())
    tokens = np.stack(table["tokens"].to_numpy(zero_copy_only=False))
    assert tokens.shape == (10_000 // 17, 17)
    assert 0 <= tokens.min() and tokens.max() < 256


def test_bad_dataset_kwargs(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="data.dataset_kwargs: synthetic.. got an unexpected"):
        prepare_dataset("synthetic", tmp_path / "s", row=10)
    with pytest.raises(UserError, match="data.dataset_kwargs.rows: must be > 0, got 0"):
        prepare_dataset("synthetic", tmp_path / "s", rows=0)
    with pytest.raises(UserError, match="data.dataset_kwargs.seq_len"):
        prepare_dataset("corpus", tmp_path / "c", seq_len=100, max_bytes=50)
    for name in ("digits", "synthetic", "corpus"):
        with pytest.raises(UserError, match=r"^data.dataset_kwargs.seed: must be >= 0, got -1$"):
            prepare_dataset(name, tmp_path / name, seed=-1)


def test_synthetic_too_big_is_refused_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "s"
    with pytest.raises(UserError, match=r"^data.dataset_kwargs.rows: 1,000,000,000,000 rows of 3x32x32 images need about .* free$"):
        prepare_dataset("synthetic", out, rows=10**12)
    with pytest.raises(UserError, match=r"^data.dataset_kwargs.size: one 3x100000x100000 image is 111.8 GiB"):
        prepare_dataset("synthetic", out, size=100_000)
    with pytest.raises(UserError, match=r"^data.dataset_kwargs.num_classes: 1,000,000 class patterns"):
        prepare_dataset("synthetic", out, num_classes=10**6)
    assert list(tmp_path.iterdir()) == []


def test_synthetic_large_images_are_written_in_small_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trainers.data.datasets as datasets

    monkeypatch.setattr(datasets, "_CHUNK_BYTES", 3 * 4 * 3 * 4 * 4)  # three 3x4x4 rows
    table = _read(prepare_dataset("synthetic", tmp_path / "s", rows=64, size=4))
    assert table.num_rows == 64  # 8 files of 8 rows, each written 3 rows at a time
    assert {len(row) for row in table["image"].to_pylist()} == {48}
    assert max(batch.num_rows for batch in table.to_batches()) <= 3


def test_prepare_refuses_to_overwrite(digits_dir: Path) -> None:
    with pytest.raises(UserError, match="already holds Parquet"):
        prepare_dataset("digits", digits_dir)


def test_ensure_prepared_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "syn"
    assert ensure_prepared("synthetic", path, rows=20, size=2) == path
    stamps = {p: p.stat().st_mtime_ns for p in path.iterdir()}
    ensure_prepared("synthetic", path, rows=20, size=2)
    assert {p: p.stat().st_mtime_ns for p in path.iterdir()} == stamps
    assert [p.name for p in path.parent.iterdir()] == ["syn"]  # no temp folder left behind


def test_ensure_prepared_leaves_nothing_on_failure(tmp_path: Path) -> None:
    with pytest.raises(UserError):
        ensure_prepared("synthetic", tmp_path / "syn", rows=-1)
    assert list(tmp_path.iterdir()) == []


def test_ensure_prepared_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty but holds no Parquet"):
        ensure_prepared("digits", tmp_path)


# ---------------------------------------------------------------------------------------------
# check_columns


def test_check_columns_counts_rows(digits_dir: Path) -> None:
    assert check_columns([str(digits_dir)], PIXELS, LABEL) == 1797
    files = sorted(str(p) for p in digits_dir.glob("*.parquet"))[:2]
    expected = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    assert check_columns(files, PIXELS, None) == expected


@pytest.mark.parametrize("uri", ["ftp://host/data", "bogus://x/y"])
def test_a_uri_no_filesystem_reads_is_one_line_naming_data_path(uri: str) -> None:
    """`validate --set data.path=ftp://...` ended in a 59-line ArrowInvalid traceback (exit 1)."""
    with pytest.raises(UserError, match=rf"^data\.path: {uri}: Unrecognized filesystem type"):
        check_columns([uri], PIXELS, LABEL)


def test_missing_column(digits_dir: Path) -> None:
    features = ColumnConfig(column="image", dtype="float32")
    with pytest.raises(UserError) as info:
        check_columns([str(digits_dir)], features, LABEL)
    assert str(info.value) == (
        f"data.features.column: column 'image' not found in {digits_dir} (columns: pixels, label)"
    )
    with pytest.raises(UserError, match="data.label.column: column 'y' not found"):
        check_columns([str(digits_dir)], PIXELS, ColumnConfig(column="y", dtype="int64"))


def test_wrong_dtypes(digits_dir: Path) -> None:
    features = ColumnConfig(column="pixels", dtype="float64")
    with pytest.raises(UserError) as info:
        check_columns([str(digits_dir)], features, LABEL)
    assert str(info.value) == (
        "data.features.dtype: column 'pixels' holds list<float32>, "
        "expected list<float64> or float64"
    )
    label = ColumnConfig(column="label", dtype="int32")
    with pytest.raises(UserError, match="data.label.dtype: column 'label' holds int64, expected"):
        check_columns([str(digits_dir)], PIXELS, label)
    with pytest.raises(UserError, match="data.label.dtype: column 'pixels' holds list<float32>"):
        check_columns([str(digits_dir)], PIXELS, ColumnConfig(column="pixels", dtype="float32"))


def test_wrong_shape(digits_dir: Path) -> None:
    features = ColumnConfig(column="pixels", dtype="float32", shape=[3, 8, 8])
    with pytest.raises(UserError, match=r"data.features.shape: \[3, 8, 8\] holds 192 .* has 64"):
        check_columns([str(digits_dir)], features, LABEL)


def test_fixed_size_list_and_scalar_features(tmp_path: Path) -> None:
    values = pa.array(np.zeros(12, dtype=np.float32))
    table = pa.table(
        {"x": pa.FixedSizeListArray.from_arrays(values, 4), "s": pa.array([1.0, 2.0, 3.0])}
    )
    pq.write_table(table, tmp_path / "t.parquet")
    square = ColumnConfig(column="x", dtype="float32", shape=[2, 2])
    assert check_columns([str(tmp_path)], square, None) == 3
    scalar = ColumnConfig(column="s", dtype="float64")
    assert check_columns([str(tmp_path / "t.parquet")], scalar, None) == 3
    with pytest.raises(UserError, match="data.features.shape"):
        check_columns([str(tmp_path)], ColumnConfig(column="x", dtype="float32", shape=[5]), None)


def test_missing_or_empty_path(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=f"data.path: {tmp_path / 'nope'} not found"):
        check_columns([str(tmp_path / "nope")], PIXELS, LABEL)
    (tmp_path / "_hidden.parquet").write_bytes(b"")
    with pytest.raises(UserError, match="data.path: no Parquet files found in"):
        check_columns([str(tmp_path)], PIXELS, LABEL)


def test_a_path_that_is_no_parquet_data_is_one_line(tmp_path: Path) -> None:
    text = tmp_path / "notes.parquet"
    text.write_text("hello\n")
    with pytest.raises(UserError, match=rf"^data\.path: {text} is not a readable Parquet data set \(.*\)$"):
        check_columns([str(text)], PIXELS, LABEL)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it would block
    for path in (fifo, Path("/dev/zero")):
        with pytest.raises(UserError, match=rf"^data\.path: {path} is neither a Parquet file nor a folder of them$"):
            check_columns([str(path)], PIXELS, LABEL)


def test_the_files_checked_are_the_files_ray_data_reads(digits_dir: Path, tmp_path: Path) -> None:
    # Ray Data reads *.PARQUET too and skips only a first part below data.path starting with "." or
    # "_"; it reads no file given by another name, and its listing fails on a FIFO (FileType.UNKNOWN).
    data = tmp_path / "data"
    data.mkdir()
    one = next(digits_dir.glob("*.parquet"))
    rows = pq.read_metadata(one).num_rows
    (data / "a.parquet").write_bytes(one.read_bytes())
    (data / "B.PARQUET").write_bytes(one.read_bytes())
    (data / "_SUCCESS").write_bytes(b"")
    os.mkfifo(data / ".pipe")
    (data / "_temporary" / "0").mkdir(parents=True)
    (data / "_temporary" / "0" / "part.parquet").write_bytes(b"half")
    assert check_columns([str(data)], PIXELS, LABEL) == 2 * rows
    (data / "day=1" / "_temporary").mkdir(parents=True)
    (data / "day=1" / "_temporary" / "part.parquet").write_bytes(b"half")  # an unfinished write Ray Data reads
    with pytest.raises(UserError, match=rf"^data\.path: {data}/day=1/_temporary/part\.parquet is not a readable"):
        check_columns([str(data)], PIXELS, LABEL)
    (data / "day=1" / "_temporary" / "part.parquet").unlink()
    os.mkfifo(data / "day=1" / "pipe")
    with pytest.raises(UserError, match=rf"^data\.path: {data}/day=1/pipe is neither a file nor a folder \(a FIFO"):
        check_columns([str(data)], PIXELS, LABEL)
    renamed = tmp_path / "digits.dat"
    renamed.write_bytes(one.read_bytes())
    with pytest.raises(UserError, match=rf"^data\.path: {renamed} is not named \*\.parquet, and Ray Data reads only"):
        check_columns([str(renamed)], PIXELS, LABEL)


def test_run_reads_the_files_own_columns_as_validate_checks_them(
    digits_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray Data's default hive partitioning put a key=value folder's value over the files' own column
    of that name: under /data/label=7/ every label trained as 7 (a value no number failed every
    worker), while validate checked the files' own labels (as Ray Data's own reader shows)."""
    import shutil

    import ray.data

    from orchestrator.config import load_config
    from orchestrator.driver import data

    folder = tmp_path / "label=7" / "digits"
    shutil.copytree(digits_dir, folder)
    config = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"
    job = load_config(config, ["data.dataset=null", f"data.path={folder}", "data.val_fraction=0"])
    read: dict = {}
    monkeypatch.setattr(ray.data, "read_parquet", lambda paths, **kwargs: read.update(paths=paths, **kwargs) or "ds")
    assert data.load_datasets(job).train == "ds"
    assert read == {"paths": [str(folder)], "partitioning": None}


def test_linked_folders_are_read_but_a_link_loop_or_a_huge_tree_is_one_line(
    digits_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trainers.data.schema as schema

    data = tmp_path / "data"
    data.mkdir()
    (data / "digits").symlink_to(digits_dir)  # a data set kept elsewhere, linked in
    assert check_columns([str(data)], PIXELS, LABEL) == 1797
    (data / "_logs").mkdir()
    (data / "_logs" / "old.parquet").write_bytes(b"")  # hidden from readers
    assert check_columns([str(data)], PIXELS, LABEL) == 1797
    (data / "_logs" / "here").symlink_to("..")  # as Debian's /usr/bin/X11 -> .: pyarrow's listing never ends
    with pytest.raises(UserError, match=rf"^data\.path: {data} loops through a symbolic link at {data / '_logs/here'}$"):
        check_columns([str(data)], PIXELS, LABEL)
    (data / "_logs" / "here").unlink()
    monkeypatch.setattr(schema, "MAX_LISTED", 5)  # the digits folder holds 8 files
    with pytest.raises(UserError, match=rf"^data\.path: {data} holds more than 5 files and folders; point it at"):
        check_columns([str(data)], PIXELS, LABEL)


def test_preparing_into_a_place_that_is_no_folder_is_one_line(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    with pytest.raises(UserError, match=rf"^data\.path: {text} is not a folder$"):
        prepare_dataset("digits", text)
    with pytest.raises(UserError, match=rf"^data\.path: {text} is neither a Parquet file nor a folder$"):
        ensure_prepared("digits", text)
    for prepare in (prepare_dataset, ensure_prepared):
        with pytest.raises(UserError, match=r"^data\.path: cannot write /proc/orchestrator-test/digits \(.+\)$"):
            prepare("digits", "/proc/orchestrator-test/digits")
    assert text.read_text() == "hello\n"  # nothing written over it


def test_validate_checks_the_options_a_built_in_set_would_be_prepared_with(tmp_path: Path) -> None:
    """`validate` said ok to `dataset_kwargs.bogus` while the data was not there yet; the first run
    then failed preparing it."""

    from trainers.data.datasets import check_dataset_kwargs

    check_dataset_kwargs("digits", {"seed": 3})
    with pytest.raises(UserError, match=r"^data\.dataset_kwargs: digits\(\) got an unexpected keyword argument 'bogus'"):
        check_dataset_kwargs("digits", {"bogus": 1})
    with pytest.raises(UserError, match=r"^data\.dataset_kwargs\.seed: must be int, got 'x'"):
        check_dataset_kwargs("digits", {"seed": "x"})
    _validate_refuses_a_bogus_option(tmp_path / "new")


def _validate_refuses_a_bogus_option(data_path: Path) -> None:
    """`orchestrator validate` of the digits config with `data.dataset_kwargs.bogus` over `data_path`."""
    import subprocess
    import sys

    config = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "validate", str(config), "--set",
                           f"data.path={data_path}", "--set", "data.dataset_kwargs.bogus=1"],
                          capture_output=True, text=True, timeout=120, cwd=data_path.parent)
    assert proc.returncode == 2 and proc.stderr.startswith("error: data.dataset_kwargs: digits() got an unexpected")


def test_a_mistyped_option_of_a_set_already_prepared_is_refused(tmp_path: Path) -> None:
    """`run` and `validate` took `dataset_kwargs.bogus` without a word once the data was there (only
    a first run prepares it, so the option was dropped)."""

    from trainers.data import ensure_prepared

    ensure_prepared("digits", tmp_path / "d")
    with pytest.raises(UserError, match=r"^data\.dataset_kwargs: digits\(\) got an unexpected keyword argument 'bogus'"):
        ensure_prepared("digits", tmp_path / "d", bogus=1)
    _validate_refuses_a_bogus_option(tmp_path / "d")


def test_a_set_prepared_with_other_options_is_refused_naming_them(tmp_path: Path) -> None:
    """A changed `dataset_kwargs` (or data set) over a prepared folder trained on the old rows
    without a word: the folder was taken as it was. It is refused, the folder left as it was."""
    path = tmp_path / "syn"
    ensure_prepared("synthetic", path, rows=20, size=2)
    stamps = {p: p.stat().st_mtime_ns for p in path.iterdir()}
    ensure_prepared("synthetic", path, rows=20, size=2, seed=0)  # the default, given: the same set
    with pytest.raises(UserError, match=rf"^data\.dataset_kwargs: {path} was prepared with rows=20 \(the config "
                                        r"says 40\); remove the folder to prepare it again, or give data\.path "):
        ensure_prepared("synthetic", path, rows=40, size=2)
    with pytest.raises(UserError, match=rf"^data\.dataset: {path} holds the 'synthetic' data set, not 'digits'; "):
        ensure_prepared("digits", path)
    assert {p: p.stat().st_mtime_ns for p in path.iterdir()} == stamps
    assert _read(path).num_rows == 20  # the note beside the files is not read as data


def test_parquet_prepared_elsewhere_is_taken_as_it_is(tmp_path: Path) -> None:
    """A folder without the note (the user's own Parquet, or one prepared by an older version)."""
    path = tmp_path / "syn"
    ensure_prepared("synthetic", path, rows=20, size=2)
    (path / ".prepared.json").unlink()
    assert ensure_prepared("synthetic", path, rows=40, size=2) == path


def test_a_set_another_process_prepared_first_with_other_options_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two jobs preparing one folder: the one that lost the race took the winner's copy as it was,
    rows=20 where its config said 40, without a word."""
    import trainers.data.datasets as datasets

    path, prepare = tmp_path / "syn", datasets.prepare_dataset

    def other_process_first(name: str, out_dir: Path, /, **kwargs: object) -> Path:
        prepare(name, path, rows=20, size=2)  # the winner, meanwhile
        return prepare(name, out_dir, **kwargs)

    monkeypatch.setattr(datasets, "prepare_dataset", other_process_first)
    with pytest.raises(UserError, match=r"was prepared with rows=20 \(the config says 40\)"):
        ensure_prepared("synthetic", path, rows=40, size=2)
    assert _read(path).num_rows == 20 and [p.name for p in tmp_path.iterdir()] == ["syn"]
