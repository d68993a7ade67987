"""The DPO stage (METHOD.md section 7): align the policy LLM with the recommender's preference pairs.

Consumes a pairs Parquet file (schema.PAIRS: TRL conversational prompt / chosen / rejected messages plus
provenance) and the policy model directory. The reference is the policy at the start of the round, i.e. the same
directory, frozen; with LoRA, TRL gets it by disabling the adapter instead of keeping a second copy.
Produces `<run>/dpo/<name>/`:
- `model/`: a plain Hugging Face directory (LoRA merged into the base weights, the policy's tokenizer and chat
  template) that transformers and vLLM load directly,
- `history.json`: one flat dict per logged step (`train/dpo_loss`, `train/rewards/margins`,
  `train/rewards/accuracies`, ...) and per held-out evaluation (`eval/...`),
- `metrics.json` and the marker's stats: pair counts, first/last train values, final held-out reward accuracy and
  margin. Published atomically with a completion marker; a re-run with the same inputs does nothing.

Held out (never trained on, evaluated for reward accuracy and margin): pairs of non-train users,
`dpo.eval_fraction` of the train users' pairs, and every pair of an optional second file (`eval_pairs_path`, e.g.
the valid users'). Training runs TRL's DPOTrainer inside Ray Train TorchTrainer workers (gloo on CPU, NCCL on GPU;
DDP or DeepSpeed ZeRO-2/3), checkpointing through RayTrainReportCallback into Ray Train storage under the run
directory; a failed worker restarts the group from the last checkpoint (`dpo.max_failures`). `on_ray=False` runs
the same trainer in this process (the plain-TRL baseline). The caller owns the Ray connection.

Two speed-ups leave the loss as it is (core/dpo_trainer.py, tests/test_dpo_speed.py): the reference log-probs are
computed once, before the first step, on every worker's share of the pairs (`dpo.precompute_ref_logps`), and each
pair runs as one row in which chosen and rejected both continue a single pass over their prompt (`dpo.share_prompt`):
the prompt is most of a pair's tokens, TRL's own layout runs it twice, for policy and reference alike.
Knows nothing about how pairs were chosen, rewards or recommenders.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from rlrf4rec.core import assets, launcher
from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import Fingerprint, publish, read_parquet, write_json
from rlrf4rec.core.config import ConfigError, DPOConfig, RunConfig, deepspeed_config, dump_config, from_dict
from rlrf4rec.core.dpo_trainer import pack_shared_prompt, trainer_class
from rlrf4rec.core.layout import (
    DPO_EVAL_PAIRS,
    DPO_HF,
    DPO_PAIRS,
    DPO_TRAIN_PAIRS,
    HISTORY,
    METRICS,
    POLICY_MODEL,
)
from rlrf4rec.core.policy_fit import (
    chat_tokenizer,
    drop_long_prompts,
    export_model,
    file_dataset,
    fingerprint_file,
    fit_policy,
    lora_config,
    mean_step_time,
    policy_fingerprint,
    prompt_lengths,
    training_args,
    write_split,
)
from rlrf4rec.core.protocol import stable_seed
from rlrf4rec.core.stage import FORCE, Option, Stage

if TYPE_CHECKING:
    from transformers import Trainer

log = logging.getLogger(__name__)

MESSAGE_COLUMNS = [S.PROMPT, S.CHOSEN, S.REJECTED]
MESSAGES_ONLY = pa.schema([S.PAIRS.field(name) for name in MESSAGE_COLUMNS])
# TRL log keys -> our names; everything else TRL logs keeps its own name under the split prefix.
RENAMES = {"loss": "dpo_loss"}

# --------------------------------------------------------------------------------------------------- pairs (pure)


def split_pairs(pairs: pa.Table, eval_fraction: float, seed: int) -> tuple[pa.Table, pa.Table]:
    """(train, held_out): pairs of non-train users are held out whole, plus `eval_fraction` of the train users.

    The held-out train users are the first round(fraction * users) in a seeded hash order (at least one when the
    fraction is positive and two or more users exist), so the split is exact, stable and independent of row order.
    """
    splits = pairs.column(S.SPLIT).to_pylist()
    users = pairs.column(S.USER_ID).to_pylist()
    train_users = sorted({u for u, s in zip(users, splits) if s == "train"})
    k = round(eval_fraction * len(train_users))
    if eval_fraction > 0 and len(train_users) >= 2:
        k = min(max(k, 1), len(train_users) - 1)
    held = set(sorted(train_users, key=lambda u: stable_seed(seed, "dpo-eval", u))[:k])
    is_train = [s == "train" and u not in held for u, s in zip(users, splits)]
    return pairs.filter(pa.array(is_train, pa.bool_())), pairs.filter(pa.array([not t for t in is_train], pa.bool_()))


def summarize(history: list[dict]) -> dict:
    """First and last train values and the last held-out evaluation, as marker stats."""
    train = [h for h in history if "train/dpo_loss" in h]
    evals = [h for h in history if "eval/dpo_loss" in h]
    stats: dict[str, Any] = {"steps": max((h["step"] for h in history), default=0)}
    # logps: a sequence's summed log-probability under the policy; chosen and rejected both falling while their
    # margin grows is a known DPO failure (the policy moves mass to texts in neither set)
    for key in ("dpo_loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        if train and f"train/{key}" in train[0]:
            stats[f"train/{key}_first"] = train[0][f"train/{key}"]
            stats[f"train/{key}_last"] = train[-1][f"train/{key}"]
        if evals and f"eval/{key}" in evals[-1]:
            stats[f"eval/{key}"] = evals[-1][f"eval/{key}"]
    stats.update(mean_step_time(train))
    precompute = [h["train/ref_precompute_s"] for h in train if "train/ref_precompute_s" in h]
    if precompute:
        stats["train/ref_precompute_s"] = precompute[0]
    return stats


# --------------------------------------------------------------------------------------------------- trainer


def trl_args(dc: DPOConfig, output_dir: Path, seed: int, has_eval: bool, deepspeed: dict | None):
    """rlrf4rec's `dpo` section -> TRL's DPOConfig (TrainingArguments). Build it before the model: under ZeRO-3
    `from_pretrained` must already see the DeepSpeed config to load the weights partitioned."""
    from trl import DPOConfig as TRLConfig

    return TRLConfig(
        beta=dc.beta,
        precompute_ref_log_probs=dc.precompute_ref_logps,
        **training_args(dc, output_dir, seed, has_eval, deepspeed),
    )


def build_trainer(
    dc: DPOConfig,
    policy_dir: Path,
    train_path: Path,
    eval_path: Path | None,
    output_dir: Path,
    seed: int,
    deepspeed: dict | None = None,
    callbacks: list | None = None,
) -> Trainer:
    """TRL's DPOTrainer on the pairs files; the model is loaded from `policy_dir` (reference: the same weights)."""
    from transformers import AutoTokenizer

    args = trl_args(dc, output_dir, seed, eval_path is not None, deepspeed)

    def dataset(path: Path):
        return file_dataset(path, MESSAGES_ONLY)

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    collator = None  # TRL's: chosen and rejected as two rows, each with its prompt
    if dc.share_prompt:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        collator = functools.partial(pack_shared_prompt, pad_token_id=pad, max_length=dc.max_length)
    return trainer_class()(
        model=str(policy_dir),  # a path, not a model: TRL then loads the reference the same way (full fine-tune)
        args=args,
        data_collator=collator,
        train_dataset=dataset(train_path),
        eval_dataset=dataset(eval_path) if eval_path is not None else None,
        processing_class=tokenizer,
        peft_config=lora_config(dc),
        callbacks=[launcher.step_clock(), *(callbacks or [])],
        share_prompt=dc.share_prompt,
    )


def trainer_from(config: dict, callbacks: list | None = None) -> Trainer:
    """build_trainer from the plain-values loop config that travels to Ray workers."""
    return build_trainer(
        from_dict(DPOConfig, config["dpo"], "dpo."),
        Path(config["policy_dir"]),
        Path(config["train_path"]),
        Path(config["eval_path"]) if config["eval_path"] else None,
        Path(config["output_dir"]),
        config["seed"],
        config["deepspeed"],
        callbacks,
    )


# --------------------------------------------------------------------------------------------------- export


# --------------------------------------------------------------------------------------------------- stage


def prepare_pairs(
    cfg: RunConfig, pairs_path: Path, eval_pairs_path: Path | None, policy_dir: Path, work: Path
) -> tuple[Path, Path | None, dict]:
    """Split and length-filter the pairs into `work/` (layout.DPO_TRAIN_PAIRS, DPO_EVAL_PAIRS); returns the paths and
    counts.

    Held out: `split_pairs` of the main file, plus every pair of `eval_pairs_path` (e.g. the valid users' pairs).
    """

    dc = cfg.dpo
    pairs = read_parquet(pairs_path, S.PAIRS)
    train, held_out = split_pairs(pairs, dc.eval_fraction, cfg.seed + dc.seed_offset)
    if eval_pairs_path is not None:
        held_out = pa.concat_tables([held_out, read_parquet(eval_pairs_path, S.PAIRS)])
    tokenizer = chat_tokenizer(policy_dir, "DPO on conversational pairs")
    train, dropped_train = drop_long_prompts(train, prompt_lengths(train, tokenizer), dc.max_prompt_length)
    held_out, dropped_eval = drop_long_prompts(held_out, prompt_lengths(held_out, tokenizer), dc.max_prompt_length)
    if dropped_train or dropped_eval:
        log.warning(
            "dpo: dropped %d train and %d held-out pairs whose prompt exceeds dpo.max_prompt_length=%d",
            dropped_train,
            dropped_eval,
            dc.max_prompt_length,
        )
    if not train.num_rows:
        raise ValueError(f"{pairs_path}: no train-split pair left to train on ({pairs.num_rows} pairs in the file)")
    train_path, eval_path = write_split(train, held_out, work, (DPO_TRAIN_PAIRS, DPO_EVAL_PAIRS), S.PAIRS)
    counts = {
        "pairs/train": train.num_rows,
        "pairs/eval": held_out.num_rows,
        "pairs/dropped_long_prompt": dropped_train + dropped_eval,
    }
    return train_path, eval_path, counts


def run_dpo(
    cfg: RunConfig,
    pairs_path: Path,
    policy_dir: Path,
    out_name: str,
    *,
    eval_pairs_path: Path | None = None,
    force: bool = False,
    on_ray: bool = True,
) -> Path:
    """Train the policy on the pairs and write `<run>/dpo/<out_name>/` (model/ inside); skip when complete.

    `eval_pairs_path` adds held-out pairs (never trained on); `on_ray=False` trains in this process (plain TRL).
    """
    pairs_path, policy_dir = Path(pairs_path).resolve(), Path(policy_dir).resolve()
    eval_pairs_path = Path(eval_pairs_path).resolve() if eval_pairs_path is not None else None
    if not (policy_dir / "config.json").is_file():
        raise FileNotFoundError(f"{policy_dir} is not a Hugging Face model directory (no config.json)")
    files = {"pairs": fingerprint_file(pairs_path)}
    if eval_pairs_path:
        files["eval pairs"] = fingerprint_file(eval_pairs_path)
    fingerprint = Fingerprint(
        "dpo", cfg.section_hashes("dpo", "seed"), {"policy": policy_fingerprint(policy_dir)}, files
    )
    storage = cfg.layout.ray_train(f"dpo-{out_name}-{fingerprint.key[:16]}")

    def build(tmp: Path, stats: dict) -> None:
        if force and storage.exists():
            shutil.rmtree(storage)  # a stale checkpoint there would be resumed instead of training afresh
        train_path, eval_path, counts = prepare_pairs(cfg, pairs_path, eval_pairs_path, policy_dir, storage / DPO_PAIRS)
        dc = cfg.dpo
        loop_config = {
            "dpo": cfg.to_dict()["dpo"],
            "policy_dir": str(policy_dir),
            "train_path": str(train_path.resolve()),
            "eval_path": str(eval_path.resolve()) if eval_path else None,
            "output_dir": str((storage / DPO_HF).resolve()),  # shared by all ranks: DeepSpeed writes per-rank shards
            "seed": cfg.seed + dc.seed_offset,
            "deepspeed": deepspeed_config(dc.deepspeed),
            "torch_extensions_dir": str(assets.torch_extensions_dir(cfg.assets.home)),
            "fault_at": cfg.fault.dpo_step,
        }
        log.info("dpo/%s: %s", out_name, json.dumps(counts))
        fit = launcher.Fit.of(f"dpo-{out_name}", storage, dc)
        checkpoint, history, resumed_after, wall = fit_policy(trainer_from, loop_config, fit, on_ray, RENAMES)
        export_model(checkpoint, policy_dir, tmp / POLICY_MODEL)
        write_json(history, tmp / HISTORY)
        stats.update(
            counts,
            **summarize(history),
            **wall,
            policy=str(policy_dir),
            pairs=str(pairs_path),
            on_ray=on_ray,
            resumed_after=resumed_after,
            # What the last checkpoint held, recorded before the checkpoints are removed below.
            checkpoint_adapter=(checkpoint / "adapter_config.json").is_file(),
            checkpoint_deepspeed_shards=any(p.name.startswith("global_step") for p in checkpoint.iterdir()),
        )
        write_json(stats, tmp / METRICS)
        log.info("dpo/%s: %s", out_name, json.dumps({k: v for k, v in stats.items() if isinstance(v, float)}))

    stage_dir = publish(cfg.layout.dpo(out_name), fingerprint, build, dump_config(cfg), force=force)
    # Published: the checkpoints (full model states, ~0.5 GB each even with LoRA) are no longer needed to resume.
    shutil.rmtree(storage, ignore_errors=True)
    return stage_dir


# --------------------------------------------------------------------------------------------------- the stage record


def _command(cfg: RunConfig, args: argparse.Namespace) -> list[Path]:
    if args.pairs is None:
        raise ConfigError("dpo: give --pairs PATH, a pairs Parquet file (schema.PAIRS) written by the pairs stage")
    policy = assets.resolve(args.policy or cfg.models.llm, assets.asset_home(cfg.assets.home))
    name = args.name or args.pairs.stem
    return [run_dpo(cfg, args.pairs, Path(policy), name, eval_pairs_path=args.eval_pairs, force=args.force)]


STAGE = Stage(
    "dpo",
    "align the policy with DPO on a pairs file (TRL in Ray Train workers); writes an HF model dir",
    _command,
    (
        FORCE,
        Option(("--pairs",), {"type": Path, "help": "pairs Parquet file (schema.PAIRS) to train on"}),
        Option(("--eval-pairs",), {"type": Path, "help": "extra held-out pairs (e.g. valid users'), never trained"}),
        Option(("--policy",), {"help": "policy model directory (default: models.llm, the base policy)"}),
        Option(("--name",), {"help": "output name: <run>/dpo/<name>/ (default: the pairs file's name)"}),
    ),
    on_ray=lambda cfg, args: args.pairs is not None,  # without --pairs: the error, no cluster start-up
    upstream=("pairs",),
)
