"""The shift stage: how far a DPO round moved the policy, measured on the models themselves."""

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from synthetic import generations_table, stage_with
from test_dpo import CHOSEN_TEXT, REJECTED_TEXT, make_pairs

from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import read_marker, stage_output, write_parquet
from rlrf4rec.core.config import RunConfig, from_dict
from rlrf4rec.core.layout import GENERATIONS, POLICY_MODEL, SHIFT_PER_TEXT
from rlrf4rec.stages.shift import completion_logps, pair_shift, per_token_kl, run_shift


def test_pair_shift_and_kl_by_hand():
    policy = {"chosen": np.array([-10.0, -20.0, -5.0]), "rejected": np.array([-12.0, -18.0, -9.0])}
    ref = {"chosen": np.array([-11.0, -20.0, -6.0]), "rejected": np.array([-11.0, -19.0, -8.0])}
    # chosen changes +1, 0, +1; rejected -1, +1, -1; margins 0.1 * (2, -1, 2)
    out = pair_shift(policy, ref, beta=0.1)
    assert out["train/pair_accuracy"] == pytest.approx(2 / 3)
    assert out["train/margin_mean"] == pytest.approx(0.1)
    assert out["train/chosen_logp_change"] == pytest.approx(2 / 3)
    assert out["train/rejected_logp_change"] == pytest.approx(-1 / 3)
    assert per_token_kl(np.array([-3.0, -8.0]), np.array([-4.0, -10.0]), np.array([2, 4])) == pytest.approx(3 / 6)


def test_completion_logps_match_one_sequence_at_a_time(tiny_policy):
    """Shared-prompt rows (several completions of one prompt, segment attention), batched with padding, give each
    completion's log-probability as a plain forward pass over that one sequence does."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_policy)
    long = "a much longer prompt with many more words in it than the first"
    # Two completions share the first prompt and three the second: each group is one row, the prompt run once.
    prompts = ["a short prompt", long, "a short prompt", "mid prompt here", long, long]
    completions = [
        tok("one two three", add_special_tokens=False)["input_ids"],
        [5, 6],
        [7, 8, 9, 10, 11, 12, 13],
        [14],
        [15, 16, 17],
        [18, 19, 20, 21],
    ]
    sums, counts = completion_logps(model, tok, prompts, completions, batch_size=2)
    assert counts.tolist() == [len(c) for c in completions]
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"] + c])
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        assert sums[i] == pytest.approx(logp[-len(c) :].sum().item(), abs=1e-4)
    assert np.allclose(completion_logps(model, tok, prompts, completions, batch_size=1)[0], sums, atol=1e-4)


def _dpo_stage(path, model_dir):
    with stage_output(path, "fp-dpo", "") as (tmp, _):
        shutil.copytree(model_dir, tmp / POLICY_MODEL)
    return path


def test_a_policy_equal_to_its_reference_has_not_moved_and_a_changed_one_has(tiny_policy, tmp_path):
    """Step 0 by construction (the tuned model is the reference): accuracy 0, every change and the KL exactly 0.
    A policy whose weights changed: log-probabilities change and the per-text rows are written."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = from_dict(RunConfig, {"name": "t", "run_dir": str(tmp_path / "run"), "dpo": {"beta": 0.1}})
    pairs = tmp_path / "pairs.parquet"
    write_parquet(make_pairs(4), pairs, S.PAIRS)
    gens = generations_table([("u0", 0, CHOSEN_TEXT, []), ("u1", 0, REJECTED_TEXT, ["off_topic"])])
    texts = stage_with(tmp_path / "gen", GENERATIONS, gens, S.GENERATIONS)
    same = run_shift(
        cfg, _dpo_stage(tmp_path / "dpo-same", tiny_policy), str(tiny_policy), pairs, texts, tmp_path / "s0"
    )
    stats = read_marker(same)["stats"]
    assert stats["train/pairs"] == 4 and stats["valid/texts"] == 2 and stats["valid/off_topic_share"] == 0.5
    assert stats["train/pair_accuracy"] == 0.0 and stats["train/margin_mean"] == 0.0
    assert stats["valid/kl_per_token"] == 0.0 and stats["train/chosen_logp_change"] == 0.0

    moved = tmp_path / "moved"
    model = AutoModelForCausalLM.from_pretrained(tiny_policy)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(moved)
    shutil.copy(tiny_policy / "tokenizer.json", moved)
    out = run_shift(cfg, _dpo_stage(tmp_path / "dpo-moved", moved), str(tiny_policy), pairs, texts, tmp_path / "s1")
    stats = read_marker(out)["stats"]
    assert stats["train/chosen_logp_change"] != 0.0 and stats["valid/kl_per_token"] != 0.0
    rows = pq.read_table(out / SHIFT_PER_TEXT).to_pylist()
    assert [r[S.USER_ID] for r in rows] == ["u0", "u1"] and all(r["tokens"] > 5 for r in rows)
    assert run_shift(cfg, tmp_path / "dpo-moved", str(tiny_policy), pairs, texts, tmp_path / "s1") == out  # skipped

    # The cheap estimate (`rlrf4rec arms`): the first pairs and each user's first text only, in a stage of its own.
    three = generations_table([("u0", 0, CHOSEN_TEXT, []), ("u0", 1, REJECTED_TEXT, []), ("u1", 0, CHOSEN_TEXT, [])])
    texts3 = stage_with(tmp_path / "gen3", GENERATIONS, three, S.GENERATIONS)
    part = run_shift(
        cfg, tmp_path / "dpo-moved", str(tiny_policy), pairs, texts3, tmp_path / "s2", max_pairs=2, texts_per_user=1
    )
    stats = read_marker(part)["stats"]
    assert stats["train/pairs"] == 2 and stats["valid/texts"] == 2
    rows = pq.read_table(part / SHIFT_PER_TEXT).to_pylist()
    assert [(r[S.USER_ID], r[S.SAMPLE_IDX]) for r in rows] == [("u0", 0), ("u1", 0)]
