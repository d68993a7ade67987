"""Training on Ray Train, one way for every stage that trains (the recommender, DPO).

`fit_on_ray` sets up the TorchTrainer (workers, GPUs or CPUs per worker, storage under `<run>/ray_train/`, the failure
budget, the last two checkpoints kept, every worker's loop under Python's own print and, unless --verbose, without
Ray's INFO lines); inside a worker, `worker_environment` points DeepSpeed's JIT op cache at the
machine's shared one, `adopt_process_group` hands Ray's torch process group to DeepSpeed, and `inject_fault` is the
resilience tests' kill switch (config `fault`; off in every shipped config). Knows nothing about what is trained.
"""

from __future__ import annotations

import builtins
import functools
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlrf4rec.core.cluster import verbose

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
