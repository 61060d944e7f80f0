"""Whether a model and a data set fit each other, checked before anything starts.

The model takes the configured features: one forward pass on the meta device (no weights are
allocated, no data is read) with the batch the collate makes, which also says how many classes
(or vocabulary entries) the model predicts. The targets are in range: every class label (or, for
a language model, every token id) lies in 0..classes-1, read from the Parquet footers' column
statistics, so a data set of any size costs a footer read per file. Both failures otherwise
surface as a worker's traceback once the job runs (`Target 12 is out of bounds`, `mat1 and mat2
shapes cannot be multiplied`).
"""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as pads
import torch

from trainers.config import ColumnConfig, DataConfig, ModelConfig
from trainers.data.collate import INPUT_DTYPES
from trainers.data.schema import check_schema, leaf_columns, open_dataset, row_shape
from trainers.errors import UserError, first_line
from trainers.models import build_model


def check_fit(model: ModelConfig, data: DataConfig) -> int:
    """The model takes the features, the columns are as configured, the targets in range; returns
    the row count. Every failure is a UserError naming the field."""
    dataset, where = open_dataset(data.paths), ", ".join(data.paths)
    rows = check_schema(dataset, where, data.features, data.label)
    if data.features.shape is None:
        # the model is then handed (rows, length) or (rows,): checked as such, and every file's rows
        # too; unchecked, a token past the vocabulary or two lengths in a batch failed on a worker
        shape = row_shape(dataset, data.features.column)
        data = data.model_copy(update={"features": data.features.model_copy(update={"shape": shape})})
        check_schema(dataset, where, data.features, data.label)
    classes = output_classes(model, data)
    check_targets(dataset, data, model.name, classes)
    return rows


def output_classes(model: ModelConfig, data: DataConfig) -> int | None:
    """How many classes the model predicts for the configured features (None when the features'
    shape is not configured); a UserError when the model does not take them."""
    features = data.features
    with torch.device("meta"):
        net = _build(model)
        if features.shape is None:
            _check_language_modelling(data)
            return None
        shape = list(features.shape)
        if data.label is None:  # next-token prediction reads tokens[:, :-1]
            shape[-1] -= 1
        dtype = torch.from_numpy(np.zeros(0, INPUT_DTYPES[features.dtype])).dtype  # what the collate hands it
        try:
            x = torch.zeros((2, *shape), dtype=dtype)
        except Exception as exc:  # noqa: BLE001 - sizes past int64 (TypeError) or bytes past it (RuntimeError)
            raise UserError(f"data.features.shape: {features.shape} is no tensor shape torch can hold: "
                            f"{first_line(exc)}") from None
        if not dtype.is_floating_point and not any(isinstance(m, torch.nn.Embedding) for m in net.modules()):
            # the meta device does not check dtypes: a Linear fed int64 passes here and fails on a worker
            raise UserError(f"data.features.dtype: {features.dtype} features are token ids, and model {model.name} "
                            "has no embedding to take them; give a float column")
        try:
            logits = net(x)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever torch says about the mismatch, in one line
            raise UserError(f"model: {model.name} with kwargs {model.kwargs} does not take data.features (column "
                            f"{features.column!r}, {features.dtype}, shape {features.shape}): {first_line(exc)}"
                            ) from None
    _check_language_modelling(data)
    return int(logits.shape[-1])


def _check_language_modelling(data: DataConfig) -> None:
    """`label: null` predicts each next token of a row's one sequence of token ids (the step shifts
    dimension 1): float pixels [1, 8, 8] passed here and crashed every worker (0 channels left)."""
    shape = data.features.shape
    if data.label is None and (data.features.dtype.startswith("float") or (shape is not None and len(shape) != 1)):
        raise UserError(f"data.label: null means language modelling, which needs one sequence of integer token ids "
                        f"per row; data.features is {data.features.dtype}"
                        f"{'' if shape is None else f' of shape {shape}'}: give a label column")


def _build(model: ModelConfig) -> torch.nn.Module:
    """The model on the current (meta) device; a UserError naming model.kwargs when torch refuses
    its sizes (width 10**12: "Storage size calculation overflowed"), which a worker would hit too."""
    try:
        return build_model(model.name, model.kwargs)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever torch says about the sizes, in one line
        raise UserError(f"model.kwargs: model {model.name} cannot be built with {model.kwargs}: "
                        f"{first_line(exc)}") from None


def check_targets(dataset: pads.Dataset, data: DataConfig, model: str, classes: int | None) -> None:
    """No null features or labels; labels (or a language model's tokens) within 0..classes-1,
    as far as the files' column statistics say (a file written without them is not checked)."""
    _check_column(dataset, data.features, "data.features", None if data.label else classes, model)
    if data.label is not None:
        _check_column(dataset, data.label, "data.label", classes, model)


def _check_column(dataset: pads.Dataset, column: ColumnConfig, field: str, classes: int | None,
                  model: str) -> None:
    what = "token ids" if field == "data.features" else "labels"
    for fragment in dataset.get_fragments():
        meta = fragment.metadata  # read, and kept, by check_schema
        leaves = leaf_columns(fragment.physical_schema, column.column)  # "label", not "label.x" too
        for group in range(meta.num_row_groups):
            for j in leaves:
                stats = meta.row_group(group).column(j).statistics
                if stats is None:
                    continue
                if stats.has_null_count and stats.null_count:
                    raise UserError(f"{field}: column {column.column!r} holds null (or empty) values in "
                                    f"{fragment.path}; fill or drop those rows")
                if classes is None or not stats.has_min_max:
                    continue
                if stats.min < 0 or stats.max >= classes:
                    raise UserError(f"{field}: column {column.column!r} holds {what} {stats.min}..{stats.max} in "
                                    f"{fragment.path}, but model {model} predicts {classes} classes: "
                                    f"they must be 0..{classes - 1} (or raise the model's class count)")
