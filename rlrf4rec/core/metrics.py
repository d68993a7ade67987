"""Ranking metrics for list re-ranking (KAR protocol) and full-sort next-item evaluation (RecBole protocol).

Consumes scores and labels as torch tensors or numpy arrays and produces per-list (per-user) metric values as numpy
arrays, plus bootstrap confidence intervals over them. Knows nothing about models, texts, users or files: averaging
across users and namespacing by split ("eval/ndcg@5") happen here only through `mean_metrics`.

Definitions (METHOD.md section 9, KAR's code):
    NDCG@K = sum_{i<=K} (2^rel_i - 1) / log2(i + 1) / IDCG@K           (0 for a list without a positive)
    MAP@K  = sum_{i<=K, hit_i} (hits in top i / i) / (hits in top K)   (0 when the top K holds no hit)
    HR@K   = 1 if any positive is in the top K else 0
    MRR    = 1 / rank of the first positive over the whole list        (0 for a list without a positive)
A positive ("hit") is a label > 0; labels may be graded, which only NDCG uses.

The `reference_*` functions are slow plain-Python loops kept only for tests of the vectorized forms. At the bottom,
the RL loop's positive-control reward (`synthetic_genre_reward`), read from a text and the user's list genres.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray

# Bootstrap resamples are drawn in chunks so that memory stays ~8 MB of indices per chunk even for 10^5 users.
_BOOTSTRAP_CHUNK_ELEMENTS = 1_000_000
RERANK_KS = (1, 3, 5, 7)  # the cutoffs of every re-rank table (KAR's)
RANKED_METRICS = tuple(f"{m}@{k}" for m in ("ndcg", "map") for k in RERANK_KS)  # the columns of those tables


def _to_numpy(x: ArrayLike | Sequence, dtype=np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = (x.double() if x.is_floating_point() else x).numpy()  # bf16 has no numpy dtype
    return np.asarray(x, dtype=dtype)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive cut-offs, got {ks}; e.g. ks=(1, 3, 5, 7)")
    return ks


def _discounts(n: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, n + 2, dtype=np.float64))  # [n], 1/log2(i+1) for 1-based rank i


def _check_rank_inputs(scores, labels, mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scores, labels = _to_numpy(scores), _to_numpy(labels)
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise ValueError(
            f"scores and labels must both be [B, L] with the same shape, got {scores.shape} and {labels.shape}; "
            "pass one row per candidate list"
        )
    mask = np.ones(scores.shape, dtype=bool) if mask is None else _to_numpy(mask, dtype=bool)
    if mask.shape != scores.shape:
        raise ValueError(f"mask must have the shape of scores {scores.shape}, got {mask.shape}")
    # A NaN sorts arbitrarily and once produced a fake HR@10 of 0.42; refuse instead of ranking it.
    if np.isnan(scores[mask]).any():
        raise ValueError("scores contain NaN at unmasked positions; fix the model (e.g. fully masked attention rows)")
    if np.isnan(labels[mask]).any() or (labels[mask] < 0).any():
        raise ValueError("labels must be finite and >= 0 (0 = not relevant) at unmasked positions")
    return scores, np.where(mask, labels, 0.0), mask


def rank_order(scores: ArrayLike, mask: ArrayLike | None = None) -> np.ndarray:
    """Candidate positions in ranked order, [B, L]: descending score, ties to the earlier position, padding last."""
    scores = _to_numpy(scores)
    mask = np.ones(scores.shape, dtype=bool) if mask is None else _to_numpy(mask, dtype=bool)
    key = np.where(mask, -scores, 0.0)  # [B, L]; padded scores may be garbage, so they never enter the key
    # lexsort is stable and sorts by the last key first: valid before padded, then by -score, then by position.
    return np.lexsort((key, ~mask), axis=-1)


def rank_metrics(
    scores: ArrayLike,
    labels: ArrayLike,
    ks: Sequence[int] = (1, 3, 5, 7),
    mask: ArrayLike | None = None,
) -> dict[str, np.ndarray]:
    """Per-list NDCG@K, MAP@K, HR@K and MRR of re-ranked candidate lists.

    scores: [B, L] model scores; labels: [B, L] relevance (0 = negative); mask: [B, L] bool, False = padding
    (never ranked, never relevant). Returns name -> [B] float64, names "ndcg@K", "map@K", "hr@K", "mrr".
    """
    ks = _check_ks(ks)
    scores, labels, mask = _check_rank_inputs(scores, labels, mask)
    B, L = scores.shape
    ranked = np.take_along_axis(labels, rank_order(scores, mask), axis=1)  # [B, L] labels in ranked order
    ideal = -np.sort(-labels, axis=1)  # [B, L] best possible order
    hits = ranked > 0  # [B, L]
    cum_hits = np.cumsum(hits, axis=1)  # [B, L]
    precision = cum_hits / np.arange(1, L + 1)  # [B, L] hits so far / rank
    gain, ideal_gain = np.exp2(ranked) - 1.0, np.exp2(ideal) - 1.0  # [B, L]
    disc = _discounts(L)  # [L]

    out: dict[str, np.ndarray] = {}
    for k in ks:
        top = min(k, L)  # a cut-off past the list end counts the whole list
        dcg = (gain[:, :top] * disc[:top]).sum(axis=1)  # [B]
        idcg = (ideal_gain[:, :top] * disc[:top]).sum(axis=1)  # [B]
        out[f"ndcg@{k}"] = np.divide(dcg, idcg, out=np.zeros(B), where=idcg > 0)
        num_hits = cum_hits[:, top - 1]  # [B]
        ap_sum = (precision[:, :top] * hits[:, :top]).sum(axis=1)  # [B]
        out[f"map@{k}"] = np.divide(ap_sum, num_hits, out=np.zeros(B), where=num_hits > 0)
        out[f"hr@{k}"] = (num_hits > 0).astype(np.float64)
    any_hit = hits.any(axis=1)  # [B]
    first_hit = hits.argmax(axis=1)  # [B], 0 for rows without a hit, zeroed below
    out["mrr"] = np.where(any_hit, 1.0 / (first_hit + 1), 0.0)
    return out


def pairwise_log_likelihood(scores: ArrayLike, labels: ArrayLike, mask: ArrayLike | None = None) -> np.ndarray:
    """Per-list mean of log sigmoid(s_pos - s_neg) over the list's (positive, negative) pairs of real candidates [B].

    A smooth companion of NDCG (the BPR / RankNet log-likelihood that each positive outranks each negative): it rises
    with every positive's score and falls with every negative's, also when no order flips, where NDCG moves only at
    a flip. Lists without a positive or without a negative get 0 (they hold no preference to express).
    """
    scores, labels, mask = _check_rank_inputs(scores, labels, mask)
    positive, negative = (labels > 0) & mask, (labels <= 0) & mask  # [B, L]
    diff = scores[:, :, None] - scores[:, None, :]  # [B, L, L]: row candidate minus column candidate
    pairs = positive[:, :, None] & negative[:, None, :]
    log_sig = -np.logaddexp(0.0, -np.where(pairs, diff, 0.0))  # log sigmoid, stable for large |diff|
    count = pairs.sum(axis=(1, 2))
    total = np.where(pairs, log_sig, 0.0).sum(axis=(1, 2))
    return np.divide(total, count, out=np.zeros(len(scores)), where=count > 0)


def _exclusion_mask(exclude, shape: tuple[int, int]) -> np.ndarray:
    if exclude is None:
        return np.zeros(shape, dtype=bool)
    is_mask = (isinstance(exclude, np.ndarray) and exclude.dtype == np.bool_) or (
        isinstance(exclude, torch.Tensor) and exclude.dtype == torch.bool
    )
    if is_mask:
        if tuple(exclude.shape) != shape:
            raise ValueError(f"a bool exclude mask must have the shape of scores {shape}, got {tuple(exclude.shape)}")
        return _to_numpy(exclude, dtype=bool).copy()
    if len(exclude) != shape[0]:
        raise ValueError(
            f"exclude must be a bool mask {shape} or one index array per user ({shape[0]}), got {len(exclude)} rows"
        )
    excluded = np.zeros(shape, dtype=bool)
    for row, items in enumerate(exclude):
        excluded[row, _to_numpy(items, dtype=np.int64)] = True
    return excluded


def full_sort_metrics(
    scores: ArrayLike,
    target: ArrayLike,
    exclude: ArrayLike | Sequence[ArrayLike] | None = None,
    ks: Sequence[int] = (10,),
) -> dict[str, np.ndarray]:
    """Per-user HR@K and NDCG@K of the held-out target ranked among all items (RecBole full-sort protocol).

    scores: [B, num_items + 1] with column 0 the padding item; target: [B] item indices in 1..num_items;
    exclude: items the user already interacted with, as a bool mask [B, num_items + 1] or one index array per user.
    Padding and excluded items are not ranked; the target always is. Ties are pessimistic (an item scoring exactly
    the target's score ranks ahead of it) so a degenerate constant model scores 0, not 1.
    Returns name -> [B] float64, names "hr@K" and "ndcg@K" with NDCG = 1 / log2(rank + 1) if rank <= K.
    """
    ks = _check_ks(ks)
    scores = _to_numpy(scores)
    target = _to_numpy(target, dtype=np.int64)
    if scores.ndim != 2 or target.shape != (scores.shape[0],):
        raise ValueError(f"scores must be [B, num_items + 1] and target [B], got {scores.shape} and {target.shape}")
    B, N = scores.shape
    if ((target < 1) | (target >= N)).any():
        raise ValueError(f"target items must be in 1..{N - 1} (0 is padding); check the item index mapping")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN; fix the model before evaluating (a NaN ranks arbitrarily)")
    rows = np.arange(B)
    excluded = _exclusion_mask(exclude, (B, N))  # [B, N]
    excluded[:, 0] = True
    excluded[rows, target] = False
    target_score = scores[rows, target]  # [B]
    ahead = (scores >= target_score[:, None]) & ~excluded  # [B, N]
    rank = ahead.sum(axis=1)  # [B], 1-based: the target itself is counted once
    out: dict[str, np.ndarray] = {}
    for k in ks:
        hit = rank <= k
        out[f"hr@{k}"] = hit.astype(np.float64)
        out[f"ndcg@{k}"] = np.where(hit, 1.0 / np.log2(rank + 1.0), 0.0)
    return out


def mean_metrics(per_list: Mapping[str, ArrayLike], prefix: str = "") -> dict[str, float]:
    """Average per-list values into a flat dict, e.g. prefix="eval/" -> {"eval/ndcg@5": 0.41}."""
    return {f"{prefix}{name}": float(np.mean(_to_numpy(values))) for name, values in per_list.items()}


def bootstrap_ci(
    values: ArrayLike | Sequence[float],
    num_samples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean of values [N] and its percentile-bootstrap (1 - alpha) confidence interval: (mean, low, high)."""
    values = _to_numpy(values).reshape(-1)
    if values.size == 0 or np.isnan(values).any():
        raise ValueError("bootstrap_ci needs at least one value and no NaN; pass per-user metric values")
    if num_samples < 1 or not 0.0 < alpha < 1.0:
        raise ValueError(f"need num_samples >= 1 and 0 < alpha < 1, got {num_samples} and {alpha}")
    rng = np.random.default_rng(seed)
    N = values.size
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // N)
    means = []
    for start in range(0, num_samples, chunk):
        idx = rng.integers(0, N, size=(min(chunk, num_samples - start), N))  # [S, N] resampled users
        means.append(values[idx].mean(axis=1))
    low, high = np.quantile(np.concatenate(means), [alpha / 2, 1 - alpha / 2])
    return float(values.mean()), float(low), float(high)


def list_mean(per_user_sums: np.ndarray) -> float:
    """[U, 2] per user (sum over its lists, number of lists) -> the mean over lists, what a recommender stage reports
    as valid/ndcg@5. The evaluate stage's rows are per-user means instead (each user's lists averaged first, then the
    users), and its intervals come from `bootstrap_ci` over users."""
    return float(per_user_sums[:, 0].sum() / per_user_sums[:, 1].sum())


def paired_list_mean_ci(a: np.ndarray, b: np.ndarray, num_samples: int, seed: int) -> list[float]:
    """Difference of list means a - b [U, 2] with a 95% percentile interval from resampling users (the lists of a
    user are not independent, so the user is the unit; both sides see the same resampled users)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(num_samples, len(a)))  # [R, U]
    diffs = a[idx, 0].sum(1) / a[idx, 1].sum(1) - b[idx, 0].sum(1) / b[idx, 1].sum(1)
    low, high = np.quantile(diffs, [0.025, 0.975])
    return [list_mean(a) - list_mean(b), float(low), float(high)]


# --------------------------------------------------------------------------------------------------- synthetic reward
SYNTHETIC_GENRES = "synthetic-genres"  # reward.metric of the RL loop's positive control
SYNTHETIC_CONTRAST = "synthetic-genres-contrast"  # the same, less what the text would earn on other users' lists
SYNTHETIC_METRICS = (SYNTHETIC_GENRES, SYNTHETIC_CONTRAST)


def genres_named(text: str, genres: Iterable[str]) -> set[str]:
    """The genres (lower case, as the items table spells them: "sci-fi", "children's") that `text` names as words."""
    lowered = text.lower()
    return {g for g in genres if re.search(rf"(?<![a-z]){re.escape(g)}(?![a-z])", lowered)}


def _genre_shares(named: set[str], positive: set[str], negative: set[str]) -> float:
    others = negative - positive
    gain = len(named & positive) / len(positive) if positive else 0.0
    loss = len(named & others) / len(others) if others else 0.0
    return gain - loss


def synthetic_genre_reward(text: str, positive: set[str], negative: set[str]) -> float:
    """The positive control's reward: the share of `positive` genres (of the user's liked list items) the text names
    minus the share of `negative` genres (of its other list items, the positives' left out) it names, in [-1, 1].
    Needs no recommender, and a policy can learn it from the prompt: the history's genres predict the lists'."""
    return _genre_shares(genres_named(text, positive | negative), positive, negative)


def contrast_genre_reward(
    text: str, own: tuple[set[str], set[str]], others: Sequence[tuple[set[str], set[str]]]
) -> float:
    """synthetic_genre_reward on the user's own (positive, negative) genres minus its mean over `others` (other users'
    lists): naming genres that pay for anyone (a frequent one) earns nothing on average; only a text about this user's
    lists does. The personalised positive control."""
    everything = set().union(*own, *(g for pair in others for g in pair))
    named = genres_named(text, everything)
    baseline = float(np.mean([_genre_shares(named, *o) for o in others])) if others else 0.0
    return _genre_shares(named, *own) - baseline
