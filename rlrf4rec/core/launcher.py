"""Training on Ray Train, one way for every stage that trains (the recommender, DPO, SFT).

`fit_on_ray` sets up the TorchTrainer (workers, GPUs or CPUs per worker, storage under `<run>/ray_train/`, the failure
budget, the last two checkpoints kept, every worker's loop under Python's own print and, unless --verbose, without
Ray's INFO lines); inside a worker, `worker_environment` points DeepSpeed's JIT op cache at the
machine's shared one, `adopt_process_group` hands Ray's torch process group to DeepSpeed, and `inject_fault` is the
resilience tests' kill switch (config `fault`; off in every shipped config). `hf_fit_on_ray` / `hf_fit_local` run a
Hugging Face Trainer built by the caller (TRL's DPO or SFT) in those workers or in this process, resuming from the last
checkpoint, and return its last checkpoint directory. Knows nothing about what is trained.
"""

from __future__ import annotations

import builtins
import functools
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlrf4rec.core.cluster import verbose
from rlrf4rec.core.layout import RESUMES

log = logging.getLogger(__name__)

FAULT_MARKER = "fault_injected"  # in the fit's storage: the one kill happened (a restarted worker must not repeat it)


@dataclass(frozen=True)
class Fit:
    """Where and how wide a fit runs."""

    name: str  # Ray Train's run name, a folder of `storage`
    storage: Path  # layout.ray_train(...): keyed by the stage's fingerprint, so a resume never mixes inputs
    num_workers: int
    use_gpu: bool
    max_failures: int
    cpus_per_worker: int | None = None  # None: Ray Train's default (1 CPU per worker)

    @classmethod
    def of(cls, name: str, storage: Path, section: Any) -> Fit:
        """A fit sized by a policy-training config section (config.PolicyTrainingConfig: `dpo`, `sft`)."""
        return cls(name, storage, section.num_workers, section.use_gpu, section.max_failures, section.cpus_per_worker)


def fit_on_ray(train_loop: Callable[[dict], None], loop_config: dict, fit: Fit) -> Any:
    """Run `train_loop(loop_config)` on `fit.num_workers` Ray Train workers; returns Ray Train's Result (its last
    reported checkpoint, resumed from after a worker failure while `fit.max_failures` allows)."""
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    per_worker = None if fit.use_gpu or fit.cpus_per_worker is None else {"CPU": fit.cpus_per_worker}
    trainer = TorchTrainer(
        functools.partial(_worker_entry, train_loop, not verbose()),
        train_loop_config={**loop_config, "fault_marker": str((fit.storage / FAULT_MARKER).resolve())},
        scaling_config=ScalingConfig(num_workers=fit.num_workers, use_gpu=fit.use_gpu, resources_per_worker=per_worker),
        run_config=RayRunConfig(
            name=fit.name,
            storage_path=str(fit.storage.resolve()),
            failure_config=FailureConfig(max_failures=fit.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    return trainer.fit()


class _RayInfo(logging.Filter):
    """Drops Ray's own records below WARNING. Some of Ray Train's loggers are named after their file path (the
    per-epoch "Reporting training result ..." dump), so they are told by where they log from: Ray's package
    directory (not any path with a "ray" folder: a job's working directory is unpacked under /tmp/ray/...)."""

    def __init__(self) -> None:
        super().__init__()
        import ray

        self.ray_package = os.path.dirname(os.path.abspath(ray.__file__)) + os.sep

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not os.path.abspath(record.pathname).startswith(self.ray_package)


def _worker_entry(train_loop: Callable[[dict], None], quiet: bool, config: dict) -> None:
    """A worker's train loop under Python's own `print`, and when `quiet` (no --verbose) without Ray's own INFO lines
    (the stage's own lines, one per epoch or step, still reach the driver).

    Ray Train's replacement `print` also logs whatever is printed while stdout is redirected, so output a library
    captures on purpose reached the console: dill finds a function's globals by disassembling it into a captured
    stdout, and `datasets` runs that for the fingerprint of every `map` in TRL's DPO set-up, about 4,800 lines of
    bytecode per 2-round CPU run."""
    try:
        from ray.train.v2._internal.logging.patch_print import _original_print
    except ImportError:  # another Ray: its print is left as it is
        pass
    else:
        builtins.print = _original_print
    if quiet:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_RayInfo())
    train_loop(config)


def worker_environment(config: dict) -> None:
    # DeepSpeed JIT-compiles a comm op on first init (~40 s on CPU); a shared cache makes that once per machine.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", config["torch_extensions_dir"])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def adopt_process_group() -> None:
    """DeepSpeed takes the process group Ray Train created; it must, before any engine or trainer exists, or ZeRO
    sees a world of one ("train_batch_size ... 4 != 2 * 1 * 1")."""
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend=dist.get_backend())


def inject_fault(config: dict, rank: int, world: int, progress: int, *, wait_s: float = 0.0) -> None:
    """Resilience tests only: the last worker SIGKILLs itself once, when `progress` (epoch or step) reaches
    `config["fault_at"]` (None: never). `wait_s` lets Ray register the checkpoint just reported first."""
    at, marker = config.get("fault_at"), config.get("fault_marker")
    if at is None or marker is None or rank != world - 1 or progress != at or os.path.exists(marker):
        return
    Path(marker).write_text(str(os.getpid()))
    time.sleep(wait_s)
    os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------------------------------- HF trainers
# A Hugging Face Trainer factory: (plain-values loop config, extra callbacks) -> Trainer. The loop config carries the
# section (`section` names its key: "dpo" or "sft"), "output_dir" (shared by all ranks), "torch_extensions_dir",
# "deepspeed" and "fault_at"; the factory must be a module-level function (Ray pickles it to the workers).
TrainerFactory = Callable[[dict, list], Any]


def hf_fit_on_ray(make_trainer: TrainerFactory, loop_config: dict, fit: Fit) -> Path:
    """`make_trainer`'s Trainer on Ray Train workers; returns the last HF checkpoint directory in `fit.storage`."""
    result = fit_on_ray(functools.partial(hf_train_loop, make_trainer), loop_config, fit)
    if result.checkpoint is None:
        raise RuntimeError(f"{fit.name} on Ray finished without a checkpoint; see the worker logs under {fit.storage}")
    return Path(result.checkpoint.path) / "checkpoint"


def hf_fit_local(make_trainer: TrainerFactory, loop_config: dict) -> Path:
    """The same Trainer in this process (plain TRL, no Ray), resumed from its own last checkpoint if any; returns
    its last checkpoint directory."""
    from transformers.trainer_utils import get_last_checkpoint

    worker_environment(loop_config)
    output_dir = Path(loop_config["output_dir"])
    trainer = make_trainer(loop_config, [])
    resume = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    trainer.train(resume_from_checkpoint=resume)
    return Path(get_last_checkpoint(str(output_dir)))


def hf_train_loop(make_trainer: TrainerFactory, config: dict) -> None:
    """Runs in each Ray Train worker: build the trainer, resume from Ray's last checkpoint if any, train."""
    import ray.train
    import ray.train.collective
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer

    worker_environment(config)
    section = config[config.get("section", "dpo")]
    if not section["use_gpu"]:
        import torch

        torch.set_num_threads(section["cpus_per_worker"])  # the cores Ray reserved for this worker
    ctx = ray.train.get_context()
    if config["deepspeed"] is not None:
        adopt_process_group()
    if ctx.get_local_rank() == 0:
        # The trainer's scratch from a dead attempt would confuse RayTrainReportCallback, which reports the newest
        # checkpoint-N there; Ray storage holds the checkpoint this attempt resumes from.
        import shutil

        shutil.rmtree(config["output_dir"], ignore_errors=True)
    ray.train.collective.barrier()  # Ray's own, whatever the torch backend (gloo, NCCL)
    callbacks = [RayTrainReportCallback()]
    if config.get("fault_at") is not None:
        # After the report: the checkpoint is handed to Ray before the kill.
        callbacks.append(_kill_after_save(config, ctx.get_world_rank(), ctx.get_world_size()))
    trainer = prepare_trainer(make_trainer(config, callbacks))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        trainer.train()
        return
    with checkpoint.as_directory() as d:
        resume = Path(d) / RayTrainReportCallback.CHECKPOINT_NAME
        step = json.loads((resume / "trainer_state.json").read_text())["global_step"]
        log.info("rank %d resumes after step %d from %s", ctx.get_world_rank(), step, resume)
        if ctx.get_world_rank() == 0:
            _record_resume(Path(config["output_dir"]).parent / RESUMES, step)
        trainer.train(resume_from_checkpoint=str(resume))


def _record_resume(path: Path, step: int) -> None:
    from rlrf4rec.core.artifacts import write_json

    steps = json.loads(path.read_text()) if path.is_file() else []
    write_json([*steps, step], path)


def _kill_after_save(config: dict, rank: int, world: int):
    """Fault injection for resilience tests (config fault.dpo_step): the last worker dies once, after saving."""
    from transformers import TrainerCallback

    class KillAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            inject_fault(config, rank, world, state.global_step)

    return KillAfterSave()


def step_clock():
    """Stamps each train log entry with its optimizer step's wall time (`step_time_s`): forward, backward and the
    optimizer, without the logging, evaluation and checkpointing that follow it."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        started = elapsed = None

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.elapsed = time.perf_counter() - self.started

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.elapsed is not None and "loss" in state.log_history[-1]:
                state.log_history[-1]["step_time_s"] = self.elapsed
                self.elapsed = None

    return StepClock()
