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

from orchestrator.planner import ClusterSpec, Observation, Profile, calibrate, predict

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


def _system(hardware: str) -> str:
    """The node family a row ran on (DGX-2H is a DGX-2 with faster GPUs, the same fabric)."""
    return max((k for k in NODE_IB_GBPS if hardware.startswith(k)), key=len)


def dle_cases(path: Path = DLE_CSV) -> list[dict[str, Any]]:
    """Each k-GPU row with its 1-GPU profile, its node's cluster and the measured step time."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    group = ("source", "model", "hardware", "precision", "local_batch")
    single = {tuple(r[k] for k in group): r for r in rows if r["gpus"] == "1"}
    cases = []
    for row in rows:
        if row["gpus"] == "1":
            continue
        base = single[tuple(row[k] for k in group)]
        gpus, nodes = int(row["gpus"]), int(row["nodes"])
        cases.append({"row": row, "profile": _profile(base), "cluster": _cluster(row), "nodes": nodes,
                      "gpus_per_node": gpus // nodes, "local_batch": _local_batch(row), "system": _system(row["hardware"]),
                      "measured": _samples_per_s(row), "single": _samples_per_s(base)})
    return cases


def _spec_only(case: dict[str, Any], cluster: ClusterSpec | None = None) -> float:
    p = predict(case["profile"], cluster or case["cluster"], nodes=case["nodes"], gpus_per_node=case["gpus_per_node"],
                local_batch=case["local_batch"])
    return p.throughput


def _naive_ring(case: dict[str, Any]) -> float:
    """Baseline: ring all-reduce of the fp32 gradients at the line rate, nothing overlapped."""
    c, g, n = case["cluster"], case["gpus_per_node"], case["nodes"]
    ranks = g * n
    link = min(c.intra_node_GBps, c.inter_node_GBps) if n > 1 else c.intra_node_GBps
    comm = 2 * (ranks - 1) / ranks * case["profile"].grad_bytes / (link * 1e9)
    step = case["local_batch"] / case["single"] + comm
    return ranks * case["local_batch"] / step


def _no_communication(case: dict[str, Any]) -> float:
    """Baseline: perfect linear scaling."""
    return case["gpus_per_node"] * case["nodes"] * case["single"]


BASELINES = {"spec-only (this planner)": _spec_only, "naive ring at line rate, no overlap": _naive_ring,
             "no communication (linear)": _no_communication}


def _summary(errors: list[float]) -> dict[str, float]:
    ordered = sorted(abs(e) for e in errors)
    return {"rows": len(ordered), "median_abs_error_pct": statistics.median(ordered),
            "p90_abs_error_pct": ordered[min(int(0.9 * len(ordered)), len(ordered) - 1)],
            "worst_abs_error_pct": ordered[-1]}


def _error(predicted: float, case: dict[str, Any]) -> float:
    return 100 * (predicted - case["measured"]) / case["measured"]


def dle_predictions(path: Path = DLE_CSV) -> list[dict[str, Any]]:
    """One record per k-GPU row: measured and predicted throughput (samples/s) and % error."""
    out = []
    for case in dle_cases(path):
        predicted = _spec_only(case)
        row = case["row"]
        out.append({"model": row["model"], "hardware": row["hardware"], "precision": row["precision"],
                    "local_batch": case["local_batch"], "gpus": int(row["gpus"]), "measured": case["measured"],
                    "predicted": predicted, "error_pct": _error(predicted, case)})
    return out


def dle_error_summary(path: Path = DLE_CSV) -> dict[str, float]:
    return _summary([r["error_pct"] for r in dle_predictions(path)])


def dle_baselines(path: Path = DLE_CSV) -> dict[str, dict[str, float]]:
    """Spec-only against the naive ring and linear scaling on the same rows."""
    cases = dle_cases(path)
    return {name: _summary([_error(f(c), c) for c in cases]) for name, f in BASELINES.items()}


def _observation(case: dict[str, Any]) -> Observation:
    gpus = case["nodes"] * case["gpus_per_node"]
    return Observation(profile=case["profile"], nodes=case["nodes"], gpus_per_node=case["gpus_per_node"],
                       local_batch=case["local_batch"], step_time_s=gpus * case["local_batch"] / case["measured"],
                       source="published-table")


def dle_leave_one_model_out(path: Path = DLE_CSV) -> dict[str, dict[str, float]]:
    """Per node family: calibrate on ResNet-50's rows, predict Transformer-XL's, and the reverse;
    the same rows spec-only for comparison."""
    cases = dle_cases(path)
    families = {"resnet": lambda c: c["row"]["model"].startswith("resnet"),
                "transformer_xl": lambda c: c["row"]["model"].startswith("transformer_xl")}
    calibrated, spec = [], []
    for system in sorted({c["system"] for c in cases}):
        mine = [c for c in cases if c["system"] == system]
        for train_on, predict_for in (("resnet", "transformer_xl"), ("transformer_xl", "resnet")):
            train = [c for c in mine if families[train_on](c)]
            test = [c for c in mine if families[predict_for](c)]
            if not train or not test:
                continue
            cluster = calibrate(test[0]["cluster"].replace(gpus_per_node=max(c["cluster"].gpus_per_node for c in mine)),
                                [_observation(c) for c in train], source="published-table")
            calibrated += [_error(_spec_only(c, cluster), c) for c in test]
            spec += [_error(_spec_only(c), c) for c in test]
    return {"calibrated on the other model": _summary(calibrated), "spec-only, same rows": _summary(spec)}


@pytest.mark.skipif(not DLE_CSV.is_file(), reason=f"validation data absent: {DLE_CSV}")
def test_reproduces_published_scaling_untuned(capsys: pytest.CaptureFixture[str]) -> None:
    summary = dle_error_summary()
    baselines = dle_baselines()
    with capsys.disabled():
        print(f"\nDLE scaling, {summary['rows']} k-GPU rows: median |error| "
              f"{summary['median_abs_error_pct']:.1f} %, worst {summary['worst_abs_error_pct']:.1f} %")
        for name, s in baselines.items():
            print(f"  {name}: median {s['median_abs_error_pct']:.1f} %, p90 {s['p90_abs_error_pct']:.1f} %")
    assert summary["rows"] >= 40
    assert summary["median_abs_error_pct"] < 15
    assert summary["worst_abs_error_pct"] < 50


@pytest.mark.skipif(not DLE_CSV.is_file(), reason=f"validation data absent: {DLE_CSV}")
def test_leave_one_model_out_on_the_published_tables(capsys: pytest.CaptureFixture[str]) -> None:
    result = dle_leave_one_model_out()
    with capsys.disabled():
        for name, s in result.items():
            print(f"  LOMO {name}: median {s['median_abs_error_pct']:.1f} %, p90 {s['p90_abs_error_pct']:.1f} %")
    assert result["calibrated on the other model"]["rows"] == result["spec-only, same rows"]["rows"] >= 40
