"""The SFT stage: its examples (train users' prompts with their teacher profiles, valid users held out, no test
user), config checks, and real tiny runs on SmolLM2-135M in process and on two Ray workers with a killed worker."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from synthetic import write_dataset

from rlrf4rec.core import assets
from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import read_marker, read_parquet, read_tables
from rlrf4rec.core.config import ConfigError, FaultConfig, RunConfig, from_dict
from rlrf4rec.core.prompts import preference_messages


def _cfg(tmp_path: Path, asset_home: Path, llm: str = "embedded:smollm2-135m-instruct", **sft) -> RunConfig:
    write_dataset(tmp_path / "raw", num_users=24, length=24)
    return from_dict(
        RunConfig,
        {
            "name": "sft",
            "run_dir": str(tmp_path / "run"),
            "assets": {"home": str(asset_home)},
            "models": {"llm": llm},
            "data": {"format": "parquet", "path": str(tmp_path / "raw"), "history_max": 12},
            "generate": {"prompt_history": 6},
            "sft": {
                "lr": 1e-3,
                "per_device_batch_size": 4,
                "grad_accum": 1,
                "max_steps": 3,
                "max_length": 400,
                "max_prompt_length": 360,
                "lora_r": 8,
                "lora_alpha": 16,
                "lora_dropout": 0.0,
                "save_steps": 3,
                "num_workers": 1,
                **sft,
            },
        },
    )


def test_examples_pair_each_train_prompt_with_its_teacher_profile(tmp_path, asset_home):
    from rlrf4rec.core.history import teacher_texts
    from rlrf4rec.core.prompts import history_texts
    from rlrf4rec.stages.data import run_data
    from rlrf4rec.stages.sft import sft_examples

    cfg = _cfg(tmp_path, asset_home)
    run_data(cfg)
    tables = read_tables(cfg.layout.data)
    targets = teacher_texts(cfg, 6)
    examples = sft_examples(tables, targets, "movies", 6, max_users=5, seed=1).to_pylist()
    seqs = tables["sequences"]
    splits = dict(zip(seqs.column(S.USER_ID).to_pylist(), seqs.column(S.SPLIT).to_pylist()))
    valid = sorted(u for u, s in splits.items() if s == "valid")
    assert [e[S.SPLIT] for e in examples] == ["train"] * 5 + ["valid"] * len(valid)
    assert [e[S.USER_ID] for e in examples[5:]] == valid and valid
    assert all(splits[e[S.USER_ID]] == e[S.SPLIT] for e in examples)  # no test user, no user under another split
    histories = history_texts(tables["sequences"], tables["items"], None, 6)
    for e in examples:
        assert e[S.PROMPT] == preference_messages(histories[e[S.USER_ID]], "movies")
        assert e[S.COMPLETION] == [{"role": "assistant", "content": targets[e[S.USER_ID]]}]
    # The seeded order picks other train users under another seed, the same ones under the same.
    again = sft_examples(tables, targets, "movies", 6, max_users=5, seed=1)
    other = sft_examples(tables, targets, "movies", 6, max_users=5, seed=2)
    assert again.column(S.USER_ID).to_pylist() == [e[S.USER_ID] for e in examples]
    assert other.column(S.USER_ID).to_pylist()[:5] != again.column(S.USER_ID).to_pylist()[:5]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"sft": {"target": "best"}}, r"sft\.target='best': use one of \['teacher'\]"),
        ({"sft": {"lr": 0}}, r"sft\.lr=0\.0: use a positive learning rate"),
        ({"sft": {"max_users": 0}}, r"sft\.max_users=0: use a positive number of users"),
        ({"loop": {"init": "dpo"}}, r"loop\.init='dpo': use base \(models\.llm\) or sft"),
    ],
)
def test_bad_sft_values_name_field_value_and_fix(section, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(RunConfig, {"name": "x", **section})


def test_start_policy_needs_a_finished_sft_stage(tmp_path):
    from rlrf4rec.core.lineage import start_policy

    cfg = from_dict(RunConfig, {"name": "x", "run_dir": str(tmp_path), "loop": {"init": "sft"}})
    with pytest.raises(FileNotFoundError, match="sft"):
        start_policy(cfg)


def _completion_logp(model, tokenizer, example: dict) -> float:
    import torch

    prompt = tokenizer.apply_chat_template(example[S.PROMPT], add_generation_prompt=True, return_dict=False)
    ids = tokenizer.apply_chat_template(example[S.PROMPT] + example[S.COMPLETION], return_dict=False)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    logps = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return float(logps[len(prompt) - 1 :].sum())


@pytest.mark.slow
def test_in_process_sft_learns_the_profiles_and_exports_a_loadable_model(tmp_path, asset_home):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlrf4rec.core.lineage import sft_policy
    from rlrf4rec.stages.data import run_data
    from rlrf4rec.stages.sft import run_sft

    cfg = _cfg(tmp_path, asset_home, max_users=8)
    run_data(cfg)
    stage = run_sft(cfg, on_ray=False)
    stats = read_marker(stage)["stats"]
    assert stats["examples/train"] == 8 and stats["examples/eval"] > 0 and stats["steps"] == 3
    # Held out (valid users, never trained on): the completion loss falls from the untrained model's.
    assert stats["eval/loss"] < stats["eval/loss_start"]
    history = json.loads((stage / "history.json").read_text())
    assert [h["step"] for h in history if "train/loss" in h] == [1, 2, 3]
    assert [h["step"] for h in history if "eval/loss" in h] == [0, 3]

    tokenizer = AutoTokenizer.from_pretrained(sft_policy(cfg))
    tuned = AutoModelForCausalLM.from_pretrained(sft_policy(cfg)).eval()
    base = AutoModelForCausalLM.from_pretrained(assets.resolve(cfg.models.llm, asset_home)).eval()
    examples = read_parquet(stage / "examples.parquet", S.SFT_EXAMPLES).to_pylist()
    held_out = next(e for e in examples if e[S.SPLIT] == "valid")
    assert _completion_logp(tuned, tokenizer, held_out) > _completion_logp(base, tokenizer, held_out) + 1.0
    assert run_sft(cfg, on_ray=False) == stage  # complete: a re-run trains nothing


@pytest.mark.slow
def test_sft_on_two_ray_workers_resumes_after_a_killed_worker(tmp_path, asset_home, tiny_policy):
    """The tiny random policy: what is checked is the Ray Train machinery (the learning is the in-process test's)."""
    import ray

    from rlrf4rec.stages.data import run_data
    from rlrf4rec.stages.sft import run_sft

    # Two restarts allowed: on a loaded 2-core box a worker health check can time out once besides the kill.
    cfg = _cfg(
        tmp_path, asset_home, str(tiny_policy), num_workers=2, per_device_batch_size=2, save_steps=1, max_failures=2
    )
    cfg = dataclasses.replace(cfg, fault=FaultConfig(dpo_step=2))
    run_data(cfg)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        stage = run_sft(cfg)
    finally:
        ray.shutdown()
    stats = read_marker(stage)["stats"]
    assert stats["on_ray"] and stats["steps"] == 3
    assert stats["resumed_after"] and stats["resumed_after"][-1] in (1, 2)  # from step 1's or step 2's checkpoint
    assert stats["eval/loss"] < stats["eval/loss_start"]
    assert (stage / "model" / "model.safetensors").is_file()
    assert not list((cfg.run_path / "ray_train").glob("sft-*"))
