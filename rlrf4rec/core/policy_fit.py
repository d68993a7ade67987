"""What the policy fine-tunes (DPO, SFT, GRPO) share: their Hugging Face training arguments, LoRA, Parquet rows as
a `datasets.Dataset`, prompt-length filtering, the launch on Ray Train workers or in this process with its log as
history rows, the export of a checkpoint to a plain model directory, and what identifies a policy's weights.

Each stage (`stages/dpo.py`, `stages/sft.py`, `stages/grpo.py`) builds its own trainer and summary on top; nothing
here knows pairs from examples or rewards.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from rlrf4rec.core import assets, launcher
from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import digest, read_marker, read_parquet, write_parquet
from rlrf4rec.core.layout import RESUMES

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


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


def history_from_log(log_history: list[dict], renames: dict[str, str]) -> list[dict]:
    """HF Trainer log entries -> flat dicts namespaced by split, TRL's names as `renames` maps them: `train/dpo_loss`
    (renames {"loss": "dpo_loss"}), `eval/rewards/accuracies`, ...

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


def file_dataset(path: Path, schema: pa.Schema):
    """A Parquet file's `schema` columns as a `datasets.Dataset`, named by the file's digest: left to itself, datasets
    pickles the whole table with dill to fingerprint it, which is slow for many rows and fails outright for pyarrow 26
    on Python 3.12 (MonthDayNano)."""
    from datasets import Dataset
    from datasets.table import InMemoryTable

    return Dataset(InMemoryTable(read_parquet(Path(path), schema)), fingerprint=fingerprint_file(Path(path)))


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


def fingerprint_file(path: Path) -> str:
    return assets.sha256_file(path)[:16]


def policy_fingerprint(policy_dir: Path) -> str:
    """What identifies the policy weights without hashing gigabytes: the stage or asset that wrote them if known."""
    marker = read_marker(policy_dir.parent)
    if marker is not None:
        return marker["fingerprint"]
    manifest = policy_dir / assets.MANIFEST
    if manifest.is_file():
        return fingerprint_file(manifest)
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
