"""Built-in data sets, looked up by ``data.dataset`` and written as Parquet into ``data.path``.

Each is split over several ``part-NNNN.parquet`` files so Ray Data can read them in parallel
and hand different files to different workers. Rows are written in a fixed, shuffled order:
the trainer takes its validation split from the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sysconfig
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trainers.errors import UserError, shown
from trainers.registry import Registry, bind_kwargs, call_with_kwargs

DATASETS: Registry[Callable[..., Path]] = Registry(kind="data set", field="data.dataset")

# Enough files for 8 readers; the cap keeps each file (and each synthetic chunk) a few hundred MB.
_MIN_FILES = 8
_MAX_ROWS_PER_FILE = 16_384
_CHUNK_ROWS = 1_024
# A synthetic data set is checked before its first row is written: one chunk stays this small in
# memory (and under Arrow's int32 list offsets), the class patterns too, and the whole set must
# fit in the free space where it goes.
_CHUNK_BYTES = 64 << 20
_MAX_PATTERN_BYTES = 1 << 30
# Beside the Parquet files, what they were prepared with (hidden: Ray Data and Arrow skip it).
PREPARED_WITH = ".prepared.json"
# Third-party code differs from machine to machine; the corpus must not.
_CORPUS_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def prepare_dataset(name: str, out_dir: str | Path, /, **kwargs: Any) -> Path:
    """Write built-in data set ``name`` into ``out_dir`` (created); returns the folder."""
    prepare = DATASETS.get(name)
    out_dir = Path(out_dir)
    if _has_parquet(out_dir):
        raise UserError(f"data.path: {out_dir} already holds Parquet files; remove them first")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"data.path: {out_dir} is not a folder")
    try:
        written = call_with_kwargs(prepare, kwargs, field="data.dataset_kwargs", args=(out_dir,))
        (out_dir / PREPARED_WITH).write_text(
            json.dumps({"dataset": name, "options": _options(name, kwargs)}, default=str) + "\n")
    except OSError as exc:  # a read-only or missing place, a full disk
        raise UserError(f"data.path: cannot write {out_dir} ({exc.strerror or exc})") from None
    return written


def check_dataset_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """The options `prepare_dataset(name, ..., **kwargs)` would be given are ones it takes (validate)."""
    bind_kwargs(DATASETS.get(name), kwargs, field="data.dataset_kwargs", args=(Path(),))


def ensure_prepared(name: str, path: str | Path, /, **kwargs: Any) -> Path:
    """Prepare ``name`` into ``path`` unless Parquet is already there.

    Writes into a hidden sibling folder and renames it into place, so a crash never leaves
    half a data set that a later run would take as complete.
    """
    check_dataset_kwargs(name, kwargs)  # a mistyped option too, though only a first run prepares the set
    path = Path(path)
    if _has_parquet(path):
        _check_prepared_as(path, name, kwargs)
        return path
    if path.is_dir() and any(path.iterdir()):
        raise UserError(f"data.path: {path} is not empty but holds no Parquet files")
    if path.exists() and not path.is_dir():
        raise UserError(f"data.path: {path} is neither a Parquet file nor a folder")
    # Not tempfile.mkdtemp: its 0700 mode would stay on the renamed folder.
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise UserError(f"data.path: cannot write {path} ({exc.strerror or exc})") from None
    try:
        prepare_dataset(name, tmp, **kwargs)
        _move_into_place(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _check_prepared_as(path, name, kwargs)  # another process finished first: its copy, if prepared as this one
    return path


def _options(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Every option `name` is prepared with, its defaults filled in (so `seed: 0` matches no seed)."""
    bound = bind_kwargs(DATASETS.get(name), kwargs, field="data.dataset_kwargs", args=(Path(),))
    bound.apply_defaults()
    return dict(list(bound.arguments.items())[1:])


def _check_prepared_as(path: Path, name: str, kwargs: dict[str, Any]) -> None:
    """A folder prepared by another data set or other options is refused: it was taken as is, so a
    changed `dataset_kwargs` (more rows, another seed) trained on the old rows without a word. A
    folder without the note (the user's own Parquet, or prepared before it was kept) is taken."""
    try:
        was = json.loads((path / PREPARED_WITH).read_text())
        was_name, was_options = str(was["dataset"]), dict(was["options"])
    except (OSError, ValueError, TypeError, KeyError):
        return
    fix = "remove the folder to prepare it again, or give data.path another folder"
    if was_name != name:
        raise UserError(f"data.dataset: {path} holds the {was_name!r} data set, not {name!r}; {fix}")
    # As JSON keeps them: a tuple reads back as a list, an int key as a string.
    options = json.loads(json.dumps(_options(name, kwargs), default=str))
    changed = [key for key in sorted(set(options) | set(was_options)) if options.get(key) != was_options.get(key)]
    if changed:
        said = ", ".join(f"{key}={shown(was_options.get(key))} (the config says {shown(options.get(key))})"
                         for key in changed)
        raise UserError(f"data.dataset_kwargs: {path} was prepared with {said}; {fix}")


def _move_into_place(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)  # atomic; succeeds over a missing or empty folder
    except OSError:
        # Another process (a second worker, a second run) finished first: use its copy.
        if not _has_parquet(path):
            raise


def _has_parquet(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".parquet"
    return path.is_dir() and any(path.rglob("*.parquet"))


def _require_positive(**values: int) -> None:
    for key, value in values.items():
        if value <= 0:
            raise UserError(f"data.dataset_kwargs.{key}: must be > 0, got {value}")


def _require_seed(seed: int) -> None:
    if seed < 0:  # numpy's generators take no negative seed
        raise UserError(f"data.dataset_kwargs.seed: must be >= 0, got {seed}")


# ---------------------------------------------------------------------------------------------
# Writing


def _file_ranges(rows: int) -> list[range]:
    """Contiguous, non-empty row ranges, one per output file."""
    files = min(rows, max(_MIN_FILES, math.ceil(rows / _MAX_ROWS_PER_FILE)))
    bounds = [rows * i // files for i in range(files + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def _write_parts(out_dir: Path, parts: Iterable[Iterable[pa.Table]]) -> Path:
    """Write each part (an iterable of same-schema tables) to its own ``part-NNNN.parquet``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, chunks in enumerate(parts):
        writer: pq.ParquetWriter | None = None
        try:
            for table in chunks:
                path = out_dir / f"part-{i:04d}.parquet"
                writer = writer or pq.ParquetWriter(path, table.schema)
                writer.write_table(table)
        finally:
            if writer is not None:
                writer.close()
    return out_dir


def _write_table(out_dir: Path, table: pa.Table) -> Path:
    ranges = _file_ranges(table.num_rows)
    return _write_parts(out_dir, ([table.slice(r.start, len(r))] for r in ranges))


def _list_column(values: np.ndarray) -> pa.ListArray:
    """A 2-D array ``[rows, n]`` as a ``list<...>`` column of length-n lists, without copying."""
    rows, n = values.shape
    offsets = pa.array(np.arange(0, rows * n + 1, n, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1)))


# ---------------------------------------------------------------------------------------------
# The data sets


@DATASETS.register("digits")
def digits(out_dir: Path, *, seed: int = 0) -> Path:
    """scikit-learn's 1,797 8x8 digits: ``pixels`` list<float32>[64] in [0, 1], ``label`` int64."""
    _require_seed(seed)
    from sklearn.datasets import load_digits  # bundled with scikit-learn; no download

    bunch = load_digits()
    order = np.random.default_rng(seed).permutation(len(bunch.target))
    pixels = (bunch.data[order] / 16.0).astype(np.float32)
    labels = bunch.target[order].astype(np.int64)
    table = pa.table({"pixels": _list_column(pixels), "label": pa.array(labels)})
    return _write_table(out_dir, table)


@DATASETS.register("synthetic")
def synthetic(
    out_dir: Path,
    *,
    rows: int = 4096,
    channels: int = 3,
    size: int = 32,
    num_classes: int = 10,
    seed: int = 0,
) -> Path:
    """Random images for throughput work: ``image`` list<float32>[C*H*W], ``label`` int64.

    Each class has its own smooth mean pattern under unit noise, so models can learn it.
    """
    _require_positive(rows=rows, channels=channels, size=size, num_classes=num_classes)
    _require_seed(seed)
    row_bytes = 4 * channels * size * size
    _check_synthetic_fits(out_dir, rows, row_bytes, num_classes, f"{channels}x{size}x{size}")
    chunk_rows = max(1, min(_CHUNK_ROWS, _CHUNK_BYTES // row_bytes))
    ranges = _file_ranges(rows)
    pattern_seed, *file_seeds = np.random.SeedSequence(seed).spawn(len(ranges) + 1)
    patterns = _class_patterns(np.random.default_rng(pattern_seed), num_classes, channels, size)
    parts = (
        _synthetic_chunks(np.random.default_rng(s), patterns, len(r), chunk_rows)
        for s, r in zip(file_seeds, ranges)
    )
    return _write_parts(out_dir, parts)


def _class_patterns(
    rng: np.random.Generator, classes: int, channels: int, size: int
) -> np.ndarray:
    # A coarse 4x4 grid per class and channel, upsampled: structure a conv net can pick up.
    coarse = rng.standard_normal((classes, channels, 4, 4), dtype=np.float32)
    index = np.arange(size) * 4 // size
    return coarse[:, :, index][:, :, :, index].reshape(classes, -1)


def _check_synthetic_fits(
    out_dir: Path, rows: int, row_bytes: int, classes: int, shape: str
) -> None:
    if row_bytes > _CHUNK_BYTES:
        raise UserError(
            f"data.dataset_kwargs.size: one {shape} image is {_bytes(row_bytes)}; "
            f"at most {_bytes(_CHUNK_BYTES)} per row"
        )
    if classes * row_bytes > _MAX_PATTERN_BYTES:
        raise UserError(
            f"data.dataset_kwargs.num_classes: {classes:,} class patterns of {shape} need "
            f"{_bytes(classes * row_bytes)} of memory; at most {_bytes(_MAX_PATTERN_BYTES)}"
        )
    need = rows * (row_bytes + 8)
    place = next(p for p in (out_dir, *out_dir.absolute().parents) if p.exists())
    try:
        free = shutil.disk_usage(place).free
    except OSError:
        return  # not a place one can ask; writing says what is wrong
    if need > free:
        raise UserError(
            f"data.dataset_kwargs.rows: {rows:,} rows of {shape} images need about "
            f"{_bytes(need)}, but {place} has {_bytes(free)} free"
        )


def _bytes(n: int) -> str:
    if n < 1024:
        return f"{n:,} bytes"
    size = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024:
            return f"{size:,.1f} {unit}"
    return f"{size / 1024:,.1f} TiB"


def _synthetic_chunks(
    rng: np.random.Generator, patterns: np.ndarray, rows: int, chunk_rows: int
) -> Iterator[pa.Table]:
    for start in range(0, rows, chunk_rows):
        n = min(chunk_rows, rows - start)
        labels = rng.integers(0, len(patterns), n)
        images = patterns[labels] + rng.standard_normal((n, patterns.shape[1]), dtype=np.float32)
        yield pa.table({"image": _list_column(images), "label": pa.array(labels, pa.int64())})


@DATASETS.register("corpus")
def corpus(
    out_dir: Path, *, seq_len: int = 128, max_bytes: int = 8_000_000, seed: int = 0
) -> Path:
    """Byte-level language modelling on the Python standard library's own source.

    ``tokens`` list<int64>[seq_len + 1]: non-overlapping windows of bytes (vocabulary 256),
    one token longer than the context so inputs and shifted targets come from one row.
    """
    _require_positive(seq_len=seq_len, max_bytes=max_bytes)
    _require_seed(seed)
    text = _stdlib_source(max_bytes)
    windows = len(text) // (seq_len + 1)
    if windows == 0:
        raise UserError(
            f"data.dataset_kwargs.seq_len: {seq_len} is longer than the {len(text)} bytes read; "
            "lower seq_len or raise max_bytes"
        )
    tokens = np.frombuffer(text, dtype=np.uint8)[: windows * (seq_len + 1)]
    tokens = tokens.astype(np.int64).reshape(windows, seq_len + 1)
    tokens = tokens[np.random.default_rng(seed).permutation(windows)]
    return _write_table(out_dir, pa.table({"tokens": _list_column(tokens)}))


def _stdlib_source(max_bytes: int) -> bytes:
    """Up to ``max_bytes`` of the stdlib's ``.py`` files, concatenated in sorted path order."""
    chunks: list[bytes] = []
    total = 0
    for file in _stdlib_files(Path(sysconfig.get_paths()["stdlib"])):
        data = file.read_bytes()[: max_bytes - total]
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return b"".join(chunks)


def _stdlib_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _CORPUS_SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name
