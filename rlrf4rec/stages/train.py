"""The recommender stage on Ray Train: `recommender.fit` in TorchTrainer workers, checkpointed every
`recommender.checkpoint_every` epochs.

Consumes the data stage's tables and, for a knowledge-augmented variant, a user knowledge Parquet file; produces
`<run>/recommender/<variant>/` with the selected weights (`model.pt`), valid metrics and the per-epoch
history (test users are scored once, by rlrf4rec.stages.evaluate). DDP over `recommender.num_workers` workers (gloo on
CPU, NCCL on GPU), or DeepSpeed ZeRO-2 (`recommender.deepspeed: zero2`: optimizer state and gradients partitioned,
each worker checkpointing its partition); a worker failure restarts the group from the last checkpoint
(`recommender.max_failures`). The caller owns the Ray connection.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rlrf4rec.core import assets, launcher
from rlrf4rec.core.artifacts import Fingerprint, digest, publish, read_tables, require_marker, write_json
from rlrf4rec.core.config import RunConfig, deepspeed_config, dump_config
from rlrf4rec.core.launcher import Fit
from rlrf4rec.core.layout import HISTORY, TRAIN_STATE, worker_rng
from rlrf4rec.core.recommender import (
    FitState,
    ModelSpec,
    RerankTask,
    fit,
    knowledge_dims,
    make_optimizer,
    model_spec,
    rng_states,
    save_checkpoint,
    standardize_adaptor,
    stops_after,
)
from rlrf4rec.core.scoring import item_knowledge_matrix, knowledge_matrix
from rlrf4rec.core.stage import FORCE, Stage, on_ray

log = logging.getLogger(__name__)

ID_ONLY = "id"


def build(
    data_dir: Path,
    knowledge_path: Path | None,
    spec: ModelSpec,
    seed: int,
    item_path: Path | None = None,
    held_out: Sequence[str] = (),
):
    """The task, the knowledge it trains with ({"user": ..., "item": ...} or None) and a freshly initialised model
    whose adaptor is standardised on the train users' segments / vectors and on the items. `held_out`: train users
    whose lists the task leaves out (a cross-fitted reward model)."""
    task = RerankTask(read_tables(data_dir), spec)
    if held_out:
        task = task.without_train_users(held_out)
    knowledge = {}
    user = knowledge_matrix(knowledge_path, task.users)
    if user is not None:
        knowledge["user"] = user
    item = item_knowledge_matrix(item_path, task)
    if item is not None:
        knowledge["item"] = item
    knowledge = knowledge or None
    torch.manual_seed(seed)  # identical initial weights on every worker and on every restart
    model = task.build_model(knowledge_dims(knowledge))
    if knowledge is not None:
        standardize_adaptor(model, knowledge, task)
    return task, knowledge, model


def zero_config(stage: str, batch_size: int, world: int, num_params: int) -> dict:
    """The shipped ZeRO config with its "auto" values set for this loop: fp32, no accumulation, no clipping, one
    gradient bucket the size of the model (DeepSpeed's 5e8 default would allocate 2 GB per worker)."""
    ds = deepspeed_config(stage, "recommender.deepspeed")
    ds.update(
        train_micro_batch_size_per_gpu=batch_size,
        gradient_accumulation_steps=1,
        train_batch_size=batch_size * world,
        gradient_clipping=0.0,
        bf16={"enabled": False},
        fp16={"enabled": False},
    )
    bucket = -(-num_params // 4096) * 4096  # DeepSpeed wants a multiple of its alignment factor (2 or 4)
    ds["zero_optimization"]["reduce_bucket_size"] = bucket
    ds["zero_optimization"]["allgather_bucket_size"] = bucket
    left = [k for k, v in {**ds, **ds["zero_optimization"]}.items() if v == "auto"]
    if left:
        raise ValueError(f"configs/deepspeed/{stage}.json: no value for {left} in the recommender loop; set them")
    return ds


def train_loop_per_worker(config: dict) -> None:
    """Runs in each Ray Train worker: resume from the last checkpoint if any, train, report with a checkpoint every
    `checkpoint_every` epochs and after the last."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    spec = ModelSpec(**config["spec"])
    knowledge_path = Path(config["knowledge_path"]) if config["knowledge_path"] else None
    item_path = Path(config["item_knowledge_path"]) if config.get("item_knowledge_path") else None
    held_out = config.get("held_out_users") or ()
    task, knowledge, model = build(Path(config["data_dir"]), knowledge_path, spec, config["seed"], item_path, held_out)
    state, optimizer_state, rng_state = FitState(history=[]), None, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            saved = torch.load(Path(d) / TRAIN_STATE, weights_only=False, map_location="cpu")
            rng_path = Path(d) / worker_rng(rank)
            rng_state = torch.load(rng_path, weights_only=False) if rng_path.is_file() else None
        model.load_state_dict(saved["model"])
        optimizer_state, state = saved["optimizer"], FitState(**saved["fit"])
        state.resumed_after = [*(state.resumed_after or []), state.epoch]
        log.info("rank %d resumed after epoch %d", rank, state.epoch)
    device = ray.train.torch.get_device()
    model.to(device)
    knowledge = None if knowledge is None else {t: v.to(device) for t, v in knowledge.items()}
    engine = None
    if config.get("deepspeed"):
        engine = _zero_engine(config, model, spec, world, checkpoint)
        wrapped = engine
    else:
        wrapped = ray.train.torch.prepare_model(model) if world > 1 else model

    def on_epoch(metrics: dict, fit_state: FitState, trainer) -> None:
        if not stops_after(fit_state, spec) and (fit_state.epoch + 1) % config["checkpoint_every"]:
            # Not even a metrics-only report: each waits for Ray Train's controller to take the previous one, and it
            # looks every 2 s. The epochs' metrics reach Ray with the next checkpoint's FitState history.
            launcher.inject_fault(config, rank, world, fit_state.epoch, wait_s=3.0)
            return
        with tempfile.TemporaryDirectory() as d:
            if engine is not None:  # every worker writes its optimizer partition; Ray merges the directories
                engine.save_checkpoint(d, tag="zero")
            torch.save(rng_states(), Path(d) / worker_rng(rank))  # so is each worker's dropout stream
            if rank == 0:
                torch.save(
                    {
                        "model": model.state_dict(),
                        "optimizer": None if engine is not None else trainer.state_dict(),
                        "fit": dataclasses.asdict(fit_state),
                    },
                    Path(d) / TRAIN_STATE,
                )
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        # Ray Train's controller registers reported checkpoints asynchronously; an epoch here takes about a second,
        # and a kill right after the report barrier could beat the registration of every checkpoint so far, so the
        # group would restart from scratch. A real failure comes later than that; so does this one.
        launcher.inject_fault(config, rank, world, fit_state.epoch, wait_s=3.0)

    fit(
        task,
        wrapped,
        knowledge,
        seed=config["seed"],
        state=state,
        optimizer_state=optimizer_state,
        rank=rank,
        world=world,
        on_epoch=on_epoch,
        eval_model=model,
        engine=engine,
        rng_state=rng_state,
    )


def _zero_engine(config: dict, model: torch.nn.Module, spec: ModelSpec, world: int, checkpoint) -> Any:
    """A DeepSpeed ZeRO engine around `model` on Ray's process group, with torch's AdamW; resumed from the
    checkpoint's per-worker optimizer partitions when there is one."""
    import deepspeed

    launcher.worker_environment(config)
    launcher.adopt_process_group()
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=make_optimizer(model, spec),
        config=zero_config(config["deepspeed"], spec.batch_size, world, sum(p.numel() for p in model.parameters())),
    )
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            path, _ = engine.load_checkpoint(d, tag="zero")
        if path is None:
            raise RuntimeError(f"the checkpoint of {config['deepspeed']} training holds no DeepSpeed state: {d}")
    return engine


def fit_on_ray(
    cfg: RunConfig,
    variant: str,
    data_dir: Path,
    knowledge_path: Path | None,
    storage: Path,
    *,
    spec: ModelSpec,
    item_path: Path | None = None,
    held_out: Sequence[str] = (),
) -> FitState:
    """`train_loop_per_worker` over `recommender.num_workers` workers; the final FitState from the last checkpoint."""
    rc = cfg.recommender
    loop_config = {
        "spec": dataclasses.asdict(spec),
        "seed": cfg.seed,
        "data_dir": str(data_dir.resolve()),
        "knowledge_path": str(knowledge_path.resolve()) if knowledge_path else None,
        "item_knowledge_path": str(item_path.resolve()) if item_path else None,
        "held_out_users": sorted(held_out),
        "deepspeed": rc.deepspeed,
        "torch_extensions_dir": str(assets.torch_extensions_dir(cfg.assets.home)),
        "fault_at": cfg.fault.recommender_epoch,
        "checkpoint_every": rc.checkpoint_every,
    }
    fit = Fit(f"recommender-{variant}", storage, rc.num_workers, rc.use_gpu, rc.max_failures)
    result = launcher.fit_on_ray(train_loop_per_worker, loop_config, fit)
    with result.checkpoint.as_directory() as d:
        saved = torch.load(Path(d) / TRAIN_STATE, weights_only=False, map_location="cpu")
    return FitState(**saved["fit"])


def item_knowledge_path(cfg: RunConfig) -> Path | None:
    """The run's item knowledge file (knowledge.item), or None when the run has none."""
    return None if cfg.knowledge.item == "none" else cfg.layout.item_knowledge()


def run_recommender(
    cfg: RunConfig,
    variant: str,
    data_dir: Path,
    knowledge_path: Path | None,
    *,
    use_history: bool | None = None,
    held_out: Sequence[str] = (),
    force: bool = False,
) -> Path:
    """Train one variant ("id", "id-kar" or a knowledge name) and write its stage directory; skip when complete.

    A knowledge variant reads the user knowledge at `knowledge_path` and the run's item knowledge (knowledge.item);
    an ID-only one reads neither. `use_history` overrides recommender.use_history (KAR's ID-only: False).
    `held_out`: train users whose lists it does not train on (a cross-fold reward model for them)."""
    spec = model_spec(cfg.recommender)
    if use_history is not None:
        spec = dataclasses.replace(spec, use_history=use_history)
    item_path = item_knowledge_path(cfg) if knowledge_path is not None else None
    upstream = {"data": require_marker(data_dir, "data")["fingerprint"]}
    for name, path in (("user knowledge", knowledge_path), ("item knowledge", item_path)):
        if path is not None:
            upstream[name] = require_marker(path.parent, "encode")["fingerprint"]
    extra = {"use_history": spec.use_history}
    if held_out:
        extra["held_out"] = digest("\x1f".join(sorted(held_out)))
    sections = cfg.section_hashes("recommender", "knowledge", "seed", ignore=("recommender.checkpoint_every",))
    fingerprint = Fingerprint("recommender", sections, upstream, extra)

    def build_stage(tmp: Path, stats: dict) -> None:
        # Keyed on the fingerprint: Ray Train resumes whatever checkpoint it finds in storage, which must never be
        # one trained on other data or knowledge.
        storage = cfg.layout.ray_train(f"{variant}-{fingerprint.key[:16]}")
        if force:
            shutil.rmtree(storage, ignore_errors=True)
        state = fit_on_ray(
            cfg, variant, data_dir, knowledge_path, storage, spec=spec, item_path=item_path, held_out=held_out
        )
        task, knowledge, model = build(data_dir, knowledge_path, spec, cfg.seed, item_path, held_out)
        model.load_state_dict(state.best_model)
        valid = task.evaluate(model, "valid", knowledge)  # test is read once, by the evaluate stage
        segments = cfg.knowledge.user_segments if knowledge and knowledge.get("user", torch.zeros(0)).dim() == 3 else 0
        save_checkpoint(tmp, state.best_model, spec, knowledge, segments)
        write_json(state.history, tmp / HISTORY)
        stats.update(
            {
                "variant": variant,
                "use_history": spec.use_history,
                "knowledge": sorted(knowledge or {}),
                "user_segments": segments,
                "held_out_users": len(held_out),
                "best_epoch": state.best_epoch,
                "epochs_run": len(state.history),
                "resumed_after": state.resumed_after or [],
                **valid,
            }
        )
        log.info(
            "recommender/%s: %s",
            variant,
            json.dumps({k: round(v, 4) for k, v in valid.items() if isinstance(v, float)}),
        )

    return publish(cfg.layout.recommender(variant), fingerprint, build_stage, dump_config(cfg), force=force)


# --------------------------------------------------------------------------------------------------- the stage record


def run_recommenders(cfg: RunConfig, *, force: bool = False) -> Path:
    """The baselines (KAR's ID-only re-ranker: candidates alone; ID + history: the user's history window too) and
    the base-knowledge re-ranker (the first reward model), on Ray Train."""
    layout = cfg.layout
    run_recommender(cfg, "id-kar", layout.data, None, use_history=False, force=force)
    run_recommender(cfg, "id", layout.data, None, use_history=True, force=force)
    run_recommender(cfg, "base", layout.data, layout.user_knowledge("base"), force=force)
    return layout.recommenders


STAGE = Stage(
    "train-recommender",
    "train the ID-only and base-knowledge re-rankers on Ray Train",
    options=(FORCE,),
    on_ray=on_ray,
    in_run=run_recommenders,
    upstream=("data", "encode"),
)
