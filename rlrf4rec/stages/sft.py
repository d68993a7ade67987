"""The SFT stage: a supervised warm start of the policy on teacher profiles, so that its texts carry knowledge.

Consumes the data stage's tables and the policy (models.llm). Each train user (up to `sft.max_users`) gives one
example: the factorization prompt the generate stage sends (generate.prompt_history entries of the history window)
and, as the assistant's answer, the teacher profile of the same window (core/profile.py): nothing the prompt does not
show. The valid users' examples are held out for the loss before, during and after training. TRL's SFTTrainer trains
on the completion only, inside Ray Train TorchTrainer workers (core/policy_fit.py, as DPO: gloo on CPU, NCCL on GPU,
DDP or DeepSpeed ZeRO, LoRA), checkpointing into Ray Train storage; a failed worker group resumes from the last
checkpoint (`sft.max_failures`). Produces `<run>/sft/`:
- `examples.parquet`: the examples (schema.SFT_EXAMPLES), train and held out,
- `model/`: a plain Hugging Face directory (LoRA merged) that transformers and vLLM load: `loop.init: sft` starts
  the rounds from it,
- `history.json` and `metrics.json`: per-step train loss and token accuracy, held-out loss at step 0 and after.
Published atomically with a completion marker; a re-run with the same inputs does nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from rlrf4rec.core import assets, launcher
from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import Fingerprint, publish, write_json, write_parquet
from rlrf4rec.core.config import RunConfig, SFTConfig, deepspeed_config, dump_config, from_dict
from rlrf4rec.core.layout import (
    HISTORY,
    METRICS,
    POLICY_MODEL,
    SFT_EVAL_EXAMPLES,
    SFT_EXAMPLES,
    SFT_HF,
    SFT_TRAIN_EXAMPLES,
    SFT_WORK,
)
from rlrf4rec.core.policy_fit import file_dataset, lora_config, mean_step_time, training_args
from rlrf4rec.core.prompts import prompt_messages
from rlrf4rec.core.protocol import stable_seed
from rlrf4rec.core.stage import FORCE, Stage, on_ray

if TYPE_CHECKING:
    from transformers import Trainer

log = logging.getLogger(__name__)

MESSAGES_ONLY = pa.schema([S.SFT_EXAMPLES.field(name) for name in (S.PROMPT, S.COMPLETION)])

# --------------------------------------------------------------------------------------------------- examples (pure)


def sft_examples(
    tables: dict[str, pa.Table],
    targets: dict[str, str],
    domain: str,
    prompt_history: int | None,
    max_users: int | None,
    seed: int,
) -> pa.Table:
    """(prompt, target text) per train user with a target (the first `max_users` in a seeded order) and per valid
    user with one (held out), in TRL's conversational prompt-completion format (schema.SFT_EXAMPLES); test users never
    appear.

    The prompt names the last `prompt_history` window entries; the targets (teacher profiles, or a policy's own best
    texts: stages/arms.py) read the same ones.
    """
    seqs = tables["sequences"]
    keep = pa.array([s in ("train", "valid") for s in seqs.column(S.SPLIT).to_pylist()], pa.bool_())
    seqs = seqs.filter(keep)
    messages = prompt_messages(seqs, tables["items"], tables.get("users"), prompt_history, domain)
    split = dict(zip(seqs.column(S.USER_ID).to_pylist(), seqs.column(S.SPLIT).to_pylist()))
    split = {u: s for u, s in split.items() if u in targets}
    train = sorted((u for u, s in split.items() if s == "train"), key=lambda u: stable_seed(seed, "sft-users", u))
    users = train[:max_users] + sorted(u for u, s in split.items() if s == "valid")
    rows = [
        {
            S.USER_ID: u,
            S.SPLIT: split[u],
            S.PROMPT: messages[u],
            S.COMPLETION: [{"role": "assistant", "content": targets[u]}],
        }
        for u in users
    ]
    return pa.Table.from_pylist(rows, S.SFT_EXAMPLES)


# --------------------------------------------------------------------------------------------------- trainer


def build_trainer(config: dict, callbacks: list) -> Trainer:
    """TRL's SFTTrainer from the plain-values loop config that travels to Ray workers (launcher.TrainerFactory)."""
    from transformers import AutoTokenizer
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer

    sc: SFTConfig = from_dict(SFTConfig, config["sft"], "sft.")
    policy_dir = Path(config["policy_dir"])
    has_eval = config["eval_path"] is not None
    args = TRLConfig(
        lr_scheduler_type="cosine",
        warmup_steps=0.1,  # a ratio of the total steps
        completion_only_loss=True,  # the prompt is the user's history: only the answer is learned
        eval_on_start=has_eval,  # the untrained model's held-out loss, logged at step 0
        **training_args(sc, Path(config["output_dir"]), config["seed"], has_eval, config["deepspeed"]),
    )

    return SFTTrainer(
        model=str(policy_dir),
        args=args,
        train_dataset=file_dataset(config["train_path"], MESSAGES_ONLY),
        eval_dataset=file_dataset(config["eval_path"], MESSAGES_ONLY) if has_eval else None,
        processing_class=AutoTokenizer.from_pretrained(policy_dir),
        peft_config=lora_config(sc),
        callbacks=[launcher.step_clock(), *callbacks],
    )


def summarize(history: list[dict]) -> dict:
    """First and last train loss and token accuracy, held-out loss at step 0 and at the end, mean step time."""
    train = [h for h in history if "train/loss" in h]
    evals = [h for h in history if "eval/loss" in h]
    stats: dict[str, Any] = {"steps": max((h["step"] for h in history), default=0)}
    for key in ("loss", "mean_token_accuracy"):
        if train and f"train/{key}" in train[0]:
            stats[f"train/{key}_first"] = train[0][f"train/{key}"]
            stats[f"train/{key}_last"] = train[-1][f"train/{key}"]
        if evals and f"eval/{key}" in evals[0]:
            stats[f"eval/{key}_start"] = evals[0][f"eval/{key}"]
            stats[f"eval/{key}"] = evals[-1][f"eval/{key}"]
    stats.update(mean_step_time(train))
    return stats


# --------------------------------------------------------------------------------------------------- stage


def run_sft(cfg: RunConfig, *, force: bool = False, on_ray: bool = True) -> Path:
    """Warm-start models.llm on teacher profiles and write `<run>/sft/` (model/ inside); skip when complete."""
    from rlrf4rec.core.artifacts import read_tables
    from rlrf4rec.core.history import teacher_texts
    from rlrf4rec.core.policy_fit import policy_fingerprint
    from rlrf4rec.stages.data import require_data

    data_marker = require_data(cfg, "sft")
    policy_dir = Path(assets.resolve(cfg.models.llm, assets.asset_home(cfg.assets.home))).resolve()
    if not (policy_dir / "config.json").is_file():
        raise FileNotFoundError(f"{policy_dir} is not a Hugging Face model directory (no config.json)")
    sc, g = cfg.sft, cfg.generate
    fingerprint = Fingerprint(
        "sft",
        cfg.section_hashes("sft", "seed"),
        {"data": data_marker["fingerprint"], "policy": policy_fingerprint(policy_dir)},
        {"domain": g.domain, "prompt_history": g.prompt_history},
    )

    def examples() -> pa.Table:
        tables = read_tables(cfg.layout.data, ("sequences", "items", "users"))
        targets = teacher_texts(cfg, g.prompt_history)
        return sft_examples(tables, targets, g.domain, g.prompt_history, sc.max_users, cfg.seed + sc.seed_offset)

    return fit_sft(cfg, examples, policy_dir, cfg.layout.sft, fingerprint, sc.target, force=force, on_ray=on_ray)


def fit_sft(
    cfg: RunConfig,
    make_examples: Callable[[], pa.Table],
    policy_dir: Path,
    stage_dir: Path,
    fingerprint: Fingerprint,
    target: str,
    *,
    force: bool = False,
    on_ray: bool = True,
) -> Path:
    """SFT of `policy_dir` on `make_examples()` (schema.SFT_EXAMPLES: train rows trained on, valid rows held out)
    with the `sft` section's trainer settings, published to `stage_dir` (model/ inside); `target` names the answers
    in the stats. Skipped when complete for `fingerprint`, which must identify the examples."""
    from rlrf4rec.core.policy_fit import (
        chat_tokenizer,
        drop_long_prompts,
        export_model,
        fit_policy,
        prompt_lengths,
        write_split,
    )

    sc = cfg.sft
    storage = cfg.layout.ray_train(f"{stage_dir.name}-{fingerprint.key[:16]}")

    def build(tmp: Path, stats: dict) -> None:
        if force and storage.exists():
            shutil.rmtree(storage)  # a stale checkpoint there would be resumed instead of training afresh
        tokenizer = chat_tokenizer(policy_dir, "SFT on conversational examples")
        examples = make_examples()
        examples, dropped = drop_long_prompts(examples, prompt_lengths(examples, tokenizer), sc.max_prompt_length)
        is_train = pa.array([s == "train" for s in examples.column(S.SPLIT).to_pylist()], pa.bool_())
        train, held_out = examples.filter(is_train), examples.filter(pa.compute.invert(is_train))
        if not train.num_rows:
            raise ValueError(f"sft: no train user left to train on (data stage {cfg.layout.data}, sft.max_users)")
        names = (SFT_TRAIN_EXAMPLES, SFT_EVAL_EXAMPLES)
        train_path, eval_path = write_split(train, held_out, storage / SFT_WORK, names, S.SFT_EXAMPLES)
        counts = {"examples/train": train.num_rows, "examples/eval": held_out.num_rows, "examples/dropped": dropped}
        log.info("sft: %s", json.dumps(counts))
        loop_config = {
            "section": "sft",
            "sft": cfg.to_dict()["sft"],
            "policy_dir": str(policy_dir),
            "train_path": str(train_path.resolve()),
            "eval_path": str(eval_path.resolve()) if eval_path else None,
            "output_dir": str((storage / SFT_HF).resolve()),
            "seed": cfg.seed + sc.seed_offset,
            "deepspeed": deepspeed_config(sc.deepspeed, "sft.deepspeed"),
            "torch_extensions_dir": str(assets.torch_extensions_dir(cfg.assets.home)),
            "fault_at": cfg.fault.dpo_step,
        }
        fit = launcher.Fit.of(stage_dir.name, storage, sc)
        checkpoint, history, resumed_after, wall = fit_policy(build_trainer, loop_config, fit, on_ray, renames={})
        write_parquet(examples, tmp / SFT_EXAMPLES, S.SFT_EXAMPLES)
        export_model(checkpoint, policy_dir, tmp / POLICY_MODEL)
        write_json(history, tmp / HISTORY)
        stats.update(
            counts,
            **summarize(history),
            **wall,
            policy=str(policy_dir),
            target=target,
            on_ray=on_ray,
            resumed_after=resumed_after,
        )
        write_json(stats, tmp / METRICS)
        log.info("sft: %s", json.dumps({k: v for k, v in stats.items() if isinstance(v, float)}))

    stage_dir = publish(stage_dir, fingerprint, build, dump_config(cfg), force=force)
    shutil.rmtree(storage, ignore_errors=True)  # published: the checkpoints are no longer needed to resume
    return stage_dir


# --------------------------------------------------------------------------------------------------- the stage record


def warm_start(cfg: RunConfig) -> Path | None:
    """In `rlrf4rec run`: the warm start with loop.init = sft (the rounds and the base knowledge then start from it);
    nothing with loop.init = base."""
    return run_sft(cfg) if cfg.loop.init == "sft" else None


def _command(cfg: RunConfig, args: argparse.Namespace) -> list[Path]:
    return [run_sft(cfg, force=args.force)]


STAGE = Stage(
    "sft",
    "warm-start the policy: SFT on (prompt, teacher profile) for train users on Ray Train (loop.init: sft)",
    _command,
    (FORCE,),
    on_ray=on_ray,
    in_run=warm_start,
    upstream=("data",),
)
