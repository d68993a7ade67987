"""How far a DPO round moved the policy: measured on the tuned policy and its reference, not read off the trainer.

DPO's logged train values are those of each step's few pairs, before that step's update; they say little about the
policy the round ends with. This stage loads the round's tuned policy (`<run>/dpo/round<t>/model`) and its
reference (the policy the round started from) and computes, in this process:
- on every train pair of the round: DPO's implicit reward margin, beta * ((log pi(chosen) - log ref(chosen)) -
  (log pi(rejected) - log ref(rejected))), its mean and the share of pairs it orders as labelled (train pair
  accuracy); the mean change of the chosen and of the rejected texts' log-probabilities (both falling is a known
  failure). At step 0 the policy is its reference: every margin and change is 0, the accuracy 0.
- on held-out prompts (the valid users'): the tuned policy's own sampled texts (the loop's `generate_valid_tuned`),
  whose mean per-token log pi(y) - log ref(y) is the Monte Carlo estimate of the per-token KL(pi || ref); 0 at step 0.
  Also the off-topic share of those texts (generate.quality_flags).
A completion's log-probability is that of its tokens (the text, then the end-of-turn token when generation stopped
on it, or when it is a pair's text) after the chat-rendered prompt, tokenised apart as TRL does. Published to
`rounds/round<t>/shift/` (metrics.json; per sampled text its tokens and both log-probabilities) with a marker; a
re-run with the same inputs does nothing. Runs in the driver process, on its GPU when it has one (bfloat16), else on
its CPUs (float32): two forward passes per text, about a minute a round for the CPU demo's 135M policy.
"""

from __future__ import annotations

import logging
import os
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import Fingerprint, publish, read_parquet, require_marker, write_json, write_parquet
from rlrf4rec.core.config import RunConfig, dump_config
from rlrf4rec.core.layout import GENERATIONS, METRICS, POLICY_MODEL, SHIFT_PER_TEXT
from rlrf4rec.core.stage import Stage

log = logging.getLogger(__name__)


def completion_logps(model, tokenizer, prompts: list[str], completions: list[list[int]], batch_size: int = 4):
    """Summed log-probability of each completion's token ids after its rendered prompt, and the token counts.

    Completions of one prompt share one row, the prompt run once (the DPO stage's shared-prompt layout, any number
    of completions): `prompt[:-1] | prompt[-1] c_1 | prompt[-1] c_2 | ...`, each segment at the prompt's continuing
    positions and attending to the prompt and itself only (dpo_trainer.segment_attention). The LM head runs on the
    completion positions only. A pair's prompt, or a user's N sampled texts, costs one prompt pass instead of N."""
    import torch

    from rlrf4rec.core.dpo_trainer import segment_attention

    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    rows = []
    for prompt, members in groups.items():
        pid = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        n = len(pid)
        ids, pos, seg, lab = pid[:-1], list(range(n - 1)), [0] * (n - 1), [-100] * (n - 1)
        for k, i in enumerate(members, start=1):
            c = list(completions[i])
            ids += pid[-1:] + c
            pos += list(range(n - 1, n + len(c)))
            seg += [k] * (len(c) + 1)
            lab += c + [-100]
        rows.append((ids, pos, seg, lab, members))
    rows.sort(key=lambda r: len(r[0]))  # similar lengths batch together: less padding
    sums = np.zeros(len(prompts))
    counts = np.array([len(c) for c in completions], dtype=np.int64)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    head = model.get_output_embeddings()
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = max(len(r[0]) for r in batch)
        ids, pos, seg, lab = (
            torch.tensor([r[field] + [value] * (width - len(r[field])) for r in batch], device=model.device)
            for field, value in ((0, pad), (1, 0), (2, -1), (3, -100))
        )
        with torch.inference_mode():
            hidden = model(
                input_ids=ids,
                attention_mask=segment_attention(seg),
                position_ids=pos,
                use_cache=False,
                output_hidden_states=True,
                logits_to_keep=1,
            ).hidden_states[-1]
            scored = lab != -100
            logp = torch.log_softmax(head(hidden[scored]).float(), -1).gather(-1, lab[scored][:, None])[:, 0]
        owner = seg[scored].cpu().numpy()
        row_of = torch.nonzero(scored)[:, 0].cpu().numpy()
        logp = logp.cpu().numpy()
        for j, (*_, members) in enumerate(batch):
            for k, i in enumerate(members, start=1):
                sums[i] = float(logp[(row_of == j) & (owner == k)].sum())
    return sums, counts


def pair_shift(policy_logps: dict[str, np.ndarray], ref_logps: dict[str, np.ndarray], beta: float) -> dict:
    """Implicit-reward statistics of pairs from summed log-probs of their chosen and rejected texts."""
    d_chosen = policy_logps["chosen"] - ref_logps["chosen"]
    d_rejected = policy_logps["rejected"] - ref_logps["rejected"]
    margin = beta * (d_chosen - d_rejected)
    return {
        "train/pair_accuracy": float(np.mean(margin > 0)),
        "train/margin_mean": float(margin.mean()),
        "train/chosen_logp_change": float(d_chosen.mean()),
        "train/rejected_logp_change": float(d_rejected.mean()),
    }


def per_token_kl(policy_sums: np.ndarray, ref_sums: np.ndarray, counts: np.ndarray) -> float:
    """Mean per-token log pi(y) - log ref(y) over texts sampled from pi: the estimate of per-token KL(pi || ref)."""
    return float((policy_sums - ref_sums).sum() / max(int(counts.sum()), 1))


def _pair_texts(pairs: pa.Table, tokenizer, eos: list[int]) -> tuple[list[str], dict[str, list[list[int]]]]:
    prompts = [
        tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
        for m in pairs.column(S.PROMPT).to_pylist()
    ]
    texts = {
        side: [
            tokenizer(m[-1]["content"], add_special_tokens=False)["input_ids"] + eos
            for m in pairs.column(col).to_pylist()
        ]
        for side, col in (("chosen", S.CHOSEN), ("rejected", S.REJECTED))
    }
    return prompts, texts


def run_shift(
    cfg: RunConfig,
    dpo_dir: Path,
    reference: str,
    pairs_path: Path,
    tuned_texts: Path,
    out: Path,
    *,
    max_pairs: int | None = None,
    texts_per_user: int | None = None,
) -> Path:
    """Measure how far the DPO (or SFT) stage `dpo_dir` moved its policy from `reference`: on the train pairs of
    `pairs_path` and on the tuned policy's sampled texts of the generate stage `tuned_texts`; writes `out`.
    `max_pairs` / `texts_per_user`: the first pairs and each user's first texts only (a cheaper estimate)."""
    upstream = {
        "policy": require_marker(dpo_dir, "dpo")["fingerprint"],
        "texts": require_marker(tuned_texts, "generate")["fingerprint"],
    }
    subset = {"pairs": max_pairs, "texts": texts_per_user} if max_pairs or texts_per_user else {}
    fingerprint = Fingerprint("shift", {}, upstream, {"beta": cfg.dpo.beta, **subset})
    return publish(
        out, fingerprint, partial(_measure, cfg, dpo_dir, reference, pairs_path, tuned_texts, subset), dump_config(cfg)
    )


def _measure(
    cfg: RunConfig,
    dpo_dir: Path,
    reference: str,
    pairs_path: Path,
    tuned_texts: Path,
    subset: dict,
    tmp: Path,
    st: dict,
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    max_pairs, texts_per_user = subset.get("pairs"), subset.get("texts")
    tokenizer = AutoTokenizer.from_pretrained(reference)
    pairs = read_parquet(pairs_path, S.PAIRS)
    gens = read_parquet(tuned_texts / GENERATIONS, S.GENERATIONS)
    if max_pairs is not None:
        pairs = pairs.slice(0, max_pairs)
    if texts_per_user is not None:
        gens = gens.filter(pc.less(gens.column(S.SAMPLE_IDX), texts_per_user))
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    sampled = [
        tokenizer(t, add_special_tokens=False)["input_ids"] + (eos if reason == "stop" else [])
        for t, reason in zip(gens.column(S.PREFERENCE_TEXT).to_pylist(), gens.column(S.FINISH_REASON).to_pylist())
    ]
    prompts, pair_texts = _pair_texts(pairs, tokenizer, eos)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    # One call per model: each train pair's prompt once for its chosen and rejected, each valid user's prompt once
    # for its N sampled texts.
    n = len(prompts)
    all_prompts = prompts + prompts + gens.column(S.PROMPT).to_pylist()
    all_texts = pair_texts["chosen"] + pair_texts["rejected"] + sampled
    logps: dict[str, dict[str, np.ndarray]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # this process's cores: it runs between the Ray stages
    try:
        for name, path in (("policy", Path(dpo_dir) / POLICY_MODEL), ("reference", Path(reference))):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
            sums, counts = completion_logps(model.to(device).eval(), tokenizer, all_prompts, all_texts)
            logps[name] = {
                "chosen": sums[:n],
                "rejected": sums[n : 2 * n],
                "sampled": sums[2 * n :],
                "sampled_tokens": counts[2 * n :],
            }
            del model
    finally:
        torch.set_num_threads(threads)
    stats = {
        "train/pairs": pairs.num_rows,
        **pair_shift(logps["policy"], logps["reference"], cfg.dpo.beta),
        "valid/texts": gens.num_rows,
        "valid/kl_per_token": per_token_kl(
            logps["policy"]["sampled"], logps["reference"]["sampled"], logps["policy"]["sampled_tokens"]
        ),
        "valid/off_topic_share": float(np.mean(["off_topic" in f for f in gens.column(S.FLAGS).to_pylist()])),
    }
    per_text = pa.table(
        {
            S.USER_ID: gens.column(S.USER_ID),
            S.SAMPLE_IDX: gens.column(S.SAMPLE_IDX),
            "tokens": pa.array(logps["policy"]["sampled_tokens"], pa.int64()),
            "logp_policy": pa.array(logps["policy"]["sampled"]),
            "logp_reference": pa.array(logps["reference"]["sampled"]),
        }
    )
    write_parquet(per_text, tmp / SHIFT_PER_TEXT)
    st.update(stats)
    write_json(stats, tmp / METRICS)
    log.info(
        "%s: train pair accuracy %.3f (margin %+.4f; chosen %+.2f, rejected %+.2f nats), valid KL %.4f nats/token",
        Path(dpo_dir).name,
        stats["train/pair_accuracy"],
        stats["train/margin_mean"],
        stats["train/chosen_logp_change"],
        stats["train/rejected_logp_change"],
        stats["valid/kl_per_token"],
    )


STAGE = Stage(
    "shift",
    "how far a round's fit moved the policy: margins and log-prob changes on its pairs, KL on valid texts",
    upstream=("generate", "pairs", "dpo"),
    inside="loop",
)
