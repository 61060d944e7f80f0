"""The planner's inputs: what one worker measured (Profile), the cluster and its network
(ClusterSpec, with its Calibration), and steps observed on real runs (Observation)."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, StrictFloat, field_validator, model_validator

from orchestrator.errors import UserError
from orchestrator.planner.base import (
    MAX_GBPS,
    MAX_INTEGER,
    MAX_JITTER,
    MAX_LATENCY_US,
    MAX_RESIDUAL,
    MAX_USD_PER_GPU_HOUR,
    MIN_EFFICIENCY,
    MIN_GBPS,
    Batch,
    Bytes,
    Count,
    Document,
    Efficiency,
    FieldError,
    Latency,
    LineRate,
    Model,
    NonNegativeInt,
    PositiveFloat,
    PositiveBytes,
    PositiveInt,
    Rate,
    Seconds,
    SecondsOrZero,
    Share,
    Text,
    UtcTime,
    at_least,
    shown,
)
from orchestrator.planner.fit import LOG_RANGE
from orchestrator.planner.priors import normalize_link

PROFILE_VERSION = 1


class ProfileSample(Model):
    """One rung of the profiler's batch-size ladder."""

    where = "profile_sample"
    local_batch: Batch
    step_time_s: Seconds  # median seconds per step (forward, backward, optimizer) on one worker
    peak_memory_bytes: Bytes | None = None
    fwd_bwd_s: Seconds | None = None
    optimizer_s: SecondsOrZero | None = None


class NodeSample(Model):
    """All GPUs of one node stepping at once without gradient sync: what they contend for (the CPU
    data pipeline, PCIe, memory bandwidth) shows as a longer step than one GPU alone."""

    where = "node_sample"
    gpus_per_node: Count
    local_batch: Batch
    step_time_s: Seconds


# Bounds that keep a plan within seconds (every placement x every profiled batch is evaluated and
# each placement's best row becomes a candidate: 65,536 GPUs take ~2.5 s here). The profiler's
# doubling ladder has ~30 rungs at most; the largest data-parallel jobs run on tens of thousands.
MAX_PROFILE_SAMPLES = 256
MAX_GPUS = 65_536


class Profile(Document):
    """What one worker measured (`orchestrator profile`); JSON with a version number."""

    where = "profile"
    version: int = PROFILE_VERSION
    model: Text
    device: Text
    param_count: PositiveBytes  # at least a byte each
    grad_bytes: Bytes  # bytes DDP all-reduces per step: trainable parameters x gradient size
    samples: tuple[ProfileSample, ...] = Field(min_length=1)
    max_local_batch: Batch  # the largest local batch that fits in device memory
    data_samples_per_s: Rate | None = None  # one worker's data pipeline, alone
    # B_noise, in samples: unbounded above (an estimate near a zero true gradient is huge, and only
    # means a statistical efficiency of 1)
    gradient_noise_scale: PositiveFloat | None = None
    precision: Text | None = None
    device_memory_bytes: PositiveBytes | None = None
    node_samples: tuple[NodeSample, ...] = ()  # optional in version 1: older profiles lack it
    meta: dict[str, Any] = Field(default_factory=dict)  # free-form: config digest, OOM batch, ...

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Any:
        check_version(value, "profile", "profile", PROFILE_VERSION)
        return value

    @model_validator(mode="after")
    def _ladder(self) -> Profile:
        if len(self.samples) > MAX_PROFILE_SAMPLES:
            raise FieldError("samples", f"at most {MAX_PROFILE_SAMPLES} local batches, got {len(self.samples):,}")
        seen: set[int] = set()
        for i, s in enumerate(self.samples):
            if s.local_batch in seen:
                raise FieldError(f"samples[{i}].local_batch", f"duplicate local batch {s.local_batch}")
            seen.add(s.local_batch)
            if s.optimizer_s is not None and s.optimizer_s >= s.step_time_s:
                raise FieldError(f"samples[{i}].optimizer_s",
                                 f"must be < step_time_s ({s.step_time_s:g}), got {s.optimizer_s:g}")
        measured: set[tuple[int, int]] = set()
        for i, n in enumerate(self.node_samples):
            if (n.gpus_per_node, n.local_batch) in measured:  # which one would the model believe?
                raise FieldError(f"node_samples[{i}]", f"duplicate of gpus_per_node {n.gpus_per_node} at local "
                                                      f"batch {n.local_batch}")
            measured.add((n.gpus_per_node, n.local_batch))
        smallest = min(seen)
        if self.max_local_batch < smallest:
            raise FieldError("max_local_batch", f"must be >= the smallest profiled local_batch ({smallest}), "
                                                f"got {self.max_local_batch}")
        return self

    @model_validator(mode="after")
    def _held_batch(self) -> Profile:
        """The global batch the profile's job trains, which `plan` holds by default: one that is
        no batch is refused, not taken for none (which would let the batch vary)."""
        held = self.meta.get("global_batch_size")
        if held is None:
            return self
        if isinstance(held, bool) or not isinstance(held, int):
            raise FieldError("meta.global_batch_size", f"must be an integer, got {shown(held)}")
        if not 0 < held <= MAX_INTEGER:
            raise FieldError("meta.global_batch_size", f"must be {'> 0' if held <= 0 else '<= 2**53'}, got {shown(held)}")
        return self

    @classmethod
    def from_dict(cls, raw: Any, where: str | None = None) -> Profile:
        if isinstance(raw, dict):  # a profile of another version may have other keys: say the version
            check_version(raw.get("version"), where or cls.where, "profile", PROFILE_VERSION)
        return super().from_dict(raw, where)

    @property
    def on_cpu(self) -> bool:
        return self.device.strip().lower().startswith("cpu")


def check_version(version: Any, where: str, what: str, expected: int) -> None:
    if version != expected or isinstance(version, bool) or not isinstance(version, int):
        got = "no version" if version is None else f"version {shown(version)}"
        raise UserError(f"{where}.version: this planner reads {what} version {expected}, got {got};"
                        f" re-run `orchestrator {what}` to write a current one")


def check_gpus(nodes: int, gpus_per_node: int) -> None:
    """A placement within what the planner plans (a cluster's, or an observed step's)."""
    if nodes * gpus_per_node > MAX_GPUS:
        raise FieldError("nodes", f"{nodes:,} nodes x {gpus_per_node:,} GPUs is {nodes * gpus_per_node:,} GPUs; "
                                  f"the planner plans up to {MAX_GPUS:,}")


class AllReduceSample(Model):
    """One measured all-reduce (`orchestrator probe-network`) of one message at one placement."""

    where = "allreduce_sample"
    bytes: PositiveBytes
    nodes: Count
    gpus_per_node: Count
    seconds: Seconds


# A calibration's figures: a fit moves each within x/FIT_RANGE of where it started (fit.LOG_RANGE),
# from priors of at least MIN_EFFICIENCY of a line rate, so their bounds are that much wider.
FIT_RANGE = 1.01 * math.exp(LOG_RANGE)  # 1 % of room for rounding
Achieved = Annotated[StrictFloat, Field(gt=0, le=MAX_GBPS * FIT_RANGE),
                     at_least(MIN_GBPS * MIN_EFFICIENCY / FIT_RANGE, "1 MB/s at 0.1 % efficiency, fitted down x/1000")]
FittedLatency = Annotated[StrictFloat, Field(ge=0, le=MAX_LATENCY_US * FIT_RANGE)]
Residual = Annotated[StrictFloat, Field(ge=-MAX_RESIDUAL, le=MAX_RESIDUAL)]


class Residuals(Model):
    """Quantiles of log(observed / predicted step time): how far the calibrated model was off."""

    where = "residuals"
    low: Residual  # 10th percentile
    median: Residual
    high: Residual  # 90th percentile
    n: NonNegativeInt
    # cross-model: each model predicted by a fit without it; all-reduce: of all-reduce times, not steps
    method: Literal["in-sample", "cross-model", "all-reduce"]


class Calibration(Model):
    """The network figures fitted to a cluster's own measurements, and what they were fitted to."""

    where = "cluster.calibration"
    source: Literal["jobs", "probe-network", "published-table", "refit"]
    measured_at: UtcTime  # ISO 8601, kept as UTC
    intra_GBps: Achieved  # achieved bus bandwidth per GPU inside a node
    inter_GBps: Achieved  # achieved bus bandwidth per node between nodes
    base_latency_us: FittedLatency  # per all-reduce call
    latency_us: FittedLatency  # per ring step inside a node
    inter_latency_us: FittedLatency  # per ring step between nodes
    overlap: Share  # share of full all-reduce speed while backward runs
    # one rank's step-time spread (CV): the wait for the slowest rank
    jitter: Annotated[StrictFloat, Field(ge=0, le=MAX_JITTER)] = 0.0
    fitted: tuple[str, ...] = ()  # the parameters these observations identified
    not_fitted: dict[str, str] = Field(default_factory=dict)  # parameter -> why it kept its prior
    observations: NonNegativeInt = 0
    models: tuple[str, ...] = ()
    placements: tuple[str, ...] = ()
    residuals: Residuals | None = None
    kept_input: bool = False  # the fit did not beat the figures given; those were kept
    note: str | None = None


IntraLink = Literal["nvlink", "pcie", "pcie-host-staged", "loopback", "shared-memory"]
InterLink = Literal["infiniband", "roce", "ethernet", "loopback", "none"]


class ClusterSpec(Document):
    """The GPUs available and the network between them (YAML, discovered from Ray, or measured)."""

    where = "cluster"
    nodes: PositiveInt  # nodes x gpus_per_node is held to MAX_GPUS
    gpus_per_node: PositiveInt  # on a CPU-only cluster: worker slots per node
    intra_node_GBps: LineRate  # line rate per GPU, one direction (NVLink3: 600 GB/s total -> 300)
    inter_node_GBps: LineRate  # line rate per node, one direction (one 200 Gb/s NIC -> 25)
    gpu: Text | None = None
    intra_link: IntraLink | None = Field(None, validation_alias=AliasChoices("intra_link", "intra", "intra_node_link"))
    inter_link: InterLink | None = Field(None, validation_alias=AliasChoices("inter_link", "inter", "inter_node_link"))
    latency_us: Latency | None = None  # per ring step; default: NCCL's figures per link kind
    gpu_hour_cost: Annotated[StrictFloat, Field(ge=0, le=MAX_USD_PER_GPU_HOUR)] | None = None  # USD per GPU-hour
    link_efficiency: Efficiency | None = None  # achieved / line rate; default: the prior per link kind
    allreduce_samples: tuple[AllReduceSample, ...] = ()
    calibration: Calibration | None = None

    @field_validator("intra_link", "inter_link", mode="before")
    @classmethod
    def _link(cls, value: Any) -> Any:
        return normalize_link(value)

    @model_validator(mode="after")
    def _size(self) -> ClusterSpec:
        if max(self.nodes, self.gpus_per_node) > MAX_INTEGER:  # too many digits to multiply out in a message
            field = "nodes" if self.nodes > MAX_INTEGER else "gpus_per_node"
            raise FieldError(field, f"the planner plans up to {MAX_GPUS:,} GPUs, got {shown(getattr(self, field))}")
        check_gpus(self.nodes, self.gpus_per_node)
        if self.inter_link == "none" and self.nodes > 1:  # no link between nodes: nothing to plan across them
            raise FieldError("inter_link", f"none (no link between nodes) needs nodes: 1, got nodes: {self.nodes}; "
                                           "name the link between the nodes")
        return self

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def is_cpu(self) -> bool:
        return (self.gpu or "").strip().lower() == "cpu" or self.intra_link in ("loopback", "shared-memory")

    @property
    def unit(self) -> str:
        """What a plan's words count (its fields and keys say `gpus` either way)."""
        return "worker" if self.is_cpu else "GPU"


class Observation(Document):
    """One worker group's measured step time on a real run: what `calibrate` learns from."""

    where = "observation"
    profile: Profile
    nodes: Count
    gpus_per_node: Count
    local_batch: Batch  # per GPU per optimizer step (split into accumulation like `predict`)
    step_time_s: Seconds  # median seconds per optimizer step after warm-up
    accumulation: Batch = 1
    compute_step_time_s: Seconds | None = None  # the same steps without gradient sync, if measured
    source: str | None = None
    run_id: str | None = None

    @model_validator(mode="after")
    def _size(self) -> Observation:
        check_gpus(self.nodes, self.gpus_per_node)
        return self
