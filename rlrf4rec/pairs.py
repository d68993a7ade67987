"""Preference pairs from rewards (METHOD.md section 6): per user, the best and the worst of its N texts.

Consumes rewarded generations (user, sample, text, reward) and each user's prompt messages; produces TRL
conversational rows (prompt, chosen, rejected) with provenance (both sample ids and rewards, margin, policy
version, round), and stats: pairs kept, users dropped per reason, margin distribution. Users with a single sample,
with all rewards tied, or with a margin under `min_margin` give no pair. A NaN reward is a bug upstream and raises.
Knows nothing about how rewards were computed or how DPO uses the pairs.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from rlrf4rec import schema as S


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


def select_pairs(
    candidates: Mapping[str, Sequence[Candidate]], min_margin: float
) -> tuple[list[Pair], dict[str, int | float]]:
    """Pairs for every user (sorted by user id) and stats of what was kept and dropped."""
    pairs, dropped = [], Counter()
    for user_id in sorted(candidates):
        result = select_pair(user_id, candidates[user_id], min_margin)
        if isinstance(result, Pair):
            pairs.append(result)
        else:
            dropped[result] += 1
    margins = np.array([p.margin for p in pairs])
    stats: dict[str, int | float] = {"users": len(candidates), "pairs": len(pairs)}
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
