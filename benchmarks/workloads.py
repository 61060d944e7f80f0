"""The jobs the benchmarks train: shipped configs, pointed at the workspace's data and stores.

Where a default config is not shipped yet (``configs/synthetic_resnet.yaml``,
``configs/tiny_gpt.yaml``), it is stood in for by ``configs/digits.yaml`` with the built-in data
set and model kwargs below; the results say so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness import REPO, Workspace
from orchestrator.config import JobConfig, ResourcesConfig, load_config

CONFIGS = REPO / "configs"
DIGITS = CONFIGS / "digits.yaml"


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """A shipped config plus overrides (model, data, batch); data and stores go to the workspace."""

    name: str
    config: Path
    overrides: tuple[str, ...] = ()
    note: str = ""  # how it differs from the shipped config of its name, if it does

    def overrides_for(self, ws: Workspace, *, run_name: str, extra: tuple[str, ...] = ()) -> list[str]:
        stores = [
            f"name={run_name}",
            f"data.path={ws.data_dir(self.name)}",
            f"checkpoint.storage_path={ws.storage(run_name)}",
            f"tracking.tracking_uri={ws.tracking_uri}",
            "tracking.experiment=bench",
            "tracking.registered_model=null",
        ]
        return [*self.overrides, *stores, *planning_off(), *extra]

    def job(self, ws: Workspace, *, run_name: str, extra: tuple[str, ...] = ()) -> JobConfig:
        return load_config(self.config, self.overrides_for(ws, run_name=run_name, extra=extra))

    def prepare(self, ws: Workspace) -> JobConfig:
        """Write the workload's data set into the workspace (once); returns the job."""
        from trainers.data import ensure_prepared

        job = self.job(ws, run_name=f"prepare-{self.name}")
        if job.data.dataset is None:
            raise ValueError(f"workload {self.name}: its config names no built-in data set")
        ensure_prepared(job.data.dataset, job.data.paths[0], **job.data.dataset_kwargs)
        return job


def planning_off() -> list[str]:
    # `--workers N` fixes the count; newer configs also profile by default, which start-up and
    # step benchmarks must not pay for (the profiler has its own benchmark).
    return ["resources.profile=false"] if "profile" in ResourcesConfig.model_fields else []


# The per-step and start-up workload: the digits CNN on a digits-shaped synthetic set large
# enough for 51 steps per epoch at a global batch of 256 (about 20 ms a step here).
CNN_STEP = Workload(
    name="cnn-8x8",
    config=DIGITS,
    overrides=(
        "data.dataset=synthetic",
        "data.dataset_kwargs={rows: 16384, channels: 1, size: 8}",
        "data.features.column=image",
        "training.global_batch_size=256",
        "training.max_steps=1000",
    ),
    note="configs/digits.yaml (cnn, width 32) on synthetic 1x8x8 images, 16,384 rows, global batch 256",
)

# The per-step workload of a heavier model: the shipped ResNet config at global batch 64 (about
# 0.3 s a step on 2 CPU workers here); every step it runs is in the first epoch (57 steps), which
# streams through Ray Data.
RESNET_STEP = Workload(
    name="resnet-32x32",
    config=CONFIGS / "synthetic_resnet.yaml",
    overrides=("training.global_batch_size=64", "training.epochs=null", "training.max_steps=1000"),
    note="configs/synthetic_resnet.yaml (resnet, width 32, 2 blocks x 3 stages) on synthetic 3x32x32, 4,096 rows, "
         "global batch 64",
)

_RESNET_FALLBACK = (
    "data.dataset=synthetic",
    "data.dataset_kwargs={rows: 4096, channels: 3, size: 32}",
    "data.features.column=image",
    "data.features.shape=[3, 32, 32]",
    "model.name=resnet",
    "model.kwargs={in_channels: 3, num_classes: 10, width: 16, depth: 1, stages: 3}",
    "training.global_batch_size=64",
)
_GPT_FALLBACK = (
    "data.dataset=corpus",
    "data.dataset_kwargs={seq_len: 128, max_bytes: 2000000}",
    "data.features.column=tokens",
    "data.features.dtype=int64",
    "data.features.shape=null",
    "data.label=null",
    "model.name=gpt",
    "model.kwargs={vocab_size: 256, context: 128, n_layer: 4, n_head: 4, n_embd: 128}",
    "training.global_batch_size=32",
)


def _shipped_or_fallback(name: str, fallback: tuple[str, ...], described: str) -> Workload:
    config = CONFIGS / f"{name}.yaml"
    if config.is_file():
        return Workload(name=name, config=config)
    return Workload(name=name, config=DIGITS, overrides=fallback,
                    note=f"configs/{name}.yaml not shipped yet: configs/digits.yaml with {described}")


def default_workloads() -> list[Workload]:
    """The three default configs (the data pipeline and profiler benchmarks run each)."""
    return [
        Workload(name="digits", config=DIGITS),
        _shipped_or_fallback("synthetic_resnet", _RESNET_FALLBACK,
                             "resnet (width 16, 1 block x 3 stages) on synthetic 3x32x32, 4,096 rows, batch 64"),
        _shipped_or_fallback("tiny_gpt", _GPT_FALLBACK,
                             "gpt (4 layers, width 128, context 128) on the stdlib byte corpus (2 MB), batch 32"),
    ]
