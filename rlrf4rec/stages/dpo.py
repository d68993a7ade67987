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
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from rlrf4rec.core import assets, launcher
from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import Fingerprint, digest, publish, read_marker, read_parquet, write_json, write_parquet
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
    RESUMES,
)
from rlrf4rec.core.protocol import stable_seed
from rlrf4rec.core.stage import FORCE, Option, Stage

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, Trainer

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


def prompt_lengths(pairs: pa.Table, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokens of each rendered prompt, chat template and assistant opening included (what TRL will feed)."""
    return [
        len(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False))
        for messages in pairs.column(S.PROMPT).to_pylist()
    ]


def drop_long_prompts(pairs: pa.Table, lengths: list[int], max_prompt_length: int) -> tuple[pa.Table, int]:
    """Pairs whose prompt fits `max_prompt_length`, and how many were dropped."""
    keep = pa.array([n <= max_prompt_length for n in lengths], type=pa.bool_())
    kept = pairs.filter(keep)
    return kept, pairs.num_rows - kept.num_rows


def history_from_log(log_history: list[dict], renames: dict[str, str] = RENAMES) -> list[dict]:
    """HF Trainer log entries -> flat dicts namespaced by split: `train/dpo_loss`, `eval/rewards/accuracies`, ...

    Train entries carry `loss`, eval entries `eval_loss`; the end-of-training summary (`train_loss`) is skipped.
    """
    rows = []
    for entry in log_history:
        if "eval_loss" in entry:
            prefix, strip = "eval/", "eval_"
        elif "loss" in entry:
            prefix, strip = "train/", ""
        else:
            continue
        row: dict[str, Any] = {"step": int(entry["step"]), "epoch": float(entry.get("epoch", 0.0))}
        for key, value in entry.items():
            if key in ("step", "epoch") or not key.startswith(strip) or not isinstance(value, (int, float)):
                continue
            name = key.removeprefix(strip)
            row[prefix + renames.get(name, name)] = float(value)
        rows.append(row)
    return rows


def mean_step_time(train: list[dict]) -> dict:
    """{"train/step_time_s": mean optimizer-step time of the train log rows after the first (it warms up)}, or {}."""
    times = [h["train/step_time_s"] for h in train[1:] if "train/step_time_s" in h]
    return {"train/step_time_s": sum(times) / len(times)} if times else {}


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


def training_args(section: Any, output_dir: Path, seed: int, has_eval: bool, deepspeed: dict | None) -> dict:
    """The TrainingArguments every policy fine-tune shares, from a `dpo` or `sft` section (PolicyTrainingConfig)."""
    return dict(
        output_dir=str(output_dir),
        learning_rate=section.lr,
        per_device_train_batch_size=section.per_device_batch_size,
        per_device_eval_batch_size=section.per_device_batch_size,
        gradient_accumulation_steps=section.grad_accum,
        num_train_epochs=section.epochs,
        max_steps=section.max_steps or -1,
        max_length=section.max_length,
        bf16=section.bf16,  # TRL turns bf16 on by default: here only when asked
        gradient_checkpointing=section.gradient_checkpointing,
        deepspeed=deepspeed,
        use_cpu=not section.use_gpu,
        seed=seed,
        logging_steps=1,
        save_strategy="steps",
        save_steps=section.save_steps,
        save_total_limit=2,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=section.save_steps,  # eval right before each save: every reported checkpoint carries eval metrics
        ddp_find_unused_parameters=False,  # every trainable parameter gets a gradient; the search costs a pass
        report_to="none",
        dataloader_num_workers=0,
        # On CPU, bf16 is autocast over float32 weights (mixed precision), not bfloat16 weights.
        model_init_kwargs={"dtype": "bfloat16" if section.bf16 and section.use_gpu else "float32"},
    )


def trl_args(dc: DPOConfig, output_dir: Path, seed: int, has_eval: bool, deepspeed: dict | None):
    """rlrf4rec's `dpo` section -> TRL's DPOConfig (TrainingArguments). Build it before the model: under ZeRO-3
    `from_pretrained` must already see the DeepSpeed config to load the weights partitioned."""
    from trl import DPOConfig as TRLConfig

    return TRLConfig(
        beta=dc.beta,
        precompute_ref_log_probs=dc.precompute_ref_logps,
        **training_args(dc, output_dir, seed, has_eval, deepspeed),
    )


def file_dataset(path: Path, schema: pa.Schema):
    """A Parquet file's `schema` columns as a `datasets.Dataset`, named by the file's digest: left to itself, datasets
    pickles the whole table with dill to fingerprint it, which is slow for many rows and fails outright for pyarrow 26
    on Python 3.12 (MonthDayNano)."""
    from datasets import Dataset
    from datasets.table import InMemoryTable

    return Dataset(InMemoryTable(read_parquet(Path(path), schema)), fingerprint=_fingerprint_file(Path(path)))


def lora_config(section: Any):
    """peft's LoraConfig from a policy-training section (`dpo`, `sft`), None for a full fine-tune."""
    if not section.lora:
        return None
    from peft import LoraConfig

    targets = list(section.lora_target_modules)
    return LoraConfig(
        r=section.lora_r,
        lora_alpha=section.lora_alpha,
        lora_dropout=section.lora_dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM",
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


# The wall time of a fit in the invocation that finished it (workers' start, reference pass, steps, checkpoints):
# what the arms compare updates at. A resumed fit counts only its last invocation.
FIT_WALL = "train/fit_wall_s"


def fit_policy(
    make_trainer: launcher.TrainerFactory, loop_config: dict, fit: launcher.Fit, on_ray: bool, renames: dict
) -> tuple[Path, list[dict], list[int], dict]:
    """A policy fine-tune (DPO, SFT, GRPO) on `fit`'s Ray Train workers or in this process: its last checkpoint, its
    log as history rows (history_from_log with `renames`), the steps a restarted worker group resumed after, and
    {FIT_WALL: seconds}."""
    start = time.monotonic()
    if on_ray:
        checkpoint = launcher.hf_fit_on_ray(make_trainer, loop_config, fit)
    else:
        checkpoint = launcher.hf_fit_local(make_trainer, loop_config)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    resumes = fit.storage / RESUMES
    return (
        checkpoint,
        history_from_log(state["log_history"], renames),
        json.loads(resumes.read_text()) if resumes.is_file() else [],
        {FIT_WALL: time.monotonic() - start},
    )


# --------------------------------------------------------------------------------------------------- export


# The policy's own: the trainer's copies carry training-time edits (use_cache=False under gradient checkpointing).
POLICY_FILES = ("config.json", "generation_config.json")


def export_model(checkpoint: Path, policy_dir: Path, out: Path) -> None:
    """A trainer checkpoint -> a plain HF model directory with the policy's config, tokenizer and chat template.

    A LoRA checkpoint is merged into the policy's weights in float32 and saved in the policy's own dtype; the
    weights of a full fine-tune checkpoint (ZeRO-3 gathers them at save time) are copied as they are.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out.mkdir(parents=True)
    if (checkpoint / "adapter_config.json").is_file():
        from peft import PeftModel

        dtype = AutoConfig.from_pretrained(policy_dir).dtype or torch.float32
        base = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, str(checkpoint)).merge_and_unload()
        merged.to(dtype).save_pretrained(out, safe_serialization=True)
    else:
        weights = sorted(checkpoint.glob("*.safetensors"))
        if not weights:
            raise FileNotFoundError(f"{checkpoint} holds no model weights (a ZeRO-3 run needs 16-bit gather on save)")
        for path in [*weights, checkpoint / "model.safetensors.index.json", *(policy_dir / n for n in POLICY_FILES)]:
            if path.is_file():
                shutil.copy2(path, out / path.name)
    AutoTokenizer.from_pretrained(policy_dir).save_pretrained(out)


# --------------------------------------------------------------------------------------------------- stage


def _fingerprint_file(path: Path) -> str:
    return assets.sha256_file(path)[:16]


def policy_fingerprint(policy_dir: Path) -> str:
    """What identifies the policy weights without hashing gigabytes: the stage or asset that wrote them if known."""
    marker = read_marker(policy_dir.parent)
    if marker is not None:
        return marker["fingerprint"]
    manifest = policy_dir / assets.MANIFEST
    if manifest.is_file():
        return _fingerprint_file(manifest)
    listing = sorted((p.name, p.stat().st_size) for p in policy_dir.iterdir() if p.is_file())
    return digest([str(policy_dir.resolve()), listing])


def chat_tokenizer(policy_dir: Path, what: str):
    """The policy's tokenizer, which must have a chat template: `what` (conversational pairs or examples) is chat."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    if not tokenizer.chat_template:
        raise ValueError(f"{policy_dir} has no chat template; {what} needs an instruct model")
    return tokenizer


def write_split(
    train: pa.Table, held_out: pa.Table, work: Path, names: tuple[str, str], schema: pa.Schema
) -> tuple[Path, Path | None]:
    """The rows the workers read: `train` and, when it has rows, `held_out` under `work/` as `names`; their paths."""
    work.mkdir(parents=True, exist_ok=True)
    write_parquet(train, work / names[0], schema)
    if not held_out.num_rows:
        return work / names[0], None
    write_parquet(held_out, work / names[1], schema)
    return work / names[0], work / names[1]


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
    files = {"pairs": _fingerprint_file(pairs_path)}
    if eval_pairs_path:
        files["eval pairs"] = _fingerprint_file(eval_pairs_path)
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
