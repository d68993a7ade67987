"""The GRPO stage (loop.algorithm: grpo): its prompts are the generate stage's, its reward function is the reward
stage's computation, tied groups are counted, and a tiny run trains, exports and resumes, in process and on Ray."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from synthetic import generations_table, stage_with, write_dataset

from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import read_marker, read_parquet, read_table
from rlrf4rec.core.config import ConfigError, FaultConfig, RunConfig, from_dict
from rlrf4rec.core.layout import GENERATIONS, REWARDS


def _cfg(tmp_path: Path, asset_home: Path, metric: str = "synthetic-genres", **grpo) -> RunConfig:
    write_dataset(tmp_path / "raw", num_users=30, length=24)
    return from_dict(
        RunConfig,
        {
            "name": "grpo",
            "run_dir": str(tmp_path / "run"),
            "assets": {"home": str(asset_home)},
            "data": {"format": "parquet", "path": str(tmp_path / "raw"), "history_max": 12},
            "generate": {"prompt_history": 4, "num_samples": 2, "max_new_tokens": 8},
            "reward": {"metric": metric},
            "loop": {"algorithm": "grpo", "train_users": 6},
            "grpo": {
                "lr": 1e-3, "per_device_batch_size": 4, "grad_accum": 1, "max_steps": 3, "save_steps": 1,
                "max_length": 400, "max_prompt_length": 360, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                "num_workers": 1, **grpo,
            },
        },
    )  # fmt: skip


def test_prompts_are_the_generate_stages_prompts(tmp_path, asset_home, tiny_policy):
    from transformers import AutoTokenizer

    from rlrf4rec.core.config import GenerateConfig
    from rlrf4rec.stages.data import run_data
    from rlrf4rec.stages.generate import build_requests
    from rlrf4rec.stages.grpo import grpo_prompts
    from rlrf4rec.stages.reward import rewarded_train_users

    cfg = _cfg(tmp_path, asset_home)
    tables = {name: read_table(run_data(cfg), name) for name in ("sequences", "items")}
    users = rewarded_train_users(cfg)
    assert len(users) == 6 and users == sorted(users)
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    render = lambda m: tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)  # noqa: E731
    settings = dataclasses.replace(cfg.generate, splits=("train",), max_users=6, num_samples=1)
    assert isinstance(settings, GenerateConfig)
    requests = build_requests(tables["sequences"], tables["items"], None, render, settings, cfg.seed).to_pylist()
    prompts = grpo_prompts(cfg, users).to_pylist()
    assert [p[S.USER_ID] for p in prompts] == [r[S.USER_ID] for r in requests] == users
    # Byte for byte what the generate stage sends once the trainer applies the chat template.
    assert [render(p[S.PROMPT]) for p in prompts] == [r[S.PROMPT] for r in requests]
    with pytest.raises(ValueError, match="not in the data stage's sequences"):
        grpo_prompts(cfg, ["nobody"])


@pytest.mark.parametrize("metric", ["synthetic-genres", "synthetic-genres-contrast"])
def test_the_reward_function_returns_the_reward_stages_values(tmp_path, asset_home, metric):
    from rlrf4rec.stages.data import run_data
    from rlrf4rec.stages.grpo import RecsysReward
    from rlrf4rec.stages.reward import run_reward

    cfg = _cfg(tmp_path, asset_home, metric=metric)
    data_dir = run_data(cfg)
    seqs = read_table(data_dir, "sequences").to_pylist()
    split = {r[S.USER_ID]: r[S.SPLIT] for r in seqs}
    users = sorted(u for u, s in split.items() if s == "train")[:8]
    texts = ["Movies of genre B.", "Movies of genre A.", "Genres A and B, drama."]  # the synthetic genres: A, B
    rows = [(u, k, t, []) for u in users for k, t in enumerate(texts)]
    gen = stage_with(tmp_path / "gen", GENERATIONS, generations_table(rows, split), S.GENERATIONS)
    expected = read_parquet(run_reward(cfg, gen, [], tmp_path / "rewards") / REWARDS, S.REWARDS)
    assert np.std(expected.column(S.REWARD).to_numpy()) > 0  # the texts do differ under this reward
    logged = {}
    reward = RecsysReward(cfg.to_dict(), [], [])
    completions = [[{"role": "assistant", "content": f" {t}\n"}] for _, _, t, _ in rows]
    got = reward(["p"] * len(rows), completions, [r[0] for r in rows], log_metric=logged.__setitem__)
    assert got == pytest.approx(expected.column(S.REWARD).to_pylist(), abs=0, rel=0)
    assert logged == {"off_topic": 0.0}


def test_ray_workers_get_the_run_and_asset_paths_absolute(tmp_path, monkeypatch):
    """A relative run_dir names the driver's working directory; a Ray worker's is another (found by a run whose
    reward function looked for runs/<name>/data in the worker's directory)."""
    from rlrf4rec.stages.grpo import worker_config

    monkeypatch.chdir(tmp_path)
    cfg = from_dict(RunConfig, {"name": "x", "run_dir": "runs/{name}", "assets": {"home": "assets"}})
    out = worker_config(cfg)
    assert (out["run_dir"], out["assets"]["home"]) == (str(tmp_path / "runs" / "x"), str(tmp_path / "assets"))
    monkeypatch.chdir("/")
    assert from_dict(RunConfig, out).layout.data == tmp_path / "runs" / "x" / "data"


def test_bad_grpo_values_name_field_value_and_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"loop\.algorithm='ppo': use dpo .* or grpo"):
        from_dict(RunConfig, {"name": "x", "loop": {"algorithm": "ppo"}})
    with pytest.raises(ConfigError, match=r"grpo\.loss_type='sft': use one of"):
        from_dict(RunConfig, {"name": "x", "grpo": {"loss_type": "sft"}})
    with pytest.raises(ConfigError, match=r"grpo\.generation='vllm': colocated vLLM needs GPUs: set grpo\.use_gpu"):
        from_dict(RunConfig, {"name": "x", "grpo": {"generation": "vllm"}})
    with pytest.raises(ConfigError, match=r"grpo\.generation='sglang': use one of \['transformers', 'vllm'\]"):
        from_dict(RunConfig, {"name": "x", "grpo": {"generation": "sglang", "use_gpu": True}})
    cfg = from_dict(
        RunConfig,
        {"name": "x", "loop": {"algorithm": "grpo"}, "generate": {"num_samples": 3}, "grpo": {"grad_accum": 2}},
    )
    with pytest.raises(ConfigError, match=r"grpo\.per_device_batch_size=4: an optimizer step's 16 completions .* 3"):
        cfg.check_combinations("loop")


def test_in_process_grpo_counts_tied_groups_logs_kl_and_exports_a_loadable_model(tmp_path, asset_home, tiny_policy):
    """A random tiny policy names no genre: every completion of a group earns the same synthetic reward, so every
    group is tied, has no advantage, and the policy loss is 0 with only the KL term left."""
    from transformers import AutoModelForCausalLM

    from rlrf4rec.stages.data import run_data
    from rlrf4rec.stages.grpo import run_grpo
    from rlrf4rec.stages.reward import rewarded_train_users

    cfg = _cfg(tmp_path, asset_home)
    run_data(cfg)
    users = rewarded_train_users(cfg)
    stage = run_grpo(cfg, users, tiny_policy, "round0", [], on_ray=False)
    stats = read_marker(stage)["stats"]
    assert stats["prompts"] == 6 and stats["num_generations"] == 2 and stats["steps"] == 3
    history = json.loads((stage / "history.json").read_text())
    train = [h for h in history if "train/loss" in h]
    assert [h["step"] for h in train] == [1, 2, 3]
    for h in train:  # 4 completions a step: 2 prompts x 2 generations
        assert h["train/frac_reward_zero_std"] == 1.0 and h["train/reward"] == 0.0 and h["train/reward_std"] == 0.0
        assert "train/kl" in h and "train/off_topic" in h and h["train/completions/mean_length"] > 0
    assert stats["train/frac_reward_zero_std_mean"] == 1.0
    assert read_parquet(stage / "prompts.parquet", S.GRPO_PROMPTS).column(S.USER_ID).to_pylist() == users
    AutoModelForCausalLM.from_pretrained(stage / "model")  # a plain HF directory, LoRA merged
    assert run_grpo(cfg, users, tiny_policy, "round0", [], on_ray=False) == stage  # complete: nothing to do


@pytest.mark.slow
def test_grpo_on_two_ray_workers_resumes_after_a_killed_worker(tmp_path, asset_home, tiny_policy):
    import ray

    from rlrf4rec.stages.data import run_data
    from rlrf4rec.stages.grpo import run_grpo
    from rlrf4rec.stages.reward import rewarded_train_users

    cfg = _cfg(tmp_path, asset_home, num_workers=2, per_device_batch_size=2, max_failures=2)
    cfg = dataclasses.replace(cfg, fault=FaultConfig(dpo_step=2))
    run_data(cfg)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        stage = run_grpo(cfg, rewarded_train_users(cfg), tiny_policy, "round0", [])
    finally:
        ray.shutdown()
    stats = read_marker(stage)["stats"]
    assert stats["on_ray"] and stats["steps"] == 3
    assert stats["resumed_after"] and stats["resumed_after"][-1] in (1, 2)  # from step 1's or step 2's checkpoint
    assert [h["step"] for h in json.loads((stage / "history.json").read_text()) if "train/loss" in h] == [1, 2, 3]
    assert not list((cfg.run_path / "ray_train").glob("grpo-*"))
