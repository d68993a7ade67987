"""Reward scoring throughput vs the bare encoder on the same texts (target: reward >= 0.8x encoder texts/s).

The reward of a text = encode it (frozen sentence encoder) + re-rank its user's lists with the frozen knowledge-
augmented recommender. The encoder dominates; this measures how much the recommender side costs on top.

    .venv/bin/python benchmarks/reward_throughput.py [--config configs/ml100k-cpu.yaml] [--texts 256]

Needs a run directory with the data stage and `recommender/base` (`rlrf4rec train-recommender`). The texts are
each user's history text with a synthetic preference sentence in front, so no LLM is needed.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from common import append_section, load, machine

from rlrf4rec.core import assets
from rlrf4rec.core.config import load_config
from rlrf4rec.core.history import user_history_texts
from rlrf4rec.core.knowledge import TextEncoder
from rlrf4rec.core.prompts import user_knowledge_text
from rlrf4rec.core.scoring import RewardModel

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "ml100k-cpu.yaml"))
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()

    cfg = load_config(args.config)
    histories = user_history_texts(cfg)
    reward_model = RewardModel.load(cfg.run_path / "recommender" / "base", cfg.run_path / "data")
    users = sorted(reward_model.by_user)[: args.texts]
    moods = ["likes tense thrillers", "prefers light comedies", "enjoys old classics", "avoids violent films"]
    texts = [user_knowledge_text(histories[u], f"This user {moods[i % 4]}.") for i, u in enumerate(users)]
    encoder = TextEncoder(
        assets.resolve(cfg.models.encoder, assets.asset_home(cfg.assets.home)),
        cfg.encode.max_length,
        cfg.encode.batch_size,
    )
    encoder.encode(texts[:8])  # warm-up: first-call allocations and kernel selection

    bare, full = [], []
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        start = time.perf_counter()
        encoder.encode(texts)
        bare.append(time.perf_counter() - start)
        start = time.perf_counter()
        rewards = reward_model.score(users, reward_model.encode(encoder, texts))
        full.append(time.perf_counter() - start)
    bare_tps, full_tps = len(texts) / min(bare), len(texts) / min(full)
    lines = [
        f"- Machine: {machine()}; load average {load()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}.",
        f"- Work: {len(texts)} user texts of ML-100k (history text + one preference sentence), encoder "
        f"{cfg.models.encoder} at max_length {cfg.encode.max_length}, batch {cfg.encode.batch_size}; reward = "
        f"encode + mean NDCG@5 over each user's lists ({sum(len(reward_model.by_user[u][1]) for u in users)} lists) "
        f"with the base-knowledge PRM; best of {args.repeats} interleaved repeats.",
        "",
        "| path | seconds | texts/s |",
        "|---|---|---|",
        f"| bare encoder | {min(bare):.2f} | {bare_tps:.1f} |",
        f"| reward (encoder + recommender) | {min(full):.2f} | {full_tps:.1f} |",
        "",
        f"reward / encoder throughput: {full_tps / bare_tps:.2f}x (target >= 0.8); mean reward {rewards.mean():.4f}.",
        "",
    ]
    append_section("reward scoring vs bare encoder", lines, args.results)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
