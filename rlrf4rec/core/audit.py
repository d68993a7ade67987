"""The reward signal audit's statistics (no DPO): is there something in a user's N texts that a policy could learn?

Two judges score the same texts on disjoint halves of each user's lists, each the mean of its own reward-model seeds:
judge A plays the reward that builds pairs, judge B an independent check of what A prefers. Consumes per-user reward
matrices [U, N] (row u: user u's N texts, column k: sample k; the same text order in both) and per-text feature
matrices; produces plain dicts of means with user-resampled 95% intervals. Knows nothing about texts, models or files
(rlrf4rec.stages.signal builds the matrices).
"""

from __future__ import annotations

import numpy as np

from rlrf4rec.core.metrics import bootstrap_ci


def _interval(values: np.ndarray, num_samples: int, seed: int) -> dict:
    if len(values) == 0:
        return {"mean": None, "ci": None, "users": 0}
    mean, low, high = bootstrap_ci(np.asarray(values, dtype=float), num_samples=num_samples, seed=seed)
    return {"mean": mean, "ci": [low, high], "users": int(len(values))}


def label_validity(a: np.ndarray, b: np.ndarray, num_samples: int = 1000, seed: int = 0) -> dict:
    """How often judge B agrees with judge A's best-vs-worst pair: per user with untied A rewards, 1 when B scores
    A's best text above A's worst, 0.5 when B ties them, 0 otherwise. 0.5 = the pair's label carries no signal.
    a, b: [U, N]. Ties in A take the first text of the tie (as the pairs stage's argmax does)."""
    if a.shape != b.shape:
        raise ValueError(f"judge matrices differ in shape: {a.shape} vs {b.shape}")
    untied = np.ptp(a, axis=1) > 0
    best, worst = a.argmax(1), a.argmin(1)
    rows = np.arange(len(a))
    gap = b[rows, best] - b[rows, worst]
    agree = np.where(gap > 0, 1.0, np.where(gap == 0, 0.5, 0.0))[untied]
    return {**_interval(agree, num_samples, seed), "tied_users": int((~untied).sum())}


def best_of_n_ceiling(
    a: np.ndarray, b: np.ndarray, ns: tuple[int, ...] = (2, 4, 8, 16), num_samples: int = 1000, seed: int = 0
) -> dict[int, dict]:
    """For each n: judge B's reward of judge A's pick among a user's first n texts, minus B's mean over those n
    texts (the expected reward of a random one of them): what a policy that learned to write A's best-of-n text
    would gain under an independent judge. Paired per user; n above the number of texts is left out."""
    out = {}
    for n in ns:
        if n < 2 or n > a.shape[1]:
            continue
        pick = a[:, :n].argmax(1)
        gain = b[np.arange(len(b)), pick] - b[:, :n].mean(1)
        out[n] = _interval(gain, num_samples, seed)
    return out


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks of x [N] (ties share their mean rank)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rho of two score vectors; None when either is constant (no order to agree on)."""
    ra, rb = _ranks(np.asarray(a, float)), _ranks(np.asarray(b, float))
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def within_user_association(feature: np.ndarray, reward: np.ndarray, num_samples: int = 1000, seed: int = 0) -> dict:
    """Mean over users of the Spearman correlation between a text feature and the reward among the user's own
    texts (pairs are formed within a user, so this is the association a pair can teach); users for whom either is
    constant are left out and counted. feature, reward: [U, N]."""
    rhos = [spearman(f, r) for f, r in zip(feature, reward)]
    defined = np.array([r for r in rhos if r is not None])
    return {**_interval(defined, num_samples, seed), "constant_users": int(sum(r is None for r in rhos))}


def paired_difference(x: np.ndarray, y: np.ndarray, num_samples: int = 1000, seed: int = 0) -> dict:
    """Per-user x - y [U] with its user-resampled 95% interval."""
    return _interval(np.asarray(x, float) - np.asarray(y, float), num_samples, seed)


def derangement(n: int, seed: int) -> np.ndarray:
    """source[i] != i for every i (n >= 2): one random cycle through all rows, so nobody keeps their own."""
    if n < 2:
        raise ValueError(f"another user's text needs at least 2 users, got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    source = np.empty_like(perm)
    source[perm] = np.roll(perm, 1)
    return source
