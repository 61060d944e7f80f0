"""The planner's outputs: a placement, the prediction there (with its interval), a plan."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from orchestrator.planner.base import Document, Model, NonNegativeFloat, PositiveFloat, PositiveInt, Text
from orchestrator.planner.types import check_version

PLAN_VERSION = 2  # 2: predictions carry an interval, plans their assumptions


class Placement(Model):
    """A uniform placement: the same number of GPUs on each of `nodes` nodes."""

    where = "placement"
    nodes: PositiveInt
    gpus_per_node: PositiveInt

    def __init__(self, *args: int, **data: Any) -> None:
        data.update(zip(("nodes", "gpus_per_node"), args))  # Placement(2, 4) reads naturally
        super().__init__(**data)

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def __str__(self) -> str:
        return f"{self.nodes}x{self.gpus_per_node}"


_DERIVED = ("nodes", "gpus_per_node", "gpus", "global_batch")


class Prediction(Model):
    """Predicted performance of one placement and batch split. The low/high ends bound an ~80 %
    interval: from the calibration's residuals, or the link kinds' prior widths without one."""

    where = "prediction"
    placement: Placement
    local_batch: PositiveInt  # micro-batch per GPU per forward/backward
    accumulation: PositiveInt  # micro-batches per optimizer step
    step_time_s: PositiveFloat  # seconds per optimizer step
    step_time_low_s: PositiveFloat
    step_time_high_s: PositiveFloat
    compute_s: PositiveFloat  # one worker's step without communication (node contention included)
    comm_s: NonNegativeFloat  # the step's gradient all-reduces, before overlap
    exposed_comm_s: NonNegativeFloat  # the part of comm_s backward does not hide
    data_s: NonNegativeFloat  # one worker loading one step's samples
    throughput: PositiveFloat  # samples/s over all GPUs
    throughput_low: PositiveFloat
    throughput_high: PositiveFloat
    efficiency: PositiveFloat  # throughput / (gpus x the best one GPU does at a batch <= global_batch)
    efficiency_low: PositiveFloat  # with the network at the interval's slow end
    efficiency_high: PositiveFloat
    statistical_efficiency: PositiveFloat  # (B_noise + B0) / (B_noise + global_batch); 1 without B_noise
    goodput: PositiveFloat  # throughput x statistical_efficiency
    fits_memory: bool  # False: the requested local batch was split into accumulation
    bound: Literal["compute", "communication", "data"]
    time_to_finish_s: PositiveFloat | None = None  # total_samples / goodput
    cost: NonNegativeFloat | None = None  # USD: time_to_finish x gpus x gpu_hour_cost

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
        data: dict[str, Any] = {"nodes": self.nodes, "gpus_per_node": self.gpus_per_node, "gpus": self.gpus,
                                "global_batch": self.global_batch}
        data.update({k: getattr(self, k) for k in type(self).model_fields if k != "placement"})
        return data

    @classmethod
    def from_dict(cls, raw: Any, where: str | None = None) -> Prediction:
        if isinstance(raw, dict) and "placement" not in raw:
            rest = {k: v for k, v in raw.items() if k not in _DERIVED}
            raw = {**rest, "placement": {k: raw.get(k) for k in ("nodes", "gpus_per_node")}}
        return super().from_dict(raw, where)


class Candidate(Model):
    """One row of a plan's table: the best batch split at one placement, and why it lost."""

    where = "candidate"
    prediction: Prediction
    reason: str | None = None  # why the planner could not choose it; None when it could

    @property
    def eligible(self) -> bool:
        return self.reason is None

    def to_dict(self) -> dict[str, Any]:
        return {**self.prediction.to_dict(), "reason": self.reason}

    @classmethod
    def from_dict(cls, raw: Any, where: str | None = None) -> Candidate:
        if isinstance(raw, dict):
            rest = {k: v for k, v in raw.items() if k != "reason"}
            return cls(prediction=Prediction.from_dict(rest, where), reason=raw.get("reason"))
        return super().from_dict(raw, where)


# Plan JSON: the inputs it was planned under, then a summary of the choice (read back, ignored).
_PLAN_SUMMARY = ("workers", "step_time_s", "throughput", "efficiency", "time_to_finish_s", "cost")


class Plan(Document):
    """The planner's choice, the table it chose from, why, and what it assumed."""

    where = "plan"
    version: int = PLAN_VERSION
    model: Text
    device: Text | None = None  # where the profile was measured
    gpu: Text | None = None
    objective: Text
    explanation: Text  # why it chose: the choice and its reason, in one or two sentences
    assumptions: tuple[str, ...] = ()  # link kinds, network figures and their origin, batch policy
    warnings: tuple[str, ...] = ()
    min_efficiency: PositiveFloat
    global_batch: PositiveInt | None = None  # held at every GPU count; None: the local batch varies
    total_samples: PositiveInt | None = None
    deadline_s: PositiveFloat | None = None
    budget: PositiveFloat | None = None  # USD
    choice: Prediction
    candidates: tuple[Candidate, ...] = Field(min_length=1)

    @property
    def workers(self) -> int:
        return self.choice.gpus

    @property
    def unit(self) -> str:
        """What the plan's table and plot count: CPU workers (`gpu: cpu`, which `plan` writes for
        every CPU cluster) or GPUs."""
        return "worker" if (self.gpu or "").strip().lower() == "cpu" else "GPU"

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
        data = {k: getattr(self, k) for k in type(self).model_fields if k not in ("choice", "candidates")}
        data["assumptions"], data["warnings"] = list(self.assumptions), list(self.warnings)
        data.update({k: getattr(self, k) for k in _PLAN_SUMMARY})
        data["choice"] = self.choice.to_dict()
        data["candidates"] = [c.to_dict() for c in self.candidates]
        return data

    @classmethod
    def from_dict(cls, raw: Any, where: str | None = None) -> Plan:
        where = where or cls.where
        if not isinstance(raw, dict):
            return super().from_dict(raw, where)
        check_version(raw.get("version"), where, "plan", PLAN_VERSION)
        data = {k: v for k, v in raw.items() if k not in _PLAN_SUMMARY}
        data["choice"] = Prediction.from_dict(raw.get("choice"), f"{where}.choice")
        candidates = raw.get("candidates")
        if isinstance(candidates, list):
            data["candidates"] = tuple(Candidate.from_dict(c, f"{where}.candidates[{i}]")
                                       for i, c in enumerate(candidates))
        return super().from_dict(data, where)

    def best_per_gpu_count(self) -> list[Candidate]:
        """One candidate per GPU count, by count (for tables and plots): the choice at its count,
        elsewhere the highest-throughput eligible one, else the highest-throughput one."""
        best: dict[int, Candidate] = {}
        for c in self.candidates:
            held = best.get(c.prediction.gpus)
            if held is None or (c.eligible, c.prediction.throughput) > (held.eligible, held.prediction.throughput):
                best[c.prediction.gpus] = c
        chosen = next((c for c in self.candidates if c.prediction == self.choice), None)
        if chosen is not None:
            best[chosen.prediction.gpus] = chosen
        return [best[n] for n in sorted(best)]
