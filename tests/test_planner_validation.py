"""Reproduce NVIDIA's published 1 -> k GPU scaling tables from each 1-GPU row, untuned.

The data set is ../shared/planner-validation/dle_scaling.csv (see its README). Each 1-GPU row
becomes a profile (step time = local batch / throughput), each node's public interconnect figures
a cluster spec; the planner predicts throughput at k GPUs with the same local batch (weak scaling)
and we compare with the table. No constant of the model was fitted to this file.
"""

from __future__ import annotations

import csv
import re
import statistics
from pathlib import Path
from typing import Any

import pytest

from orchestrator.planner import ClusterSpec, Profile, predict

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DLE_CSV = SHARED / "planner-validation" / "dle_scaling.csv"

# Public interconnect figures, GB/s one direction: NVLink total per GPU / 2, and the node's
# compute-fabric InfiniBand (DGX-1: 4x EDR 100 Gb/s, DGX-2: 8x EDR, DGX A100: 8x HDR 200 Gb/s).
NVLINK_GBPS = {"NVLink2": 300 / 2, "NVLink3": 600 / 2}
NODE_IB_GBPS = {"DGX-1": 4 * 12.5, "DGX-2": 8 * 12.5, "DGX-A100": 8 * 25.0}
# tok/s rows count tokens; a Transformer-XL sample is one sequence of tgt_len tokens
# (DeepLearningExamples PyTorch/LanguageModeling/Transformer-XL/pytorch/wt103_{base,large}.yaml).
TOKENS_PER_SAMPLE = {"transformer_xl_base": 192, "transformer_xl_large": 384}
FP32_BYTES = 4  # gradients are all-reduced in fp32 (the data set's README)


def _node_key(hardware: str, table: dict[str, float]) -> float:
    # "DGX-2H" is a DGX-2 with faster GPUs, same fabric; match the longest known prefix.
    name = max((k for k in table if hardware.startswith(k)), key=len)
    return table[name]


def _cluster(row: dict[str, str]) -> ClusterSpec:
    link = row["intra_node_link"].split()[0]
    return ClusterSpec(
        nodes=1,
        gpus_per_node=int(row["gpus_per_node"]),
        gpu=row["hardware"],
        intra_node_GBps=NVLINK_GBPS[link],
        inter_node_GBps=_node_key(row["hardware"], NODE_IB_GBPS),
    )


def _samples_per_s(row: dict[str, str]) -> float:
    per_sample = TOKENS_PER_SAMPLE.get(row["model"], 1) if row["unit"] == "tok/s" else 1
    return float(row["throughput"]) / per_sample


def _profile(row: dict[str, str]) -> Profile:
    batch = _local_batch(row)
    params = int(float(row["approx_params_millions"]) * 1e6)
    return Profile.from_dict({
        "version": 1,
        "model": row["model"],
        "device": row["hardware"],
        "precision": row["precision"],
        "param_count": params,
        "grad_bytes": params * FP32_BYTES,
        "samples": [{"local_batch": batch, "step_time_s": batch / _samples_per_s(row)}],
        "max_local_batch": batch,
    })


def _local_batch(row: dict[str, str]) -> int:
    return int(re.match(r"\d+", row["local_batch"]).group())  # "512 (benchmark.py -b)" -> 512


def dle_predictions(path: Path = DLE_CSV) -> list[dict[str, Any]]:
    """One record per k-GPU row: measured and predicted throughput (samples/s) and % error."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    group = ("source", "model", "hardware", "precision", "local_batch")
    single = {tuple(r[k] for k in group): r for r in rows if r["gpus"] == "1"}
    out = []
    for row in rows:
        if row["gpus"] == "1":
            continue
        base = single[tuple(row[k] for k in group)]
        p = predict(
            _profile(base), _cluster(row),
            nodes=int(row["nodes"]), gpus_per_node=int(row["gpus"]) // int(row["nodes"]),
            local_batch=_local_batch(row),
        )
        measured = _samples_per_s(row)
        out.append({
            "model": row["model"], "hardware": row["hardware"], "precision": row["precision"],
            "local_batch": _local_batch(row), "gpus": int(row["gpus"]),
            "measured": measured, "predicted": p.throughput,
            "error_pct": 100 * (p.throughput - measured) / measured,
        })
    return out


def dle_error_summary(path: Path = DLE_CSV) -> dict[str, float]:
    errors = [abs(r["error_pct"]) for r in dle_predictions(path)]
    return {"rows": len(errors), "median_abs_error_pct": statistics.median(errors),
            "worst_abs_error_pct": max(errors)}


@pytest.mark.skipif(not DLE_CSV.is_file(), reason=f"validation data absent: {DLE_CSV}")
def test_reproduces_published_scaling_untuned(capsys: pytest.CaptureFixture[str]) -> None:
    summary = dle_error_summary()
    with capsys.disabled():
        print(f"\nDLE scaling, {summary['rows']} k-GPU rows: median |error| "
              f"{summary['median_abs_error_pct']:.1f} %, "
              f"worst {summary['worst_abs_error_pct']:.1f} %")
    assert summary["rows"] >= 40
    assert summary["median_abs_error_pct"] < 15
    assert summary["worst_abs_error_pct"] < 50
