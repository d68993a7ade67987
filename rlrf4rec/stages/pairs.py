"""Preference pairs from rewards (METHOD.md section 6): per user, the best and the worst of its N texts
(`pairs.strategy: best_worst`, the method's), or every pair of them whose reward gap passes the margin (`all`: up to
N(N-1)/2 per user, a deviation from the paper that buys pairs where users are few).

Consumes rewarded generations (user, sample, text, reward) and each user's prompt messages; produces TRL
conversational rows (prompt, chosen, rejected) with provenance (both sample ids and rewards, margin, policy
version, round), and stats: pairs kept, users dropped per reason, margin distribution. Users with a single sample,
with all rewards tied, or with a margin under `min_margin` give no pair. A NaN reward is a bug upstream and raises.
The pure core (select_pairs, pairs_table) comes first; the stage (run_pairs) joins a generate stage's texts with
its reward stage and writes `pairs_train.parquet` / `pairs_valid.parquet` (schema.PAIRS).
Knows nothing about how rewards were computed or how DPO uses the pairs.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import (
    Fingerprint,
    publish,
    read_parquet,
    read_table,
    require_marker,
    write_parquet,
)
from rlrf4rec.core.config import RunConfig, dump_config
from rlrf4rec.core.history import prompt_history_texts
from rlrf4rec.core.layout import GENERATIONS, REWARDS, pairs_file
from rlrf4rec.core.prompts import preference_messages
from rlrf4rec.core.stage import Option, Stage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    sample_idx: int
    text: str
    reward: float


@dataclass(frozen=True)
class Pair:
    user_id: str
    chosen: Candidate
    rejected: Candidate

    @property
    def margin(self) -> float:
        return self.chosen.reward - self.rejected.reward


DROP_SINGLE = "single sample"
DROP_TIE = "all rewards tied"
DROP_MARGIN = "margin below min_margin"


def select_pair(user_id: str, candidates: Sequence[Candidate], min_margin: float) -> Pair | str:
    """The (argmax, argmin) pair of one user's candidates, or the reason it is dropped.

    Ties break on the lower sample index for both ends, so the choice does not depend on row order.
    """
    for c in candidates:
        if not math.isfinite(c.reward):
            raise ValueError(f"reward of user {user_id!r} sample {c.sample_idx} is {c.reward}; fix the reward stage")
    if len(candidates) < 2:
        return DROP_SINGLE
    ordered = sorted(candidates, key=lambda c: c.sample_idx)
    chosen = max(ordered, key=lambda c: c.reward)  # max/min return the first of equals: the lower sample index
    rejected = min(ordered, key=lambda c: c.reward)
    if chosen.reward == rejected.reward:
        return DROP_TIE
    pair = Pair(user_id, chosen, rejected)
    if pair.margin < min_margin:
        return DROP_MARGIN
    return pair


def select_all_pairs(user_id: str, candidates: Sequence[Candidate], min_margin: float) -> list[Pair] | str:
    """Every (higher, lower) pair of one user's candidates whose reward gap is positive and at least `min_margin`,
    ordered by (chosen, rejected) sample index, or the reason none is kept."""
    best_worst = select_pair(user_id, candidates, min_margin)
    if not isinstance(best_worst, Pair):
        return best_worst  # the widest gap fails: so does every other
    ordered = sorted(candidates, key=lambda c: c.sample_idx)
    return [
        Pair(user_id, a, b)
        for a in ordered
        for b in ordered
        if a.reward > b.reward and a.reward - b.reward >= min_margin
    ]


PAIR_STRATEGIES = {"best_worst": select_pair, "all": select_all_pairs}


def select_pairs(
    candidates: Mapping[str, Sequence[Candidate]], min_margin: float, strategy: str = "best_worst"
) -> tuple[list[Pair], dict[str, int | float]]:
    """Pairs for every user (sorted by user id; `strategy` a key of PAIR_STRATEGIES) and stats of what was kept and
    dropped."""
    pairs, dropped = [], Counter()
    users_with_pairs = 0
    for user_id in sorted(candidates):
        result = PAIR_STRATEGIES[strategy](user_id, candidates[user_id], min_margin)
        if isinstance(result, str):
            dropped[result] += 1
            continue
        users_with_pairs += 1
        pairs.extend([result] if isinstance(result, Pair) else result)
    margins = np.array([p.margin for p in pairs])
    stats: dict[str, int | float] = {"users": len(candidates), "users_with_pairs": users_with_pairs}
    stats["pairs"] = len(pairs)
    stats.update({f"dropped/{reason}": dropped[reason] for reason in (DROP_SINGLE, DROP_TIE, DROP_MARGIN)})
    if len(margins):
        stats.update(
            {
                "margin/mean": float(margins.mean()),
                "margin/min": float(margins.min()),
                "margin/p50": float(np.median(margins)),
                "margin/max": float(margins.max()),
            }
        )
    return pairs, stats


def pairs_table(
    pairs: Sequence[Pair],
    prompts: Mapping[str, list[dict[str, str]]],
    splits: Mapping[str, str],
    policy_version: str,
    round_idx: int,
) -> pa.Table:
    """TRL conversational rows: prompt = the generation's chat messages, chosen/rejected = one assistant turn."""

    def turn(text: str) -> list[dict[str, str]]:
        return [{"role": "assistant", "content": text}]

    return pa.Table.from_pylist(
        [
            {
                S.USER_ID: p.user_id,
                S.SPLIT: splits[p.user_id],
                S.PROMPT: prompts[p.user_id],
                S.CHOSEN: turn(p.chosen.text),
                S.REJECTED: turn(p.rejected.text),
                S.CHOSEN_SAMPLE_IDX: p.chosen.sample_idx,
                S.REJECTED_SAMPLE_IDX: p.rejected.sample_idx,
                S.CHOSEN_REWARD: p.chosen.reward,
                S.REJECTED_REWARD: p.rejected.reward,
                S.REWARD_MARGIN: p.margin,
                S.POLICY_VERSION: policy_version,
                S.ROUND: round_idx,
            }
            for p in pairs
        ],
        schema=S.PAIRS,
    )


# --------------------------------------------------------------------------------------------------- the stage


def rewarded_candidates(generations_dir: Path, rewards_dir: Path) -> dict[str, list[Candidate]]:
    """user -> its rewarded, non-empty texts as Candidates: a generate stage joined with its reward stage."""
    gens = read_parquet(generations_dir / GENERATIONS, S.GENERATIONS)
    rewards = read_parquet(rewards_dir / REWARDS, S.REWARDS)
    reward_of = {
        (u, i): r
        for u, i, r in zip(
            rewards.column(S.USER_ID).to_pylist(),
            rewards.column(S.SAMPLE_IDX).to_pylist(),
            rewards.column(S.REWARD).to_pylist(),
        )
    }
    out: dict[str, list[Candidate]] = {}
    for row in gens.select([S.USER_ID, S.SAMPLE_IDX, S.PREFERENCE_TEXT, S.FLAGS]).to_pylist():
        if "empty" in row[S.FLAGS]:
            continue  # nothing to learn from an empty answer, as chosen or as rejected
        key = (row[S.USER_ID], row[S.SAMPLE_IDX])
        if key not in reward_of:
            continue  # not rewarded: its user has no re-rank list
        out.setdefault(key[0], []).append(Candidate(key[1], row[S.PREFERENCE_TEXT], reward_of[key]))
    return out


def run_pairs(
    cfg: RunConfig, sources: list[tuple[Path, Path]], stage_dir: Path, policy_version: str, round_idx: int
) -> Path:
    """The pairs stage: best/worst pairs of every user in `sources` [(generations dir, rewards dir)], one file per
    split in `stage_dir` (layout.pairs_file)."""
    stage = cfg.layout.relative(stage_dir)
    upstream = {
        cfg.layout.relative(d): require_marker(d, "generate / reward")["fingerprint"] for pair in sources for d in pair
    }
    # reward.ensemble is in the rewards' own fingerprints (their recommenders'), so it is not hashed twice here
    fingerprint = Fingerprint("pairs", cfg.section_hashes("reward", "pairs", ignore=("reward.ensemble",)), upstream)

    def build(tmp: Path, stats: dict) -> None:
        candidates: dict[str, list[Candidate]] = {}
        for gen_dir, rew_dir in sources:
            candidates.update(rewarded_candidates(gen_dir, rew_dir))
        seq = read_table(cfg.layout.data, "sequences")
        splits = dict(zip(seq.column(S.USER_ID).to_pylist(), seq.column(S.SPLIT).to_pylist()))
        histories = prompt_history_texts(cfg)
        prompts = {u: preference_messages(histories[u], cfg.generate.domain) for u in candidates}
        for split in ("train", "valid"):
            users = {u: c for u, c in candidates.items() if splits[u] == split}
            pairs, split_stats = select_pairs(users, cfg.reward.min_margin, cfg.pairs.strategy)
            write_parquet(
                pairs_table(pairs, prompts, splits, policy_version, round_idx), tmp / pairs_file(split), S.PAIRS
            )
            stats.update({f"{split}/{k}": v for k, v in split_stats.items()})
        log.info("%s: %s", stage, stats)

    return publish(stage_dir, fingerprint, build, dump_config(cfg))


# --------------------------------------------------------------------------------------------------- the stage record


def _command(cfg: RunConfig, args: argparse.Namespace) -> list[Path]:
    layout = cfg.layout
    generations = args.generations or layout.generate
    rewards = args.rewards or layout.rewards("reward")
    version = require_marker(generations, "generate")["stats"].get("policy_version", "base")
    return [run_pairs(cfg, [(generations, rewards)], layout.pairs(args.name), version, 0)]


STAGE = Stage(
    "pairs",
    "best vs worst text per user -> DPO pairs in TRL's conversational format",
    _command,
    (
        Option(("--generations",), {"type": Path, "help": "a generate stage dir (default: <run>/generate)"}),
        Option(("--name",), {"default": "pairs", "help": "output directory <run>/pairs/<name>/"}),
        Option(("--rewards",), {"type": Path, "help": "a reward stage dir (default: <run>/rewards/reward)"}),
    ),
    upstream=("generate", "reward"),
)
