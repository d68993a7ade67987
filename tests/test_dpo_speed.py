"""The DPO speed-ups keep the loss: precomputed reference log-probs and the shared-prompt row give TRL's numbers.

The packing is checked exactly on hand-made token ids. The loss is checked on a tiny random Llama (SmolLM2's
tokenizer and chat template, 2 layers of width 64) whose policy is moved off the reference after loading (the LoRA
B matrices off zero; or, fine-tuned in full, every weight): every combination of the two switches gives stock TRL's
loss, gradients and reward margins (the reference run at each step, chosen and rejected as two padded rows) on the
same pairs, some completions cut by max_length. LoRA takes the compact LM-head path, full fine-tuning TRL's fused one.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from test_dpo import make_pairs

from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import write_parquet
from rlrf4rec.core.config import DPOConfig, from_dict
from rlrf4rec.core.dpo_trainer import pack_shared_prompt, segment_attention

# --------------------------------------------------------------------------------------------------- packing (pure)


def test_pack_shared_prompt_runs_the_prompt_once_and_each_completion_from_its_last_token():
    examples = [
        {
            "prompt_ids": [11, 12, 13],
            "chosen_ids": [21, 22],
            "rejected_ids": [31],
            "ref_chosen_logps": -1.5,
            "ref_rejected_logps": -2.5,
        },
        {
            "prompt_ids": [14, 15],
            "chosen_ids": [23, 24, 25],
            "rejected_ids": [32, 33, 34, 35],
            "ref_chosen_logps": -3.0,
            "ref_rejected_logps": -4.0,
        },
    ]
    batch = pack_shared_prompt(examples, pad_token_id=0, max_length=5)  # the second pair keeps 3 completion tokens
    assert batch["input_ids"].tolist() == [
        [11, 12, 13, 21, 22, 13, 31, 0, 0],
        [14, 15, 23, 24, 25, 15, 32, 33, 34],
    ]
    assert batch["position_ids"].tolist() == [
        [0, 1, 2, 3, 4, 2, 3, 0, 0],
        [0, 1, 2, 3, 4, 1, 2, 3, 4],
    ]
    assert batch["segment_ids"].tolist() == [
        [0, 0, 1, 1, 1, 2, 2, -1, -1],
        [0, 1, 1, 1, 1, 2, 2, 2, 2],
    ]
    # Position t scores shift_labels[t]: the last prompt token opens both segments, so each scores its first token.
    assert batch["shift_labels"].tolist() == [
        [-100, -100, 21, 22, -100, 31, -100, -100, -100],
        [-100, 23, 24, 25, -100, 32, 33, 34, -100],
    ]
    assert batch["ref_chosen_logps"].tolist() == [-1.5, -3.0] and batch["ref_rejected_logps"].tolist() == [-2.5, -4.0]
    assert set(pack_shared_prompt(examples[:1], 0, None)) == {
        "input_ids",
        "position_ids",
        "segment_ids",
        "shift_labels",
        "ref_chosen_logps",
        "ref_rejected_logps",
    }


def test_segment_attention_hides_chosen_and_rejected_from_each_other():
    import torch

    mask = segment_attention(torch.tensor([[0, 0, 1, 1, 2, 2, -1]]))
    assert mask.shape == (1, 1, 7, 7)
    assert mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 1, 0],
        [1, 1, 0, 0, 0, 0, 1],
    ]


# --------------------------------------------------------------------------------------------------- same loss


def _loss(policy: Path, pairs: Path, out: Path, max_length: int, **dpo):
    """Loss, gradients and logged reward margin of one batch of all pairs, the policy moved the same way each time."""
    import torch

    from rlrf4rec.stages.dpo import build_trainer

    dc = from_dict(
        DPOConfig,
        {
            "beta": 0.5,
            "per_device_batch_size": 8,
            "grad_accum": 1,
            "max_length": max_length,
            "max_prompt_length": max_length - 1,
            "lora_r": 4,
            "lora_alpha": 8,
            "lora_dropout": 0.0,
            **dpo,
        },
        "dpo.",
    )
    trainer = build_trainer(dc, policy, pairs, None, out, seed=0)
    torch.manual_seed(1)
    trained = [p for p in trainer.model.parameters() if p.requires_grad]
    for p in trained:
        if not dc.lora:
            p.data.add_(torch.randn_like(p), alpha=0.02)
        elif p.abs().sum() == 0:  # LoRA B, zero until trained (A starts random)
            p.data.normal_(std=0.1)
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer._prepare_inputs(trainer.data_collator(examples))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in trained], trainer._metrics["train"]["rewards/margins"][-1]


@pytest.mark.parametrize("lora", [True, False])
def test_precomputed_reference_and_shared_prompt_keep_trls_loss(tiny_policy, tmp_path, lora):
    import torch
    from transformers import AutoTokenizer

    pairs = tmp_path / "pairs.parquet"
    table = make_pairs(4)
    write_parquet(table, pairs, S.PAIRS)
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    prompts = [
        len(tokenizer.apply_chat_template(m, add_generation_prompt=True, return_dict=False))
        for m in table.column(S.PROMPT).to_pylist()
    ]
    max_length = max(prompts) + 12  # cuts the chosen text (~17 tokens), and the rejected (~9) after longer prompts

    stock = _loss(
        tiny_policy, pairs, tmp_path / "stock", max_length, lora=lora, precompute_ref_logps=False, share_prompt=False
    )
    assert abs(stock[0] - math.log(2)) > 1e-3  # policy and reference differ: the reference matters
    for switches in (
        {"precompute_ref_logps": True, "share_prompt": False},
        {"precompute_ref_logps": False, "share_prompt": True},
        {"precompute_ref_logps": True, "share_prompt": True},
    ):
        name = "-".join(k for k, v in switches.items() if v)
        loss, grads, margin = _loss(tiny_policy, pairs, tmp_path / name, max_length, lora=lora, **switches)
        assert loss == pytest.approx(stock[0], rel=1e-5), switches
        assert margin == pytest.approx(stock[2], rel=1e-4, abs=1e-6), switches
        for got, want in zip(grads, stock[1], strict=True):
            # float32 summation order differs between the paths (and between CPUs): an element near zero may move by
            # a few ulps of the tensor's largest entry, never by a share of it as a wrong mask or reference would
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
