"""`Collate` as Ray Data's Arrow collate function: Ray Data then hands it ``pyarrow.Table`` batches
(it checks the type), which `Collate` turns into tensors without per-row objects."""

from __future__ import annotations

from ray.data.collate_fn import ArrowBatchCollateFn

from trainers.data.collate import Collate


class ArrowCollate(Collate, ArrowBatchCollateFn):
    pass
