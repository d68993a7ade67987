"""The GRPO stage (`loop.algorithm: grpo`): on-policy RL from recommender feedback, beside the method's offline DPO.

DPO keeps the best and the worst of a user's N texts and learns from texts of the previous policy; GRPO samples a
group of N = generate.num_samples completions of each train user's prompt from the current policy, rewards every
one with the round's frozen reward model (scoring.TextRewarder: the reward stage's own computation, cross-fitting
included, so a user's completion is scored by the fold model that never trained on that user's lists), and moves the
policy towards the completions above their group's mean reward (TRL's GRPOTrainer: advantages within the group,
clipped ratio, KL to the reference with grpo.beta). A group whose rewards are all tied has no advantage and no
gradient: TRL logs its share (`frac_reward_zero_std`) every step. TRL generates with transformers inside the
trainer here (CPU; its vLLM integration needs CUDA vLLM), inside Ray Train TorchTrainer workers as every policy fit
runs (core/policy_fit.py: DDP or DeepSpeed ZeRO, LoRA, checkpoints, resume after a worker failure).

Consumes the data stage (the prompts: the generate stage's chat prompt per train user), the policy and the reward
model's recommender stages (or none with a synthetic reward). Produces `<run>/grpo/<name>/`:
- `model/`: the tuned policy, a plain Hugging Face directory (LoRA merged),
- `prompts.parquet`: the prompts trained on (schema.GRPO_PROMPTS),
- `history.json` and `metrics.json`: per step the loss, reward mean and spread, tied-group share, KL to the
  reference, completion lengths and clipped share, the off-topic share of the completions, the step's wall time.
Published atomically with a completion marker; a re-run with the same inputs does nothing.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from rlrf4rec.core import assets, launcher
from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import Fingerprint, digest, publish, read_tables, require_marker, write_json, write_parquet
from rlrf4rec.core.config import GenerateConfig, GRPOConfig, RunConfig, deepspeed_config, dump_config, from_dict
from rlrf4rec.core.layout import GRPO_PROMPTS, HISTORY, METRICS, POLICY_MODEL, SFT_HF
from rlrf4rec.core.metrics import SYNTHETIC_METRICS
from rlrf4rec.core.policy_fit import file_dataset, lora_config, mean_step_time, training_args
from rlrf4rec.core.prompts import mentions_topic, prompt_messages
from rlrf4rec.core.stage import Stage, on_ray

if TYPE_CHECKING:
    from transformers import Trainer

log = logging.getLogger(__name__)


def grpo_prompts(cfg: RunConfig, users: Sequence[str]) -> pa.Table:
    """One row per user (in the order given): the chat messages the generate stage renders for that user's prompt
    (its history window's last generate.prompt_history entries, generate.domain's factors)."""
    tables = read_tables(cfg.layout.data, ("sequences", "items", "users"))
    seqs = tables["sequences"]
    wanted = set(users)
    seqs = seqs.filter(pa.array([u in wanted for u in seqs.column(S.USER_ID).to_pylist()], pa.bool_()))
    g = cfg.generate
    messages = prompt_messages(seqs, tables["items"], tables.get("users"), g.prompt_history, g.domain)
    missing = [u for u in users if u not in messages]
    if missing:
        raise ValueError(f"grpo: users {missing[:5]} are not in the data stage's sequences ({cfg.layout.data})")
    rows = [{S.USER_ID: u, S.PROMPT: messages[u]} for u in users]
    return pa.Table.from_pylist(rows, S.GRPO_PROMPTS)


def worker_config(cfg: RunConfig) -> dict:
    """The run config as plain values for the reward function in Ray workers, whose working directory is not the
    driver's: the run directory and the asset home as absolute paths."""
    out = cfg.to_dict()
    out["run_dir"] = str(cfg.run_path.resolve())
    if out["assets"].get("home"):
        out["assets"]["home"] = str(Path(out["assets"]["home"]).expanduser().resolve())
    return out


class RecsysReward:
    """TRL reward function (called with each generation batch's prompts, completions and dataset columns): every
    completion's reward for its user under the round's reward model. Beside TRL's own metrics it logs the share of
    completions that name no factor or genre of the domain (`off_topic`). Built in the Ray worker from plain values;
    the reward model loads on the first call."""

    __name__ = "recsys"  # TRL names the reward's metrics after it: rewards/recsys/mean, rewards/recsys/std

    def __init__(self, config: dict, scorer: Sequence[str], folds: Sequence[tuple[Sequence[str], Sequence[str]]]):
        self.config, self.scorer, self.folds = config, [Path(d) for d in scorer], folds
        self.rewarder = None

    def __call__(self, prompts, completions, user_id, log_metric=None, **kwargs) -> list[float]:
        from rlrf4rec.core.scoring import TextRewarder

        if self.rewarder is None:
            cfg = from_dict(RunConfig, self.config)
            folds = [([Path(d) for d in dirs], list(users)) for dirs, users in self.folds]
            self.rewarder = TextRewarder(cfg, self.scorer, folds)
        texts = [completion_text(c) for c in completions]
        rewards = self.rewarder(list(user_id), texts)
        if log_metric is not None:
            domain = self.rewarder.cfg.generate.domain
            log_metric("off_topic", float(np.mean([bool(t.split()) and not mentions_topic(t, domain) for t in texts])))
        return [float(r) for r in rewards]


def completion_text(completion: Any) -> str:
    """A completion as the generate stage keeps a text: the assistant message's content, stripped."""
    if isinstance(completion, list):  # conversational: [{"role": "assistant", "content": ...}]
        completion = "".join(m.get("content") or "" for m in completion if m.get("role") == "assistant")
    return str(completion).strip()


def build_trainer(config: dict, callbacks: list) -> Trainer:
    """TRL's GRPOTrainer from the plain-values loop config that travels to Ray workers (launcher.TrainerFactory)."""
    from transformers import AutoTokenizer
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    gc: GRPOConfig = from_dict(GRPOConfig, config["grpo"], "grpo.")
    g: GenerateConfig = from_dict(GenerateConfig, config["config"]["generate"], "generate.")
    policy_dir = Path(config["policy_dir"])
    shared = training_args(gc, Path(config["output_dir"]), config["seed"], False, config["deepspeed"])
    shared.pop("max_length")  # GRPO bounds the completion (max_completion_length), not prompt + completion
    args = TRLConfig(
        beta=gc.beta,
        num_generations=g.num_samples,
        max_completion_length=g.max_new_tokens,
        temperature=g.temperature,
        top_p=g.top_p,
        loss_type=gc.loss_type,
        scale_rewards=gc.scale_rewards,
        num_iterations=gc.num_iterations,
        epsilon=gc.epsilon,
        use_vllm=gc.generation == "vllm",
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=gc.vllm_gpu_memory_utilization,
        **shared,
    )
    reward = RecsysReward(config["config"], config["scorer"], config["folds"])
    return GRPOTrainer(
        model=str(policy_dir),
        reward_funcs=[reward],
        args=args,
        train_dataset=file_dataset(Path(config["prompts_path"]), S.GRPO_PROMPTS),
        processing_class=AutoTokenizer.from_pretrained(policy_dir, padding_side="left"),
        peft_config=lora_config(gc),
        callbacks=[launcher.step_clock(), *callbacks],
    )


SUMMARY_KEYS = ("reward", "reward_std", "frac_reward_zero_std", "kl", "completions/mean_length", "off_topic")


def summarize(history: list[dict]) -> dict:
    """Per logged quantity its first and last step's values and the mean over steps; the mean step time."""
    train = [h for h in history if "train/loss" in h]
    stats: dict[str, Any] = {"steps": max((h["step"] for h in history), default=0)}
    for key in SUMMARY_KEYS:
        values = [h[f"train/{key}"] for h in train if f"train/{key}" in h]
        if values:
            stats.update(
                {f"train/{key}_first": values[0], f"train/{key}_last": values[-1], f"train/{key}_mean": np.mean(values)}
            )
    stats.update(mean_step_time(train))
    return {k: float(v) if isinstance(v, np.floating) else v for k, v in stats.items()}


def run_grpo(
    cfg: RunConfig,
    users: Sequence[str],
    policy_dir: Path,
    name: str,
    scorer: Sequence[Path],
    folds: Sequence[tuple[Sequence[Path], Sequence[str]]] = (),
    *,
    force: bool = False,
    on_ray: bool = True,
) -> Path:
    """GRPO of `policy_dir` on `users`' prompts, rewarded by `scorer` (recommender stage dirs; a cross-fitting fold's
    users by theirs), published to `<run>/grpo/<name>/`; skipped when complete for the same inputs."""
    from rlrf4rec.core.policy_fit import (
        chat_tokenizer,
        drop_long_prompts,
        export_model,
        fit_policy,
        policy_fingerprint,
        prompt_lengths,
    )

    gc, layout = cfg.grpo, cfg.layout
    data_marker = require_marker(layout.data, "data")
    if cfg.reward.metric in SYNTHETIC_METRICS:
        scorer, folds = [], []  # the synthetic reward reads the user's lists only
    upstream = {"data": data_marker["fingerprint"], "policy": policy_fingerprint(Path(policy_dir))}
    upstream.update(
        {
            layout.relative(d): require_marker(d, "train-recommender")["fingerprint"]
            for d in [*scorer, *(d for dirs, _ in folds for d in dirs)]
        }
    )
    fingerprint = Fingerprint(
        "grpo",
        cfg.section_hashes("grpo", "generate", "reward", "knowledge", "encode", "models", "seed"),
        upstream,
        {"users": digest([list(users), [sorted(fold) for _, fold in folds]])},
    )
    storage = layout.ray_train(f"grpo-{name}-{fingerprint.key[:16]}")

    def build(tmp: Path, stats: dict) -> None:
        if force and storage.exists():
            shutil.rmtree(storage)  # a stale checkpoint there would be resumed instead of training afresh
        tokenizer = chat_tokenizer(Path(policy_dir), "GRPO on chat prompts")
        prompts = grpo_prompts(cfg, users)
        prompts, dropped = drop_long_prompts(prompts, prompt_lengths(prompts, tokenizer), gc.max_prompt_length)
        if not prompts.num_rows:
            raise ValueError(f"grpo/{name}: every prompt is longer than grpo.max_prompt_length={gc.max_prompt_length}")
        storage.mkdir(parents=True, exist_ok=True)
        prompts_path = storage / GRPO_PROMPTS
        write_parquet(prompts, prompts_path, S.GRPO_PROMPTS)
        counts = {"prompts": prompts.num_rows, "prompts/dropped": dropped, "num_generations": cfg.generate.num_samples}
        log.info("grpo/%s: %s", name, json.dumps(counts))
        loop_config = {
            "section": "grpo",
            "grpo": cfg.to_dict()["grpo"],
            "config": worker_config(cfg),
            "policy_dir": str(Path(policy_dir).resolve()),
            "prompts_path": str(prompts_path.resolve()),
            "scorer": [str(Path(d).resolve()) for d in scorer],
            "folds": [[[str(Path(d).resolve()) for d in dirs], list(fold)] for dirs, fold in folds],
            "output_dir": str((storage / SFT_HF).resolve()),
            "seed": cfg.seed + gc.seed_offset,
            "deepspeed": deepspeed_config(gc.deepspeed, "grpo.deepspeed"),
            "torch_extensions_dir": str(assets.torch_extensions_dir(cfg.assets.home)),
            "fault_at": cfg.fault.dpo_step,
        }
        fit = launcher.Fit.of(f"grpo-{name}", storage, gc)
        checkpoint, history, resumed_after, wall = fit_policy(build_trainer, loop_config, fit, on_ray, renames={})
        write_parquet(prompts, tmp / GRPO_PROMPTS, S.GRPO_PROMPTS)
        export_model(checkpoint, Path(policy_dir), tmp / POLICY_MODEL)
        write_json(history, tmp / HISTORY)
        stats.update(
            counts,
            **summarize(history),
            **wall,
            policy=str(policy_dir),
            reward=cfg.reward.metric,
            on_ray=on_ray,
            resumed_after=resumed_after,
        )
        write_json(stats, tmp / METRICS)
        log.info("grpo/%s: %s", name, json.dumps({k: v for k, v in stats.items() if isinstance(v, float)}))

    stage_dir = publish(layout.grpo(name), fingerprint, build, dump_config(cfg), force=force)
    shutil.rmtree(storage, ignore_errors=True)  # published: the checkpoints are no longer needed to resume
    return stage_dir


STAGE = Stage(
    "grpo",
    "on-policy GRPO of the policy on the rewarded train users' prompts (loop.algorithm: grpo)",
    on_ray=on_ray,
    upstream=("data", "train-recommender"),
    inside="loop",
)
