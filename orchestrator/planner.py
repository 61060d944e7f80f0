"""Performance model and planner for data-parallel training: pure functions, no Ray, no torch.

Given a single-worker profile and a cluster spec, predict the step time of DDP training at any
uniform placement (nodes x GPUs per node) and choose the placement, local batch and accumulation
for an objective. Every constant of the model is named here:

compute   t(b): the profiled step time at local batch b, interpolated piecewise-linearly between
          profiled batch sizes. Below the smallest, a least-squares line a + c*b through the
          nearest sample, clamped between proportional scaling and the smallest sample's time;
          above the largest, proportional scaling (the device is assumed saturated). The optimizer
          share t_opt (``optimizer_s``, else step - ``fwd_bwd_s``, else 0) runs once per optimizer
          step; the rest, t_fb, is forward+backward, of which ``BACKWARD_FRACTION`` is backward.
comm      ring all-reduce of the gradient bytes S over g GPUs per node and N nodes, hierarchical
          when N > 1 (intra-node reduce-scatter, inter-node ring of each GPU's 1/g shard through
          the node's NIC, intra-node all-gather):
              2(g-1)/g * S / B_intra + 2(N-1)/N * S / B_inter + k * (2(g-1) + 2(N-1)) * latency
          with B = spec bandwidth * ``link_efficiency`` and k = ceil(S / ``DDP_BUCKET_BYTES``), the
          DDP buckets. Measured all-reduce samples for the same placement replace the formula:
          k * t(S / k), t interpolated linearly in log(bytes).
overlap   DDP overlaps the all-reduce with backward (Pollux's p-norm, gamma = ``OVERLAP_GAMMA``):
              step = (A-1) * t_fb + t_fwd + (t_bwd^gamma + t_comm^gamma)^(1/gamma) + t_opt
data      per worker: step >= A * b / data_samples_per_s (prefetching hides loading otherwise).
memory    a micro-batch fits when b <= max_local_batch; larger local batches become accumulation.
efficiency throughput / (GPUs x the best one GPU does on a batch no larger than this global
          batch): the share of linear scaling obtained. With a fixed global batch that baseline
          is one GPU training the same batch; without, one GPU at its best local batch.
stat. eff McCandlish et al. 2018: reaching a given loss at global batch B takes
          E(B) = E_min (1 + B / B_noise) samples, so relative to a reference batch B0 (the
          configured global batch, else max_local_batch) the statistical efficiency is
          (B_noise + B0) / (B_noise + B); goodput = throughput * that (1 without B_noise).
finish    time to finish = total_samples / goodput (total_samples counted at B0); cost = that x
          GPUs x gpu_hour_cost.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from orchestrator.errors import UserError
from orchestrator.files import read_json

PROFILE_VERSION = 1
PLAN_VERSION = 1
OBJECTIVES = ("max_throughput", "min_cost", "max_goodput")

# Backward costs about twice the forward (two matmuls per forward one), so 2/3 of fwd+bwd.
BACKWARD_FRACTION = 2.0 / 3.0
# Pollux (Qiao et al., OSDI 2021) fits gamma per job; 1 is no overlap, larger approaches
# perfect overlap. 2 is a middle prior, used untuned.
OVERLAP_GAMMA = 2.0
# PyTorch DDP's default bucket_cap_mb: each bucket is one all-reduce with its own latency.
DDP_BUCKET_BYTES = 25 * 2**20
# NCCL reaches roughly 80 % of line rate in practice (NVIDIA's published busbw figures).
DEFAULT_LINK_EFFICIENCY = 0.8
DEFAULT_LATENCY_US = 10.0
# min_cost: candidates within this fraction of the cheapest count as equally cheap, and the
# fastest of them wins (1 GPU at 100 % and 8 GPUs at 99.5 % efficiency cost the same).
COST_TIE_TOLERANCE = 0.01

_MISSING: Any = object()


# ---------------------------------------------------------------------------------------------
# Field checks shared by Profile, ClusterSpec and Plan: one-line errors naming the field path.


@dataclass(frozen=True, slots=True)
class _Field:
    kind: str  # "int", "number" or "text"
    low: float = 0.0
    inclusive: bool = False  # low itself allowed
    high: float | None = None
    required: bool = True


def _check(values: Mapping[str, Any], where: str, fields: Mapping[str, _Field]) -> None:
    for name, f in fields.items():
        default = _MISSING if f.required else None
        if f.kind == "text":
            _text(values, name, where, default=default)
        else:
            _number(values, name, where, integer=f.kind == "int", low=f.low,
                    inclusive=f.inclusive, high=f.high, default=default)


def _view(obj: Any) -> dict[str, Any]:
    return {k: getattr(obj, k) for k in obj.__slots__}


def _values(raw: Mapping[str, Any], fields: Mapping[str, _Field]) -> dict[str, Any]:
    """Constructor arguments from a checked mapping: required fields always (None when absent,
    for __post_init__ to name), optional ones only when set (so defaults apply)."""
    values = {k: v for k, v in raw.items() if k in fields and v is not None}
    values.update({k: None for k, f in fields.items() if f.required and k not in values})
    return values


def _mapping(raw: Any, where: str, allowed: Iterable[str]) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise UserError(f"{where}: expected a mapping, got {type(raw).__name__}")
    allowed = tuple(allowed)
    for key in raw:
        if key not in allowed:
            raise UserError(f"{where}.{key}: unknown key (expected one of {', '.join(allowed)})")
    return raw


def _number(
    raw: Mapping[str, Any],
    key: str,
    where: str,
    *,
    integer: bool = False,
    low: float = 0.0,
    inclusive: bool = False,
    high: float | None = None,
    default: Any = _MISSING,
) -> Any:
    value = raw.get(key)
    if value is None:
        if default is _MISSING:
            raise UserError(f"{where}.{key}: required field is missing")
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        kind = "an integer" if integer else "a number"
        raise UserError(f"{where}.{key}: must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise UserError(f"{where}.{key}: must be finite, got {value!r}")
    if value < low or (value == low and not inclusive):
        bound = ">=" if inclusive else ">"
        raise UserError(f"{where}.{key}: must be {bound} {low:g}, got {value!r}")
    if high is not None and value > high:
        raise UserError(f"{where}.{key}: must be <= {high:g}, got {value!r}")
    return value


def _text(raw: Mapping[str, Any], key: str, where: str, *, default: Any = _MISSING) -> Any:
    value = raw.get(key)
    if value is None:
        if default is _MISSING:
            raise UserError(f"{where}.{key}: required field is missing")
        return default
    if not isinstance(value, str) or not value:
        raise UserError(f"{where}.{key}: must be a non-empty string, got {value!r}")
    return value


def _items(raw: Mapping[str, Any], key: str, where: str, *, required: bool) -> list[Any]:
    value = raw.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list) or (required and not value):
        what = "a non-empty list" if required else "a list"
        got = "nothing" if value is None else repr(value)
        raise UserError(f"{where}.{key}: must be {what}, got {got}")
    return value


def _drop_none(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None}


# ---------------------------------------------------------------------------------------------
# Inputs: the profile of one worker and the cluster. Each validates itself in __post_init__
# (built from JSON/YAML or in code alike); samples are checked by their container, which knows
# their index for the error message.

_SAMPLE_FIELDS = {
    "local_batch": _Field("int"),
    "step_time_s": _Field("number"),
    "peak_memory_bytes": _Field("int", inclusive=True, required=False),
    "fwd_bwd_s": _Field("number", required=False),
    "optimizer_s": _Field("number", inclusive=True, required=False),
}
_PROFILE_FIELDS = {
    "model": _Field("text"),
    "device": _Field("text"),
    "param_count": _Field("int"),
    "grad_bytes": _Field("int", inclusive=True),
    "max_local_batch": _Field("int"),
    "data_samples_per_s": _Field("number", required=False),
    "gradient_noise_scale": _Field("number", required=False),
    "precision": _Field("text", required=False),
    "device_memory_bytes": _Field("int", required=False),
}
_ALLREDUCE_FIELDS = {
    "bytes": _Field("int"),
    "nodes": _Field("int"),
    "gpus_per_node": _Field("int"),
    "seconds": _Field("number"),
}
_CLUSTER_FIELDS = {
    "nodes": _Field("int"),
    "gpus_per_node": _Field("int"),
    "intra_node_GBps": _Field("number"),
    "inter_node_GBps": _Field("number"),
    "gpu": _Field("text", required=False),
    "latency_us": _Field("number", inclusive=True, required=False),
    "gpu_hour_cost": _Field("number", inclusive=True, required=False),
    "link_efficiency": _Field("number", high=1.0, required=False),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ProfileSample:
    """One rung of the profiler's batch-size ladder."""

    local_batch: int
    step_time_s: float  # median seconds per step (forward, backward, optimizer) on one worker
    peak_memory_bytes: int | None = None
    fwd_bwd_s: float | None = None
    optimizer_s: float | None = None

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> ProfileSample:
        _mapping(raw, where, cls.__slots__)
        return cls(**_values(raw, _SAMPLE_FIELDS))

    def to_dict(self) -> dict[str, Any]:
        return _drop_none(_view(self))


@dataclass(frozen=True, slots=True, kw_only=True)
class Profile:
    """What one worker measured (``orchestrator profile``); JSON with a version number."""

    model: str
    device: str
    param_count: int
    grad_bytes: int  # bytes DDP all-reduces per step: trainable parameters x gradient element size
    samples: tuple[ProfileSample, ...]
    max_local_batch: int  # the largest local batch that fits in device memory
    data_samples_per_s: float | None = None  # one worker's data pipeline, alone
    gradient_noise_scale: float | None = None  # B_noise, in samples
    precision: str | None = None
    device_memory_bytes: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # free-form: config digest, OOM batch, ...
    version: int = PROFILE_VERSION

    def __post_init__(self) -> None:
        where = "profile"
        _check_version(self.version, where, "profile", PROFILE_VERSION)
        _check(_view(self), where, _PROFILE_FIELDS)
        if not self.samples:
            raise UserError(f"{where}.samples: must be a non-empty list, got []")
        for i, s in enumerate(self.samples):
            _check(_view(s), f"{where}.samples[{i}]", _SAMPLE_FIELDS)
        _check_ladder(self.samples, where)
        smallest = min(s.local_batch for s in self.samples)
        if self.max_local_batch < smallest:
            raise UserError(
                f"{where}.max_local_batch: must be >= the smallest profiled local_batch "
                f"({smallest}), got {self.max_local_batch}"
            )
        if not isinstance(self.meta, dict):
            raise UserError(f"{where}.meta: must be a mapping, got {self.meta!r}")

    @classmethod
    def from_dict(cls, raw: Any) -> Profile:
        where = "profile"
        if isinstance(raw, Mapping):  # a profile of another version may have other keys
            _check_version(raw.get("version"), where, "profile", PROFILE_VERSION)
        _mapping(raw, where, cls.__slots__)
        samples = tuple(
            ProfileSample.from_dict(s, f"{where}.samples[{i}]")
            for i, s in enumerate(_items(raw, "samples", where, required=True))
        )
        return cls(**_values(raw, _PROFILE_FIELDS), samples=samples, meta=raw.get("meta") or {})

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        raw = read_json(path, "profile")
        try:
            return cls.from_dict(raw)
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        data = _view(self)
        data["samples"] = [s.to_dict() for s in self.samples]
        data["meta"] = dict(self.meta) or None
        return _drop_none(data)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def _check_version(version: Any, where: str, what: str, expected: int) -> None:
    if version != expected or isinstance(version, bool):
        got = "no version" if version is None else f"version {version!r}"
        raise UserError(
            f"{where}.version: this planner reads {what} version {expected}, got {got};"
            f" re-run `orchestrator {what}` to write a current one"
        )


def _check_ladder(samples: tuple[ProfileSample, ...], where: str) -> None:
    seen: set[int] = set()
    for i, s in enumerate(samples):
        if s.local_batch in seen:
            raise UserError(
                f"{where}.samples[{i}].local_batch: duplicate local batch {s.local_batch}"
            )
        seen.add(s.local_batch)
        if s.optimizer_s is not None and s.optimizer_s >= s.step_time_s:
            raise UserError(
                f"{where}.samples[{i}].optimizer_s: must be < step_time_s "
                f"({s.step_time_s:g}), got {s.optimizer_s:g}"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class AllReduceSample:
    """One measured all-reduce (``orchestrator probe-network``) of one message at one placement."""

    bytes: int
    nodes: int
    gpus_per_node: int
    seconds: float

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> AllReduceSample:
        _mapping(raw, where, cls.__slots__)
        return cls(**_values(raw, _ALLREDUCE_FIELDS))

    def to_dict(self) -> dict[str, Any]:
        return _view(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterSpec:
    """The GPUs available and the network between them (YAML, or discovered from Ray)."""

    nodes: int
    gpus_per_node: int  # on a CPU-only cluster: worker slots per node
    intra_node_GBps: float  # per GPU, one direction (NVLink3: 600 GB/s total -> 300)
    inter_node_GBps: float  # per node, one direction (one 200 Gb/s NIC -> 25)
    gpu: str | None = None
    latency_us: float = DEFAULT_LATENCY_US  # per ring step
    gpu_hour_cost: float | None = None
    link_efficiency: float = DEFAULT_LINK_EFFICIENCY  # achieved / spec bandwidth
    allreduce_samples: tuple[AllReduceSample, ...] = ()

    def __post_init__(self) -> None:
        _check(_view(self), "cluster", _CLUSTER_FIELDS)
        for i, s in enumerate(self.allreduce_samples):
            _check(_view(s), f"cluster.allreduce_samples[{i}]", _ALLREDUCE_FIELDS)

    @classmethod
    def from_dict(cls, raw: Any) -> ClusterSpec:
        where = "cluster"
        _mapping(raw, where, cls.__slots__)
        samples = tuple(
            AllReduceSample.from_dict(s, f"{where}.allreduce_samples[{i}]")
            for i, s in enumerate(_items(raw, "allreduce_samples", where, required=False))
        )
        return cls(**_values(raw, _CLUSTER_FIELDS), allreduce_samples=samples)

    def to_dict(self) -> dict[str, Any]:
        data = _view(self)
        data["allreduce_samples"] = [s.to_dict() for s in self.allreduce_samples] or None
        return _drop_none(data)

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


# ---------------------------------------------------------------------------------------------
# Outputs


@dataclass(frozen=True, slots=True, order=True)
class Placement:
    """A uniform placement: the same number of GPUs on each of `nodes` nodes."""

    nodes: int
    gpus_per_node: int

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def __str__(self) -> str:
        return f"{self.nodes}x{self.gpus_per_node}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Prediction:
    """Predicted performance of one placement and batch split."""

    placement: Placement
    local_batch: int  # micro-batch per GPU per forward/backward
    accumulation: int  # micro-batches per optimizer step
    step_time_s: float  # seconds per optimizer step
    compute_s: float  # one worker's step without communication: A * t_fb + t_opt
    comm_s: float  # one gradient all-reduce, before overlap
    data_s: float  # one worker loading one step's samples
    throughput: float  # samples/s over all GPUs
    efficiency: float  # throughput / (gpus x the best one GPU does at a batch <= global_batch)
    statistical_efficiency: float  # (B_noise + B0) / (B_noise + global_batch); 1 without B_noise
    goodput: float  # throughput x statistical_efficiency
    fits_memory: bool  # False: the requested local batch was split into accumulation
    bound: str  # "compute", "communication" or "data"
    time_to_finish_s: float | None = None  # total_samples / goodput
    cost: float | None = None  # time_to_finish x gpus x gpu_hour_cost

    @property
    def nodes(self) -> int:
        return self.placement.nodes

    @property
    def gpus_per_node(self) -> int:
        return self.placement.gpus_per_node

    @property
    def gpus(self) -> int:
        return self.placement.gpus

    @property
    def global_batch(self) -> int:
        return self.local_batch * self.accumulation * self.gpus

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "nodes": self.nodes,
            "gpus_per_node": self.gpus_per_node,
            "gpus": self.gpus,
            "global_batch": self.global_batch,
        }
        data.update({k: getattr(self, k) for k in self.__slots__ if k != "placement"})
        return data

    @classmethod
    def from_dict(cls, raw: Any, where: str = "prediction") -> Prediction:
        derived = ("nodes", "gpus_per_node", "gpus", "global_batch")
        _mapping(raw, where, (*derived, *cls.__slots__))
        values = {k: raw.get(k) for k in cls.__slots__ if k != "placement"}
        optional = ("time_to_finish_s", "cost")
        missing = [k for k, v in values.items() if v is None and k not in optional]
        if missing:
            raise UserError(f"{where}.{missing[0]}: required field is missing")
        placement = Placement(
            _number(raw, "nodes", where, integer=True),
            _number(raw, "gpus_per_node", where, integer=True),
        )
        return cls(placement=placement, **values)


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """One row of a plan's table: the best batch split at one placement, and why it lost."""

    prediction: Prediction
    reason: str | None = None  # why the planner could not choose it; None when it could

    @property
    def eligible(self) -> bool:
        return self.reason is None

    def to_dict(self) -> dict[str, Any]:
        return {**self.prediction.to_dict(), "reason": self.reason}

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> Candidate:
        if not isinstance(raw, Mapping):
            raise UserError(f"{where}: expected a mapping, got {type(raw).__name__}")
        rest = {k: v for k, v in raw.items() if k != "reason"}
        return cls(prediction=Prediction.from_dict(rest, where), reason=raw.get("reason"))


# Plan JSON: the inputs it was planned under, then a summary of the choice (read back, ignored).
_PLAN_INPUTS = ("version", "model", "gpu", "objective", "explanation", "min_efficiency",
                "global_batch", "total_samples", "deadline_s", "budget")
_PLAN_SUMMARY = ("workers", "step_time_s", "throughput", "efficiency", "time_to_finish_s", "cost")


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """The planner's choice, the table it chose from, and one sentence saying why."""

    model: str
    gpu: str | None
    objective: str
    choice: Prediction
    candidates: tuple[Candidate, ...]
    explanation: str
    min_efficiency: float
    global_batch: int | None = None
    total_samples: int | None = None
    deadline_s: float | None = None
    budget: float | None = None
    version: int = PLAN_VERSION

    @property
    def workers(self) -> int:
        return self.choice.gpus

    @property
    def step_time_s(self) -> float:
        return self.choice.step_time_s

    @property
    def throughput(self) -> float:
        return self.choice.throughput

    @property
    def efficiency(self) -> float:
        return self.choice.efficiency

    @property
    def time_to_finish_s(self) -> float | None:
        return self.choice.time_to_finish_s

    @property
    def cost(self) -> float | None:
        return self.choice.cost

    def to_dict(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in _PLAN_INPUTS}
        data.update({k: getattr(self, k) for k in _PLAN_SUMMARY})
        data["choice"] = self.choice.to_dict()
        data["candidates"] = [c.to_dict() for c in self.candidates]
        return data

    @classmethod
    def from_dict(cls, raw: Any) -> Plan:
        where = "plan"
        if isinstance(raw, Mapping):
            _check_version(raw.get("version"), where, "plan", PLAN_VERSION)
        _mapping(raw, where, (*_PLAN_INPUTS, *_PLAN_SUMMARY, "choice", "candidates"))
        return cls(
            **{k: raw.get(k) for k in _PLAN_INPUTS},
            choice=Prediction.from_dict(raw.get("choice"), f"{where}.choice"),
            candidates=tuple(
                Candidate.from_dict(c, f"{where}.candidates[{i}]")
                for i, c in enumerate(_items(raw, "candidates", where, required=True))
            ),
        )

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        raw = read_json(path, "plan")
        try:
            return cls.from_dict(raw)
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def best_per_gpu_count(self) -> list[Candidate]:
        """The highest-throughput candidate at each GPU count, by count (for tables and plots)."""
        best: dict[int, Candidate] = {}
        for c in self.candidates:
            held = best.get(c.prediction.gpus)
            if held is None or c.prediction.throughput > held.prediction.throughput:
                best[c.prediction.gpus] = c
        return [best[n] for n in sorted(best)]


# ---------------------------------------------------------------------------------------------
# The model


class _Curve:
    """Seconds as a function of batch size, fitted over the profiled ladder (see module doc)."""

    def __init__(self, xs: list[float], ys: list[float]) -> None:
        self.xs, self.ys = xs, ys
        n = len(xs)
        if n < 2:
            self.slope = ys[0] / xs[0]
            return
        mx, my = sum(xs) / n, sum(ys) / n
        var = sum((x - mx) ** 2 for x in xs)
        self.slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var

    def __call__(self, x: float) -> float:
        xs, ys = self.xs, self.ys
        if x >= xs[-1]:
            return ys[-1] * x / xs[-1]
        if x <= xs[0]:
            line = ys[0] + self.slope * (x - xs[0])
            return min(ys[0], max(ys[0] * x / xs[0], line))
        i = bisect.bisect_left(xs, x)
        w = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
        return ys[i - 1] + w * (ys[i] - ys[i - 1])


class _AllReduceTable:
    """Measured all-reduce seconds by message size for one placement."""

    def __init__(self, samples: list[AllReduceSample]) -> None:
        by_size: dict[int, list[float]] = {}
        for s in samples:
            by_size.setdefault(s.bytes, []).append(s.seconds)
        sizes = sorted(by_size)
        self.log_bytes = [math.log(b) for b in sizes]
        self.bytes = sizes
        medians = [sorted(by_size[b])[len(by_size[b]) // 2] for b in sizes]
        # A larger message is never faster; noise (often on the smallest, first-measured sizes)
        # says otherwise, so each size takes the least time seen at it or any larger size.
        self.seconds = [min(medians[i:]) for i in range(len(medians))]

    def __call__(self, nbytes: float) -> float:
        if nbytes <= self.bytes[0]:
            return self.seconds[0]
        if nbytes >= self.bytes[-1]:
            return self.seconds[-1] * nbytes / self.bytes[-1]
        x = math.log(nbytes)
        i = bisect.bisect_left(self.log_bytes, x)
        w = (x - self.log_bytes[i - 1]) / (self.log_bytes[i] - self.log_bytes[i - 1])
        return self.seconds[i - 1] + w * (self.seconds[i] - self.seconds[i - 1])


@dataclass(frozen=True, slots=True)
class _Step:
    step_s: float
    compute_s: float
    comm_s: float
    data_s: float
    bound: str


def _optimizer_s(ladder: list[ProfileSample]) -> float:
    """The per-step time that neither scales with the batch nor overlaps communication: measured
    optimizer time, else step minus forward+backward, else 0. It does not depend on the batch, so
    the median over the ladder rejects a noisy rung."""
    if all(s.optimizer_s is not None for s in ladder):
        rest = [s.optimizer_s for s in ladder]
    elif all(s.fwd_bwd_s is not None for s in ladder):
        rest = [max(s.step_time_s - s.fwd_bwd_s, 0.0) for s in ladder]
    else:
        return 0.0
    return sorted(rest)[len(rest) // 2]


class _Model:
    """The profile and cluster turned into fast callables; built once per predict/plan call."""

    def __init__(self, profile: Profile, cluster: ClusterSpec) -> None:
        self.profile, self.cluster = profile, cluster
        ladder = sorted(profile.samples, key=lambda s: s.local_batch)
        xs = [float(s.local_batch) for s in ladder]
        self.step_curve = _Curve(xs, [s.step_time_s for s in ladder])
        self.optimizer_s = _optimizer_s(ladder)
        grouped: dict[tuple[int, int], list[AllReduceSample]] = {}
        for s in cluster.allreduce_samples:
            grouped.setdefault((s.nodes, s.gpus_per_node), []).append(s)
        self.tables = {k: _AllReduceTable(v) for k, v in grouped.items()}
        self.comm_cache: dict[Placement, float] = {}
        self.single_cache: dict[tuple[int, int], float] = {}
        self.reference_cache: dict[int, float] = {}

    def batch_options(self) -> list[int]:
        """Local batches to try without a global batch: the profiled ones that fit, and the max."""
        fit = self.profile.max_local_batch
        return sorted({s.local_batch for s in self.profile.samples if s.local_batch <= fit} | {fit})

    def single(self, micro: int, accum: int) -> float:
        """One GPU's samples/s at this micro-batch and accumulation."""
        rate = self.single_cache.get((micro, accum))
        if rate is None:
            rate = micro * accum / self.step(Placement(1, 1), micro, accum).step_s
            self.single_cache[(micro, accum)] = rate
        return rate

    def reference(self, global_batch: int) -> float:
        """The best one GPU does on a batch no larger than `global_batch` (with accumulation, the
        very same batch): the baseline of scaling efficiency."""
        rate = self.reference_cache.get(global_batch)
        if rate is None:
            rates = [self.single(b, 1) for b in self.batch_options() if b <= global_batch]
            split = split_local_batch(global_batch, self.profile.max_local_batch)
            rates.append(self.single(*split))
            rate = self.reference_cache[global_batch] = max(rates)
        return rate

    def fwd_bwd(self, batch: int) -> float:
        return max(self.step_curve(batch) - self.optimizer_s, 0.0)

    def comm(self, placement: Placement) -> float:
        cached = self.comm_cache.get(placement)
        if cached is None:
            cached = self.comm_cache[placement] = self._comm(placement)
        return cached

    def _comm(self, placement: Placement) -> float:
        size = self.profile.grad_bytes
        if placement.gpus == 1 or size == 0:
            return 0.0
        buckets = math.ceil(size / DDP_BUCKET_BYTES)
        table = self.tables.get((placement.nodes, placement.gpus_per_node))
        if table is not None:
            return buckets * table(size / buckets)
        return ring_allreduce_s(
            self.cluster, nodes=placement.nodes, gpus_per_node=placement.gpus_per_node,
            nbytes=size, messages=buckets,
        )

    def step(self, placement: Placement, micro: int, accum: int) -> _Step:
        t_fb = self.fwd_bwd(micro)
        t_bwd = BACKWARD_FRACTION * t_fb
        comm = self.comm(placement)
        compute = accum * t_fb + self.optimizer_s
        step = compute
        if comm:
            step += (t_bwd**OVERLAP_GAMMA + comm**OVERLAP_GAMMA) ** (1 / OVERLAP_GAMMA) - t_bwd
        rate = self.profile.data_samples_per_s
        data = micro * accum / rate if rate else 0.0
        if data > step:
            return _Step(data, compute, comm, data, "data")
        return _Step(step, compute, comm, data, "communication" if comm > t_bwd else "compute")

    def statistical_efficiency(self, global_batch: int, reference_batch: int) -> float:
        noise = self.profile.gradient_noise_scale
        if noise is None:
            return 1.0
        return (noise + reference_batch) / (noise + global_batch)

    def predict(
        self, placement: Placement, micro: int, accum: int, *,
        fits: bool, total_samples: int | None, reference_batch: int,
    ) -> Prediction:
        s = self.step(placement, micro, accum)
        throughput = placement.gpus * micro * accum / s.step_s
        stat = self.statistical_efficiency(placement.gpus * micro * accum, reference_batch)
        goodput = throughput * stat
        finish = total_samples / goodput if total_samples else None
        price = self.cluster.gpu_hour_cost
        cost = None if finish is None or price is None else finish / 3600 * placement.gpus * price
        reference = max(self.reference(placement.gpus * micro * accum), self.single(micro, accum))
        return Prediction(
            placement=placement, local_batch=micro, accumulation=accum, step_time_s=s.step_s,
            compute_s=s.compute_s, comm_s=s.comm_s, data_s=s.data_s, throughput=throughput,
            efficiency=throughput / (placement.gpus * reference),
            statistical_efficiency=stat, goodput=goodput, fits_memory=fits, bound=s.bound,
            time_to_finish_s=finish, cost=cost,
        )


def ring_allreduce_s(
    cluster: ClusterSpec, *, nodes: int, gpus_per_node: int, nbytes: float, messages: int = 1
) -> float:
    """Seconds to all-reduce `nbytes` split into `messages` all-reduces, from the spec figures."""
    g, n = gpus_per_node, nodes
    intra = cluster.intra_node_GBps * cluster.link_efficiency * 1e9
    inter = cluster.inter_node_GBps * cluster.link_efficiency * 1e9
    seconds = 2 * (g - 1) / g * nbytes / intra + 2 * (n - 1) / n * nbytes / inter
    hops = 2 * (g - 1) + 2 * (n - 1)
    return seconds + messages * hops * cluster.latency_us * 1e-6


def split_local_batch(per_gpu: int, max_local_batch: int) -> tuple[int, int]:
    """(micro-batch, accumulation) for `per_gpu` samples per step: the largest micro-batch that
    fits in memory and divides `per_gpu` exactly, so every step sees the same batch."""
    if per_gpu <= max_local_batch:
        return per_gpu, 1
    for accum in range(math.ceil(per_gpu / max_local_batch), per_gpu + 1):
        if per_gpu % accum == 0:
            return per_gpu // accum, accum
    raise AssertionError("unreachable: accumulation = per_gpu always divides")


def placement_for(cluster: ClusterSpec, workers: int) -> Placement:
    """The uniform placement of `workers` on the fewest nodes of `cluster` (for ``workers: N``)."""
    if workers <= 0 or workers > cluster.gpus:
        raise UserError(
            f"resources.workers: must be between 1 and the cluster's {cluster.gpus} GPUs, "
            f"got {workers}"
        )
    for nodes in range(math.ceil(workers / cluster.gpus_per_node), cluster.nodes + 1):
        if workers % nodes == 0 and workers // nodes <= cluster.gpus_per_node:
            return Placement(nodes, workers // nodes)
    raise UserError(
        f"resources.workers: {workers} workers cannot be spread evenly over "
        f"{cluster.nodes} nodes of {cluster.gpus_per_node} GPUs"
    )


def placements(cluster: ClusterSpec, *, max_gpus: int | None = None) -> list[Placement]:
    """Every uniform placement of the cluster: nodes 1..N x GPUs per node 1..G."""
    limit = cluster.gpus if max_gpus is None else max_gpus
    return [
        Placement(n, g)
        for n in range(1, cluster.nodes + 1)
        for g in range(1, cluster.gpus_per_node + 1)
        if n * g <= limit
    ]


def predict(
    profile: Profile,
    cluster: ClusterSpec,
    *,
    nodes: int,
    gpus_per_node: int,
    local_batch: int,
    accumulation: int = 1,
    total_samples: int | None = None,
    reference_batch: int | None = None,
) -> Prediction:
    """Predict one placement.

    A local batch above the profile's max_local_batch is split into accumulation (the prediction
    says so: fits_memory=False, and its own local_batch and accumulation). reference_batch, B0 of
    the statistical efficiency, defaults to max_local_batch; total_samples gives time and cost.
    """
    args = {"nodes": nodes, "gpus_per_node": gpus_per_node, "local_batch": local_batch,
            "accumulation": accumulation}
    for name in args:
        _number(args, name, "predict", integer=True)
    _number({"total_samples": total_samples}, "total_samples", "predict", default=None)
    model = _Model(profile, cluster)
    micro, extra = split_local_batch(local_batch, profile.max_local_batch)
    return model.predict(
        Placement(nodes, gpus_per_node), micro, accumulation * extra,
        fits=extra == 1, total_samples=total_samples,
        reference_batch=reference_batch or profile.max_local_batch,
    )


# ---------------------------------------------------------------------------------------------
# The planner


@dataclass(frozen=True, slots=True, kw_only=True)
class _Goal:
    objective: str
    min_efficiency: float
    global_batch: int | None
    total_samples: int | None
    deadline_s: float | None
    budget: float | None

    def score(self, p: Prediction) -> float:
        """Higher is better."""
        if self.objective == "max_throughput":
            return p.throughput
        if self.objective == "max_goodput":
            return p.goodput
        return -p.gpus / p.goodput  # GPU-seconds per reference sample: cost without a price

    def reason(self, p: Prediction) -> str | None:
        """Why `p` breaks a constraint, or None."""
        if self.objective == "max_throughput" and p.efficiency < self.min_efficiency:
            return f"efficiency {p.efficiency:.3f} < {self.min_efficiency:.3g}"
        if self.deadline_s is not None and p.time_to_finish_s > self.deadline_s:
            return (f"finishes in {_duration(p.time_to_finish_s)} > "
                    f"deadline {_duration(self.deadline_s)}")
        if self.budget is not None and p.cost > self.budget:
            return f"costs {p.cost:,.2f} > budget {self.budget:,.2f}"
        return None


def _check_goal(goal: _Goal, cluster: ClusterSpec, max_gpus: int | None) -> None:
    if goal.objective not in OBJECTIVES:
        raise UserError(
            f"objective: must be one of {', '.join(OBJECTIVES)}, got {goal.objective!r}"
        )
    values = {"min_efficiency": goal.min_efficiency, "global_batch": goal.global_batch,
              "total_samples": goal.total_samples, "deadline_s": goal.deadline_s,
              "budget": goal.budget, "max_gpus": max_gpus}
    _number(values, "min_efficiency", "plan", high=1.0)
    for name in ("global_batch", "total_samples", "max_gpus"):
        _number(values, name, "plan", integer=True, default=None)
    for name in ("deadline_s", "budget"):
        _number(values, name, "plan", default=None)
    if (goal.deadline_s is not None or goal.budget is not None) and goal.total_samples is None:
        raise UserError(
            "plan.total_samples: required with a deadline or budget (from epochs or max_steps)"
        )
    if goal.budget is not None and cluster.gpu_hour_cost is None:
        raise UserError("cluster.gpu_hour_cost: required with a budget")


def _options(
    model: _Model, placement: Placement, global_batch: int | None
) -> list[tuple[int, int]]:
    """(micro-batch, accumulation) pairs to try at one placement. With a global batch, the one
    split that keeps it exact (none when it does not divide over the GPUs: rounding would change
    the batch the user tuned); without, each profiled local batch that fits, no accumulation
    (accumulating only to grow the batch buys throughput with statistical efficiency)."""
    fit = model.profile.max_local_batch
    if global_batch is None:
        return [(b, 1) for b in model.batch_options()]
    if global_batch % placement.gpus:
        return []
    return [split_local_batch(global_batch // placement.gpus, fit)]


def _best_at(
    model: _Model, goal: _Goal, placement: Placement, reference_batch: int
) -> Candidate | None:
    best: tuple[tuple[bool, float], Candidate] | None = None
    for micro, accum in _options(model, placement, goal.global_batch):
        p = model.predict(placement, micro, accum, fits=True,
                          total_samples=goal.total_samples, reference_batch=reference_batch)
        reason = goal.reason(p)
        key = (reason is None, goal.score(p))
        if best is None or key > best[0]:
            best = (key, Candidate(prediction=p, reason=reason))
    return None if best is None else best[1]


def _choose(goal: _Goal, eligible: list[Candidate]) -> Candidate:
    # Ties go to fewer GPUs, then fewer nodes: the same result for less hardware.
    def key(c: Candidate) -> tuple[float, int, int]:
        return (goal.score(c.prediction), -c.prediction.gpus, -c.prediction.nodes)

    if goal.objective != "min_cost":
        return max(eligible, key=key)
    # Scores are negative GPU-seconds per sample: within the tolerance means >= best * (1 + tol).
    cheapest = max(goal.score(c.prediction) for c in eligible)
    near = [c for c in eligible if goal.score(c.prediction) >= cheapest * (1 + COST_TIE_TOLERANCE)]
    return max(near, key=lambda c: (c.prediction.goodput, -c.prediction.gpus))


def plan(
    profile: Profile,
    cluster: ClusterSpec,
    *,
    objective: str = "max_throughput",
    min_efficiency: float = 0.8,
    global_batch: int | None = None,
    total_samples: int | None = None,
    deadline_s: float | None = None,
    budget: float | None = None,
    max_gpus: int | None = None,
) -> Plan:
    """Choose placement, local batch and accumulation over every uniform placement of `cluster`.

    max_throughput: the most samples/s with scaling efficiency >= min_efficiency (the only
    objective min_efficiency applies to).
    min_cost: the fewest GPU-hours per sample (cost with a price), fastest among near-ties.
    max_goodput: the most samples/s x statistical efficiency.
    deadline_s and budget (both need total_samples, the samples to train at the reference batch)
    constrain every objective; max_gpus caps the GPU count. With global_batch, every candidate
    keeps it exactly (GPU counts it does not divide are left out); without, each placement tries
    every profiled local batch that fits, without accumulation. The candidate table holds the
    best split at each placement, with the reason it could not be chosen, if any.
    """
    goal = _Goal(objective=objective, min_efficiency=min_efficiency, global_batch=global_batch,
                 total_samples=total_samples, deadline_s=deadline_s, budget=budget)
    _check_goal(goal, cluster, max_gpus)
    model = _Model(profile, cluster)
    reference_batch = global_batch or profile.max_local_batch
    candidates = [
        c for pl in placements(cluster, max_gpus=max_gpus)
        if (c := _best_at(model, goal, pl, reference_batch)) is not None
    ]
    if not candidates:
        raise UserError(
            f"plan.global_batch: {global_batch} does not divide over any GPU count up to "
            f"{max_gpus or cluster.gpus}"
        )
    eligible = [c for c in candidates if c.eligible]
    if not eligible:
        raise UserError(_infeasible(goal, candidates))
    choice = _choose(goal, eligible)
    return Plan(
        model=profile.model, gpu=cluster.gpu, objective=objective, choice=choice.prediction,
        candidates=tuple(candidates), explanation=_explain(goal, choice, candidates),
        min_efficiency=min_efficiency, global_batch=global_batch, total_samples=total_samples,
        deadline_s=deadline_s, budget=budget,
    )


def _infeasible(goal: _Goal, candidates: list[Candidate]) -> str:
    fastest = min(candidates, key=lambda c: c.prediction.time_to_finish_s or math.inf).prediction
    if goal.deadline_s is not None and fastest.time_to_finish_s > goal.deadline_s:
        return (f"deadline: no placement finishes within {_duration(goal.deadline_s)}; the fastest "
                f"({fastest.gpus} GPUs) needs {_duration(fastest.time_to_finish_s)}")
    cheapest = min(candidates, key=lambda c: c.prediction.cost or math.inf).prediction
    if goal.budget is not None and cheapest.cost > goal.budget:
        return (f"budget: no placement fits within {goal.budget:,.2f}; the cheapest "
                f"({cheapest.gpus} GPUs) costs {cheapest.cost:,.2f}")
    return "plan: no placement meets the deadline and the budget together; relax one of them"


def _explain(goal: _Goal, choice: Candidate, candidates: list[Candidate]) -> str:
    p = choice.prediction
    what = (f"Chose {p.gpus} GPU{'s' if p.gpus > 1 else ''} ({p.placement}), local batch "
            f"{p.local_batch} x {p.accumulation} accumulation")
    if goal.objective == "max_throughput":
        why = (f"the highest predicted throughput ({p.throughput:,.0f} samples/s) at scaling "
               f"efficiency {p.efficiency:.2f} >= {goal.min_efficiency:.2f}")
    elif goal.objective == "max_goodput":
        why = (f"the highest predicted goodput ({p.goodput:,.0f} samples/s at statistical "
               f"efficiency {p.statistical_efficiency:.2f}, scaling efficiency {p.efficiency:.2f})")
    else:
        price = (f"{p.cost:,.2f}" if p.cost is not None
                 else f"{p.gpus / p.goodput * 1e6 / 3600:.3g} GPU-hours per million samples")
        why = f"the lowest predicted cost ({price})"
    if goal.deadline_s is not None:
        why += (f", done in {_duration(p.time_to_finish_s)} within the "
                f"{_duration(goal.deadline_s)} deadline")
    return f"{what}: {why}{_runner_up(choice, candidates)}."


def _runner_up(choice: Candidate, candidates: list[Candidate]) -> str:
    """What the next larger GPU count would have given, when the planner passed it over."""
    gpus = choice.prediction.gpus
    larger = [c for c in candidates if c.prediction.gpus > gpus and not c.eligible]
    if not larger:
        return ""
    nxt = min(larger, key=lambda c: (c.prediction.gpus, -c.prediction.throughput))
    return f"; at {nxt.prediction.gpus} GPUs, {nxt.reason}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------------------------------------
# Online re-planning: refit the network from an observed step, then decide whether to resize


# Bounds on the refit's scale of communication time: an observation further off than this says
# something other than the network is wrong (a straggler, a mis-profiled device).
REFIT_SCALE_LIMITS = (1e-6, 1e6)


@dataclass(frozen=True, slots=True, kw_only=True)
class Refit:
    """The cluster's network figures scaled so that `predict` matches an observed step time."""

    cluster: ClusterSpec
    scale: float  # communication time, refit / before (1: nothing to learn, e.g. one worker)
    placement: Placement
    observed_step_s: float
    predicted: Prediction  # at the observed placement, before the refit
    comm_s: float  # the all-reduce time (before overlap) that explains the observation

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "placement": str(self.placement), "observed_step_s": self.observed_step_s,
                "predicted_step_s": self.predicted.step_time_s, "predicted_comm_s": self.predicted.comm_s,
                "refit_comm_s": self.comm_s}


def scale_network(cluster: ClusterSpec, factor: float) -> ClusterSpec:
    """`cluster` with every communication time multiplied by `factor` (bandwidths divided,
    latency and measured all-reduce samples multiplied), so ring and table predictions alike
    scale by exactly that factor at every placement."""
    if not factor > 0:
        raise UserError(f"scale_network.factor: must be > 0, got {factor}")
    return replace(
        cluster,
        intra_node_GBps=cluster.intra_node_GBps / factor,
        inter_node_GBps=cluster.inter_node_GBps / factor,
        latency_us=cluster.latency_us * factor,
        allreduce_samples=tuple(replace(s, seconds=s.seconds * factor) for s in cluster.allreduce_samples),
    )


def refit_network(
    profile: Profile,
    cluster: ClusterSpec,
    *,
    placement: Placement,
    local_batch: int,
    accumulation: int = 1,
    observed_step_s: float,
) -> Refit:
    """Refit the network term from one observed step time at the actual placement.

    The compute terms come from the profile and stay; the overlap formula is solved for the
    all-reduce time t_c that yields the observation,
        t_c = ((observed - compute + t_bwd)^gamma - t_bwd^gamma)^(1/gamma),
    and every network figure is scaled by t_c / predicted t_c (within ``REFIT_SCALE_LIMITS``), so
    ``predict`` on the returned cluster matches the observation here and the plan elsewhere moves
    with it. One worker has no all-reduce: nothing to learn, scale 1. An observation faster than
    compute alone means communication is fully hidden: the lower limit.
    """
    _number({"observed_step_s": observed_step_s}, "observed_step_s", "refit_network")
    model = _Model(profile, cluster)
    micro, extra = split_local_batch(local_batch, profile.max_local_batch)
    accum = accumulation * extra
    predicted = model.predict(placement, micro, accum, fits=extra == 1, total_samples=None,
                              reference_batch=profile.max_local_batch)
    comm = model.comm(placement)
    if comm == 0:
        return Refit(cluster=cluster, scale=1.0, placement=placement, observed_step_s=observed_step_s,
                     predicted=predicted, comm_s=0.0)
    t_fb = model.fwd_bwd(micro)
    t_bwd = BACKWARD_FRACTION * t_fb
    overlapped = max(observed_step_s - (accum * t_fb + model.optimizer_s) + t_bwd, t_bwd)
    observed_comm = (overlapped**OVERLAP_GAMMA - t_bwd**OVERLAP_GAMMA) ** (1 / OVERLAP_GAMMA)
    low, high = REFIT_SCALE_LIMITS
    scale = min(max(observed_comm / comm, low), high)
    return Refit(cluster=scale_network(cluster, scale), scale=scale, placement=placement,
                 observed_step_s=observed_step_s, predicted=predicted, comm_s=comm * scale)


@dataclass(frozen=True, slots=True, kw_only=True)
class ResizeDecision:
    """Keep the running worker count or resize to another, and why (one sentence)."""

    workers: int  # the count to run from here on (the current one when keeping)
    current: Prediction  # at the running placement, on the refit cluster
    proposed: Prediction  # the refit plan's choice within the allowed range
    gain: float  # relative improvement of the objective, proposed over current
    saved_s: float  # seconds (GPU-seconds for min_cost) saved over the remaining samples, net of the restart
    reason: str

    @property
    def resize(self) -> bool:
        return self.workers != self.current.gpus

    def to_dict(self) -> dict[str, Any]:
        return {"workers": self.workers, "resize": self.resize, "current_workers": self.current.gpus,
                "proposed_workers": self.proposed.gpus, "current_step_time_s": self.current.step_time_s,
                "proposed_step_time_s": self.proposed.step_time_s, "gain": self.gain,
                "saved_s": self.saved_s, "reason": self.reason}


def decide_resize(
    profile: Profile,
    cluster: ClusterSpec,
    *,
    current: Placement,
    min_workers: int,
    max_workers: int,
    global_batch: int,
    remaining_samples: int,
    objective: str = "max_throughput",
    min_efficiency: float = 0.8,
    margin: float = 0.1,
    restart_cost_s: float = 0.0,
) -> ResizeDecision:
    """Re-plan on a (refit) cluster within [min_workers, max_workers] and decide whether moving
    from the `current` placement pays: the objective must improve by more than `margin`, and the
    time saved over `remaining_samples` (GPU-time for min_cost) must exceed a restart."""
    now = predict(profile, cluster, nodes=current.nodes, gpus_per_node=current.gpus_per_node,
                  local_batch=max(global_batch // current.gpus, 1), reference_batch=global_batch)
    goal = _Goal(objective=objective, min_efficiency=min_efficiency, global_batch=global_batch,
                 total_samples=None, deadline_s=None, budget=None)
    try:
        table = plan(profile, cluster, objective=objective, min_efficiency=min_efficiency,
                     global_batch=global_batch, max_gpus=max_workers).candidates
    except UserError as exc:
        return _keep(now, f"keep {_workers(current.gpus)}: the refit plan has no choice ({exc})")
    allowed = [c for c in table if c.eligible and min_workers <= c.prediction.gpus <= max_workers]
    if not allowed:
        return _keep(now, f"keep {_workers(current.gpus)}: no placement of {min_workers}-{max_workers} "
                          f"workers meets the objective on the refit network")
    new = _choose(goal, allowed).prediction
    gain = (goal.score(new) - goal.score(now)) / abs(goal.score(now))
    saved = _remaining_cost(now, remaining_samples, objective) - _remaining_cost(new, remaining_samples, objective)
    saved -= restart_cost_s * (new.gpus if objective == "min_cost" else 1)
    if new.gpus == current.gpus:
        return _keep(now, f"keep {_workers(current.gpus)}: the refit plan chooses the same count", new)
    change = (f"{_workers(new.gpus)} would give {gain:+.0%} {objective} ({new.throughput:,.0f} vs "
              f"{now.throughput:,.0f} samples/s on the refit network)")
    keep = f"keep {_workers(current.gpus)}: {change}"
    if gain <= margin:
        return _keep(now, f"{keep}, within the {margin:.0%} margin", new, gain, saved)
    if saved <= 0:
        return _keep(now, f"{keep}, but over the remaining {remaining_samples:,} samples that does not "
                          f"repay a {restart_cost_s:g} s restart", new, gain, saved)
    unit = "GPU-s" if objective == "min_cost" else "s"
    return ResizeDecision(workers=new.gpus, current=now, proposed=new, gain=gain, saved_s=saved,
                          reason=f"resize {current.gpus} -> {_workers(new.gpus)}: {change}, saving "
                                 f"{saved:,.1f} {unit} net of a {restart_cost_s:g} s restart")


def _keep(now: Prediction, reason: str, proposed: Prediction | None = None, gain: float = 0.0,
          saved: float = 0.0) -> ResizeDecision:
    return ResizeDecision(workers=now.gpus, current=now, proposed=proposed or now, gain=gain, saved_s=saved,
                          reason=reason)


def _workers(n: int) -> str:
    return f"{n} worker{'s' if n != 1 else ''}"


def _remaining_cost(p: Prediction, samples: int, objective: str) -> float:
    """Seconds to train `samples` at this prediction (GPU-seconds for min_cost)."""
    rate = p.goodput if objective == "max_goodput" else p.throughput
    return samples / rate * (p.gpus if objective == "min_cost" else 1)
