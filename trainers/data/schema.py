"""Check the configured columns against the Parquet files before any worker starts.

Reads only the footer of each file (no data), so a typo in a column name, or one file of many
written differently, costs a second on the driver, not a failed multi-GPU job.
"""

from __future__ import annotations

import math
import os
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from trainers.config import ColumnConfig
from trainers.errors import UserError, first_line

MAX_LISTED = 1_000_000  # entries walked under one local data.path


def check_columns(paths: list[str], features: ColumnConfig, label: ColumnConfig | None) -> int:
    """Raise UserError on a missing path or column, a wrong dtype or shape; return the row count."""
    return check_schema(open_dataset(paths), ", ".join(paths), features, label)


def check_schema(dataset: pads.Dataset, where: str, features: ColumnConfig, label: ColumnConfig | None) -> int:
    """`check_columns` on a data set already open; `where` names it in messages."""
    feature_type = _column_type(dataset.schema, features, "data.features", where)
    _check_feature_type(feature_type, features)
    if label is not None:
        _check_label_type(_column_type(dataset.schema, label, "data.label", where), label)
    first = None
    rows = 0
    for fragment in dataset.get_fragments():
        first = first or fragment.path
        rows += _check_file(fragment, dataset.schema, first, features, label)
    if rows == 0:
        raise UserError(f"data.path: {where} holds no rows")
    return rows


def _check_file(fragment: pads.ParquetFileFragment, schema: pa.Schema, first: str, features: ColumnConfig,
                label: ColumnConfig | None) -> int:
    """One file's footer: readable, the job's columns typed as in the first file (the data set's
    schema is the first file's alone), `features.shape` values per row; returns its row count.
    The fragment keeps the footer, so compat's statistics check reads no file twice."""
    try:
        meta = fragment.metadata
    except (pa.ArrowException, OSError) as exc:  # truncated, or not Parquet at all
        raise UserError(f"data.path: {fragment.path} is not a readable Parquet file ({first_line(exc)})") from None
    here = fragment.physical_schema
    for column, field in ((features, "data.features"), (label, "data.label")):
        if column is None:
            continue
        found = _column_type(here, column, field, fragment.path)
        (_check_feature_type if column is features else _check_label_type)(found, column, fragment.path)
        if _kind(found) != _kind(schema.field(column.column).type):  # list vs large_list, another fixed size
            raise UserError(f"{field}.dtype: column {column.column!r} holds {found} in {fragment.path} but "
                            f"{schema.field(column.column).type} in {first}; every file needs the same types")
    if features.shape is not None:
        _check_shape(meta, here, fragment.path, features)
    return meta.num_rows


def row_shape(dataset: pads.Dataset, name: str) -> list[int]:
    """The shape of one row of column `name` as the collate hands it to the model when
    data.features.shape is not given: ``[]`` for a scalar column, ``[length]`` for a list, its
    length from the footer of the first file holding rows (the other files are checked against it)."""
    for fragment in dataset.get_fragments():
        meta, schema = fragment.metadata, fragment.physical_schema
        found = schema.field(name).type
        if not _is_list(found):
            return []
        if pa.types.is_fixed_size_list(found):
            return [found.list_size]
        if meta.num_rows:
            leaf = leaf_columns(schema, name)[0]
            values = sum(meta.row_group(g).column(leaf).num_values for g in range(meta.num_row_groups))
            return [max(1, values // meta.num_rows)]
    return []


def _kind(t: pa.DataType) -> object:
    # What the collate sees: the list's kind and element type, not the element's name or nullability,
    # which writers set differently; a worker reads either alike.
    return (type(t).__name__, getattr(t, "list_size", None), _kind(t.value_type)) if _is_list(t) else t


def leaf_columns(schema: pa.Schema, name: str) -> range:
    """The footer's leaf columns of top-level column `name` (a list's one element column, a struct's
    fields). Counted from the schema: a dotted-path prefix would take `label.x` for `label`."""
    start = 0
    for field in schema:
        if field.name == name:
            return range(start, start + _leaves(field.type))
        start += _leaves(field.type)
    return range(0)


def _leaves(t: pa.DataType) -> int:
    if _is_list(t):
        return _leaves(t.value_type)
    if pa.types.is_map(t):
        return _leaves(t.key_type) + _leaves(t.item_type)
    if pa.types.is_struct(t):
        return sum(_leaves(t.field(i).type) for i in range(t.num_fields))
    return 1


def open_dataset(paths: list[str]) -> pads.Dataset:
    """The Parquet files under `paths` as one pyarrow dataset (UserError if none)."""
    if not paths:
        raise UserError("data.path: no path given")
    filesystem, _ = _resolve(paths[0])
    files = [f for path in paths for f in _parquet_files(path)]
    try:
        return pads.dataset(files, format="parquet", filesystem=filesystem)
    except (pa.ArrowException, OSError) as exc:  # not Parquet, or not readable by us
        raise UserError(f"data.path: {', '.join(paths)} is not a readable Parquet data set "
                        f"({first_line(exc)})") from None


def _resolve(path: str) -> tuple[pafs.FileSystem, str]:
    # Local paths may be relative; URIs (s3://, gs://) go to pyarrow's matching filesystem.
    if "://" not in path:
        return pafs.LocalFileSystem(), os.path.abspath(path)
    try:  # a scheme pyarrow has no filesystem for (ftp://), an object store it cannot reach
        return pafs.FileSystem.from_uri(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"data.path: {path}: {first_line(exc)}") from None


def _parquet_files(path: str) -> list[str]:
    filesystem, root = _resolve(path)
    try:
        info = filesystem.get_file_info(root)
    except OSError as exc:  # an object store that does not answer, a bucket we may not read
        raise UserError(f"data.path: cannot read {path} ({first_line(exc)})") from None
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"data.path: {path} not found")
    if info.type == pafs.FileType.File:
        if not _parquet_name(root):  # Ray Data drops it from the listing: `run` would find no files
            raise UserError(f"data.path: {path} is not named *.parquet, and Ray Data reads only files that are; "
                            "rename it")
        return [root]
    if info.type != pafs.FileType.Directory:  # a device, a FIFO, a socket: listing or reading it fails or blocks
        raise UserError(f"data.path: {path} is neither a Parquet file nor a folder of them")
    try:
        if isinstance(filesystem, pafs.LocalFileSystem):
            files = sorted(_local_data_files(root, path))
        else:
            listing = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
            files = sorted(f.path for f in listing if _is_data_file(f, root))
    except OSError as exc:  # a folder below it we may not read
        raise UserError(f"data.path: cannot list {path} ({first_line(exc)})") from None
    if not files:
        raise UserError(f"data.path: no Parquet files found in {path}")
    return files


def _local_data_files(root: str, path: str) -> list[str]:
    """The data files under a local folder, following symbolic links as pyarrow does, but never
    round a loop of them (pyarrow's own listing of a folder holding `X11 -> .` never ends) and
    never through more than `MAX_LISTED` entries (a mistyped data.path of `/`)."""
    files: list[str] = []
    listed = 0
    stack = [(root, frozenset[tuple[int, int]]())]
    while stack:
        folder, above = stack.pop()
        st = os.stat(folder)
        here = above | {(st.st_dev, st.st_ino)}
        if len(here) == len(above):
            raise UserError(f"data.path: {path} loops through a symbolic link at {folder}")
        with os.scandir(folder) as entries:
            for entry in entries:
                listed += 1
                if listed > MAX_LISTED:
                    raise UserError(f"data.path: {path} holds more than {MAX_LISTED:,} files and folders; "
                                    "point it at the folder of Parquet files")
                if entry.is_dir():  # hidden ones too: a link loop there is refused all the same
                    stack.append((entry.path, here))
                elif _hidden(entry.path, root):
                    continue
                elif entry.is_file():
                    if _parquet_name(entry.name):
                        files.append(entry.path)
                elif os.path.exists(entry.path):  # a dangling link is not listed by pyarrow; these are,
                    # and Ray Data's listing fails on them (FileType.UNKNOWN) once the job has started
                    raise UserError(f"data.path: {entry.path} is neither a file nor a folder (a FIFO, socket or "
                                    "device); remove it from the data folder")
    return files


def _is_data_file(info: pafs.FileInfo, root: str) -> bool:
    return info.type == pafs.FileType.File and _parquet_name(info.path) and not _hidden(info.path, root)


def _parquet_name(path: str) -> bool:
    return path.lower().endswith(".parquet")  # as Ray Data's extension filter: b.PARQUET is read too


def _hidden(path: str, root: str) -> bool:
    # Ray Data's rule, which decides what `run` reads: a path whose first part below data.path starts
    # with "." or "_" is metadata or an unfinished write; deeper ones (sub/_tmp/x.parquet) are read.
    parts = PurePosixPath(path).relative_to(PurePosixPath(root)).parts
    return parts[0].startswith((".", "_"))


def _column_type(schema: pa.Schema, column: ColumnConfig, field: str, where: str) -> pa.DataType:
    if column.column not in schema.names:
        raise UserError(
            f"{field}.column: column {column.column!r} not found in {where} "
            f"(columns: {', '.join(schema.names)})"
        )
    if len(schema.get_all_field_indices(column.column)) > 1:  # a later file; the first is refused when opened
        raise UserError(f"{field}.column: column {column.column!r} appears more than once in {where}")
    return schema.field(column.column).type


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _describe(t: pa.DataType) -> str:
    """Arrow types in the config's spelling: ``float32`` not ``float``, ``list<float32>``."""
    if _is_list(t):
        return f"list<{_describe(t.value_type)}>"
    try:
        name = np.dtype(t.to_pandas_dtype()).name
    except (NotImplementedError, TypeError):
        return str(t)
    return str(t) if name == "object" else name  # a string column is "string", not pandas' "object"


def _check_feature_type(found: pa.DataType, column: ColumnConfig, where: str | None = None) -> None:
    want = pa.type_for_alias(column.dtype)
    element = found.value_type if _is_list(found) else found
    if element != want:
        raise UserError(
            f"data.features.dtype: column {column.column!r} holds {_describe(found)}{_in(where)}, "
            f"expected list<{column.dtype}> or {column.dtype}"
        )


def _check_label_type(found: pa.DataType, column: ColumnConfig, where: str | None = None) -> None:
    if found != pa.type_for_alias(column.dtype):
        raise UserError(
            f"data.label.dtype: column {column.column!r} holds {_describe(found)}{_in(where)}, "
            f"expected {column.dtype}"
        )


def _in(where: str | None) -> str:
    return f" in {where}" if where else ""


def _check_shape(meta: pq.FileMetaData, schema: pa.Schema, path: str, features: ColumnConfig) -> None:
    """Values per row from the footer alone: a variable list's element column holds one entry per
    value, plus one per null or empty row, so `num_values` is rows * length when every row fits."""
    name, shape = features.column, features.shape
    want = math.prod(shape)
    found = schema.field(name).type
    if pa.types.is_fixed_size_list(found) or not _is_list(found):
        length = found.list_size if _is_list(found) else 1
    else:
        leaf = leaf_columns(schema, name)[0]
        chunks = [meta.row_group(g).column(leaf) for g in range(meta.num_row_groups)]
        values = sum(c.num_values for c in chunks)
        if values == meta.num_rows * want:
            return
        if any(c.statistics is not None and c.statistics.has_null_count and c.statistics.null_count
               for c in chunks):
            raise UserError(f"data.features: column {name!r} holds null (or empty) values in {path}; "
                            "fill or drop those rows")
        if values % meta.num_rows:
            raise UserError(f"data.features.shape: {shape} holds {want} values per row but column {name!r} "
                            f"has {values} values in {meta.num_rows} rows in {path} (rows of other lengths)")
        length = values // meta.num_rows
    if want != length:
        raise UserError(
            f"data.features.shape: {shape} holds {want} values but "
            f"column {name!r} has {length} per row{_in(path)}"
        )
