"""Performance model and planner for data-parallel training: pure functions, no Ray, no torch.

Given a single-worker profile and a cluster spec, predict the step time of DDP training at any
uniform placement (nodes x GPUs per node), with an interval, and choose the placement, local
batch and accumulation for an objective. The cluster's network is either calibrated on its own
measurements (`calibrate`, `orchestrator probe-network`) or taken from sourced priors per link
kind. Modules: `types` and `results` (pydantic models), `priors` (the sourced constants),
`network` (ring all-reduce and overlap), `model` (step times), `search` (predict, plan),
`explain` (what a plan says), `refit` (online re-planning), `io` (files). docs/planner.md
documents the model, every prior and its source, and the validation.
"""

from orchestrator.planner.base import deadline_from_hours
from orchestrator.planner.calibrate import calibrate, calibrate_allreduce
from orchestrator.planner.io import (
    OBSERVATIONS_ARTIFACT,
    load_cluster,
    load_observations,
    save_cluster,
    save_observations,
)
from orchestrator.planner.model import BACKWARD_FRACTION, COMPUTE_SPREAD, DDP_BUCKET_BYTES, ring_allreduce_s
from orchestrator.planner.priors import INTER_LINKS, INTRA_LINKS
from orchestrator.planner.refit import (
    REFIT_BOUNDS,
    REFIT_MIN_STEPS,
    RefitResult,
    refit,
)
from orchestrator.planner.resize import ResizeDecision, decide_resize
from orchestrator.planner.results import PLAN_VERSION, Candidate, Placement, Plan, Prediction
from orchestrator.planner.search import COST_TIE_TOLERANCE, OBJECTIVES, placement_for, placements, plan, predict
from orchestrator.planner.types import (
    PROFILE_VERSION,
    AllReduceSample,
    Calibration,
    ClusterSpec,
    NodeSample,
    Observation,
    Profile,
    ProfileSample,
    Residuals,
)

__all__ = [
    "BACKWARD_FRACTION", "COMPUTE_SPREAD", "COST_TIE_TOLERANCE", "DDP_BUCKET_BYTES", "INTER_LINKS",
    "INTRA_LINKS", "OBJECTIVES", "OBSERVATIONS_ARTIFACT", "PLAN_VERSION", "PROFILE_VERSION", "REFIT_BOUNDS",
    "REFIT_MIN_STEPS", "AllReduceSample", "calibrate", "calibrate_allreduce", "Calibration", "Candidate",
    "ClusterSpec", "deadline_from_hours", "decide_resize", "load_cluster", "load_observations", "NodeSample",
    "Observation", "Placement", "placement_for", "placements", "Plan", "plan", "predict", "Prediction",
    "Profile", "ProfileSample", "refit", "RefitResult", "Residuals", "ResizeDecision", "ring_allreduce_s",
    "save_cluster", "save_observations",
]
