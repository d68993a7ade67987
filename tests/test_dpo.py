"""The DPO stage: pair splitting and log parsing (pure), config checks, and real tiny runs on SmolLM2-135M.

The slow tests train the embedded policy for a few steps on eight hand-written pairs: in this process (plain TRL,
LoRA) and on a local Ray cluster (2 workers, DeepSpeed ZeRO-2 + LoRA, gloo).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pyarrow as pa
import pytest

from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import read_marker, write_parquet
from rlrf4rec.core.config import ConfigError, FaultConfig, RunConfig, from_dict
from rlrf4rec.core.policy_fit import drop_long_prompts, history_from_log
from rlrf4rec.stages.dpo import RENAMES, split_pairs, summarize

LIKED = ["Casablanca (1942)", "Vertigo (1958)", "Chinatown (1974)", "Heat (1995)"]
CHOSEN_TEXT = "They favour tense, character-driven classics with morally grey leads and sharp dialogue."
REJECTED_TEXT = "Movies. Movies. Movies. Movies."


def make_pairs(n: int = 8, splits: list[str] | None = None) -> pa.Table:
    """n hand-written pairs: the same kind of good answer always chosen over the same degenerate one."""
    splits = splits or ["train"] * n
    rows = []
    for i in range(n):
        history = ", ".join(LIKED[(i + j) % len(LIKED)] for j in range(2))
        rows.append(
            {
                S.USER_ID: f"u{i}",
                S.SPLIT: splits[i],
                S.PROMPT: [{"role": "user", "content": f"I liked {history}. In one sentence, what is my taste?"}],
                S.CHOSEN: [{"role": "assistant", "content": CHOSEN_TEXT}],
                S.REJECTED: [{"role": "assistant", "content": REJECTED_TEXT}],
                S.CHOSEN_SAMPLE_IDX: 0,
                S.REJECTED_SAMPLE_IDX: 1,
                S.CHOSEN_REWARD: 0.8,
                S.REJECTED_REWARD: 0.2,
                S.REWARD_MARGIN: 0.6,
                S.POLICY_VERSION: "base",
                S.ROUND: 1,
            }
        )
    return pa.Table.from_pylist(rows, schema=S.PAIRS)


# --------------------------------------------------------------------------------------------------- pure


def test_split_holds_out_non_train_users_and_an_exact_fraction():
    pairs = make_pairs(10, ["train"] * 8 + ["valid", "test"])
    train, held = split_pairs(pairs, 0.25, seed=3)
    assert (train.num_rows, held.num_rows) == (6, 4)
    assert set(held.column(S.USER_ID).to_pylist()) >= {"u8", "u9"}  # never trained on
    assert set(train.column(S.SPLIT).to_pylist()) == {"train"}
    reversed_rows = pairs.take(pa.array(range(9, -1, -1)))
    assert sorted(split_pairs(reversed_rows, 0.25, seed=3)[1].column(S.USER_ID).to_pylist()) == sorted(
        held.column(S.USER_ID).to_pylist()
    )
    assert split_pairs(pairs, 0.0, seed=3)[0].num_rows == 8
    assert split_pairs(make_pairs(2), 0.01, seed=3)[1].num_rows == 1  # a positive fraction holds out someone
    assert split_pairs(make_pairs(1), 0.5, seed=3)[0].num_rows == 1  # but never the only train user


def test_drop_long_prompts_counts():
    kept, dropped = drop_long_prompts(make_pairs(4), [10, 50, 30, 31], max_prompt_length=30)
    assert (kept.column(S.USER_ID).to_pylist(), dropped) == (["u0", "u2"], 2)
    empty = make_pairs(0)
    assert drop_long_prompts(empty, [], 30)[0].num_rows == 0 and split_pairs(empty, 0.1, seed=3)[0].num_rows == 0


def test_history_from_log_namespaces_by_split():
    log_history = [
        {
            "loss": 0.6931,
            "rewards/margins": 0.0,
            "rewards/accuracies": 0.0,
            "grad_norm": 2.0,
            "step": 1,
            "epoch": 0.5,
            "logps/chosen": -82.0,
            "logps/rejected": -90.0,
        },
        {
            "loss": 0.41,
            "rewards/margins": 0.6,
            "rewards/accuracies": 1.0,
            "grad_norm": 1.5,
            "step": 2,
            "epoch": 1.0,
            "logps/chosen": -80.0,
            "logps/rejected": -95.5,
        },
        {
            "eval_loss": 0.5,
            "eval_rewards/margins": 0.3,
            "eval_rewards/accuracies": 0.75,
            "eval_runtime": 1.0,
            "step": 2,
            "epoch": 1.0,
        },
        {"train_runtime": 9.0, "train_loss": 0.55, "step": 2, "epoch": 1.0},
    ]
    history = history_from_log(log_history, RENAMES)
    assert len(history) == 3
    assert history[0] == {
        "step": 1,
        "epoch": 0.5,
        "train/dpo_loss": 0.6931,
        "train/rewards/margins": 0.0,
        "train/rewards/accuracies": 0.0,
        "train/grad_norm": 2.0,
        "train/logps/chosen": -82.0,
        "train/logps/rejected": -90.0,
    }
    assert history[2]["eval/rewards/accuracies"] == 0.75 and history[2]["eval/dpo_loss"] == 0.5
    stats = summarize(history)
    assert stats == {
        "steps": 2,
        "train/dpo_loss_first": 0.6931,
        "train/dpo_loss_last": 0.41,
        "train/rewards/margins_first": 0.0,
        "train/rewards/margins_last": 0.6,
        "train/rewards/accuracies_first": 0.0,
        "train/rewards/accuracies_last": 1.0,
        "train/logps/chosen_first": -82.0,
        "train/logps/chosen_last": -80.0,
        "train/logps/rejected_first": -90.0,
        "train/logps/rejected_last": -95.5,
        "eval/dpo_loss": 0.5,
        "eval/rewards/margins": 0.3,
        "eval/rewards/accuracies": 0.75,
    }


# --------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("dpo", "message"),
    [
        ({"beta": 0}, r"dpo\.beta=0\.0: use a positive value"),
        ({"lr": -1e-5}, r"dpo\.lr=-1e-05: use a positive learning rate"),
        ({"grad_accum": 0}, r"dpo\.grad_accum=0: use a positive integer"),
        ({"cpus_per_worker": 0}, r"dpo\.cpus_per_worker=0: use a positive integer"),
        ({"max_steps": 0}, r"dpo\.max_steps=0: use a positive number of optimizer steps, or null"),
        ({"max_prompt_length": 1024}, r"dpo\.max_prompt_length=1024: use a positive value below max_length=1024"),
        ({"deepspeed": "zero1"}, r"dpo\.deepspeed='zero1': use null \(plain DDP\) or one of \['zero2', 'zero3'\]"),
        ({"lora_target_modules": ["q_proj", "lm_head"]}, r"dpo\.lora_target_modules=.*remove lm_head"),
        ({"lora_dropout": 1.0}, r"dpo\.lora_dropout=1\.0: use a probability in \[0, 1\)"),
        ({"eval_fraction": 1.0}, r"dpo\.eval_fraction=1\.0: use a fraction in \[0, 1\)"),
        ({"max_failures": -1}, r"dpo\.max_failures=-1: use 0 or more restarts"),
        ({"epochs": 1.5}, r"dpo\.epochs=1\.5: expected an integer"),
        ({"betta": 0.1}, r"dpo\.betta=0\.1: unknown field; did you mean dpo\.beta\?"),
    ],
)
def test_bad_dpo_values_name_field_value_and_fix(dpo, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(RunConfig, {"name": "x", "dpo": dpo})


def test_bf16_is_bfloat16_weights_on_gpus_and_autocast_over_float32_weights_on_cpus(tmp_path):
    from rlrf4rec.core.policy_fit import training_args

    cfg = from_dict(RunConfig, {"name": "x", "dpo": {"bf16": True, "use_gpu": True, "deepspeed": "zero3"}})
    assert cfg.dpo.bf16 and cfg.dpo.deepspeed == "zero3"
    gpu = training_args(cfg.dpo, tmp_path, 0, False, None)
    assert gpu["bf16"] and gpu["model_init_kwargs"] == {"dtype": "bfloat16"} and not gpu["use_cpu"]
    cpu = training_args(from_dict(RunConfig, {"name": "x", "dpo": {"bf16": True}}).dpo, tmp_path, 0, False, None)
    assert cpu["bf16"] and cpu["model_init_kwargs"] == {"dtype": "float32"} and cpu["use_cpu"]
    off = training_args(from_dict(RunConfig, {"name": "x"}).dpo, tmp_path, 0, False, None)
    assert not off["bf16"] and off["model_init_kwargs"] == {"dtype": "float32"}
    d = from_dict(RunConfig, {"name": "x"}).dpo
    assert (d.beta, d.lr, d.per_device_batch_size, d.grad_accum, d.epochs) == (0.01, 5e-5, 2, 8, 3)


def test_shipped_deepspeed_configs_leave_batch_sizes_to_the_trainer():
    from rlrf4rec.core.config import deepspeed_config

    for stage, number in (("zero2", 2), ("zero3", 3)):
        ds = deepspeed_config(stage)
        assert ds["zero_optimization"]["stage"] == number
        assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] == "auto"
        assert "optimizer" not in ds  # a DeepSpeed optimizer would JIT-compile fused_adam first
    assert deepspeed_config("zero3")["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert deepspeed_config(None) is None


def test_cli_dpo_name_is_the_output_name_not_the_run_name(tmp_path, caplog):
    from rlrf4rec.cli import _command_options, _parser, _split_overrides, main

    argv = ["dpo", "--config", "c.yaml", "--name", "round1", "--seed=3", "--dpo.beta=0.1"]
    known, overrides = _split_overrides(argv, _command_options(_parser(), "dpo"))
    assert known == ["dpo", "--config", "c.yaml", "--name", "round1"]
    assert overrides == ["seed=3", "dpo.beta=0.1"]
    assert _split_overrides(["data", "--name=x"], _command_options(_parser(), "data"))[1] == ["name=x"]
    config = Path(__file__).resolve().parents[1] / "configs" / "ml100k-cpu.yaml"
    assert main(["dpo", "--config", str(config), f"--run_dir={tmp_path}/r"]) == 2
    assert "dpo: give --pairs PATH" in caplog.text
    assert main(["dpo", "--config", str(config), "--dpo.deepspeed=zero9"]) == 2
    assert "dpo.deepspeed='zero9'" in caplog.text


# --------------------------------------------------------------------------------------------------- real runs


def _cfg(tmp_path: Path, **dpo) -> RunConfig:
    return from_dict(
        RunConfig,
        {
            "name": "t",
            "run_dir": str(tmp_path / "run"),
            "dpo": {
                "beta": 0.1,
                "lr": 5e-4,
                "per_device_batch_size": 2,
                "grad_accum": 1,
                "max_steps": 3,
                "max_length": 96,
                "max_prompt_length": 80,
                "lora_r": 8,
                "lora_alpha": 16,
                "lora_dropout": 0.0,
                "eval_fraction": 0.25,
                "save_steps": 3,
                **dpo,
            },
        },
    )


def _policy(asset_home: Path) -> Path:
    from rlrf4rec.core import assets

    return assets.asset_dir("smollm2-135m-instruct", asset_home)


def _pair_logratio(model, tokenizer, pair: dict) -> float:
    """log p(chosen | prompt) - log p(rejected | prompt): what DPO raises (beta times the reward difference)."""
    import torch

    prompt = tokenizer.apply_chat_template(pair[S.PROMPT], tokenize=True, add_generation_prompt=True, return_dict=False)
    total = []
    for side in (S.CHOSEN, S.REJECTED):
        ids = tokenizer.apply_chat_template(pair[S.PROMPT] + pair[side], tokenize=True, return_dict=False)
        assert ids[: len(prompt)] == prompt
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1]
        logps = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        total.append(float(logps[len(prompt) - 1 :].sum()))
    return total[0] - total[1]


@pytest.mark.slow
def test_in_process_dpo_changes_the_policy_and_exports_a_loadable_model(asset_home, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlrf4rec.stages.dpo import run_dpo

    cfg = _cfg(tmp_path)
    pairs = tmp_path / "pairs.parquet"
    write_parquet(make_pairs(), pairs, S.PAIRS)
    policy = _policy(asset_home)
    stage = run_dpo(cfg, pairs, policy, "round1", on_ray=False)

    stats = read_marker(stage)["stats"]
    assert (stats["pairs/train"], stats["pairs/eval"], stats["steps"]) == (6, 2, 3)
    assert stats["train/dpo_loss_first"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
    assert stats["train/dpo_loss_last"] < stats["train/dpo_loss_first"]
    assert stats["train/rewards/margins_last"] > 0
    assert stats["eval/rewards/accuracies"] == 1.0 and stats["eval/rewards/margins"] > 0
    history = json.loads((stage / "history.json").read_text())
    assert [h["step"] for h in history if "train/dpo_loss" in h] == [1, 2, 3]

    # The merged weights moved exactly where the adapters were (attention projections), nowhere else.
    model_dir = stage / "model"
    base, merged = load_file(policy / "model.safetensors"), load_file(model_dir / "model.safetensors")
    assert set(base) == set(merged)
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(
        k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")) for k in changed
    )

    # It loads as a plain model, prefers the chosen answer more than the base does, and generates.
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(policy).chat_template
    tuned = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    reference = AutoModelForCausalLM.from_pretrained(policy).eval()
    pair = make_pairs(1).to_pylist()[0]
    assert _pair_logratio(tuned, tokenizer, pair) > _pair_logratio(reference, tokenizer, pair) + 1.0
    prompt = tokenizer.apply_chat_template(
        pair[S.PROMPT], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = tuned.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]

    assert run_dpo(cfg, pairs, policy, "round1", on_ray=False) == stage  # complete: a re-run trains nothing


@pytest.mark.slow
def test_zero2_lora_on_two_ray_workers_survives_a_killed_worker(tiny_policy, ray_cluster, tmp_path):
    """On the tiny random policy: the Ray Train, ZeRO and checkpoint machinery at a fraction of SmolLM2's cost (the
    in-process tests show the real policy learn)."""
    from rlrf4rec.stages.dpo import run_dpo

    cfg = _cfg(tmp_path, deepspeed="zero2", num_workers=2, per_device_batch_size=1, max_steps=3, save_steps=1)
    pairs = tmp_path / "pairs.parquet"
    write_parquet(make_pairs(), pairs, S.PAIRS)
    cfg = dataclasses.replace(cfg, fault=FaultConfig(dpo_step=2))
    stage = run_dpo(cfg, pairs, tiny_policy, "round1")

    stats = read_marker(stage)["stats"]
    # The last worker SIGKILLed itself after saving step 2 (config fault.dpo_step) and the group restarted once, from
    # a checkpoint: step 2's if Ray had registered it before the kill, else step 1's.
    assert len(stats["resumed_after"]) == 1 and stats["resumed_after"][0] in (1, 2)
    assert stats["on_ray"] and stats["steps"] == 3
    history = json.loads((stage / "history.json").read_text())
    assert [h["step"] for h in history if "train/dpo_loss" in h] == [1, 2, 3]
    assert [h["step"] for h in history if "eval/dpo_loss" in h] == [1, 2, 3]
    assert stats["train/dpo_loss_first"] == pytest.approx(math.log(2), abs=1e-4)
    assert stats["train/dpo_loss_last"] < stats["train/dpo_loss_first"]
    assert stats["train/rewards/margins_last"] > 0 and stats["train/rewards/accuracies_last"] > 0
    assert stats["eval/rewards/accuracies"] == 1.0 and stats["eval/rewards/margins"] > 0
    assert (stage / "model" / "model.safetensors").is_file() and (stage / "model" / "tokenizer.json").is_file()
    # LoRA adapter checkpoints with DeepSpeed's ZeRO shards (not plain DDP), removed once the model is published.
    assert stats["checkpoint_adapter"] and stats["checkpoint_deepspeed_shards"]
    assert not list((cfg.run_path / "ray_train").glob("dpo-round1-*"))

    # The resumed run is the run that was never interrupted: the same losses step by step and the same weights (the
    # checkpoint carries LoRA, optimizer, scheduler and RNG state; a resume that lost any of them would drift).
    from safetensors.torch import load_file

    clean = run_dpo(dataclasses.replace(cfg, fault=FaultConfig()), pairs, tiny_policy, "round1-clean")
    clean_history = json.loads((clean / "history.json").read_text())
    for key in ("train/dpo_loss", "eval/dpo_loss"):
        resumed = [h[key] for h in history if key in h]
        assert resumed == pytest.approx([h[key] for h in clean_history if key in h], abs=1e-4), key
    a, b = load_file(stage / "model" / "model.safetensors"), load_file(clean / "model" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert not read_marker(clean)["stats"]["resumed_after"]
