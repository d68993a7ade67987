"""The evaluation protocol of METHOD.md section 1, on canonical tables.

Consumes the interactions and items tables of rlrf4rec.core.schema; produces
- the item index (dense 1-based ids; 0 is padding in every model) with each item's count among train users (the item
  prior: train users only, so no valid or test interaction can change it),
- one time-ordered sequence per user with its split and its LLM history window,
- the KAR re-rank lists (each chunk of `list_positives` consecutive interactions after the window plus
  `list_negatives` never-interacted items, shuffled, labelled by rating > threshold),
- the leave-one-out next-item split (RecBole's protocol) for comparison with sequential-recommendation work.
Everything is seeded per user (not per call order), so the same seed gives the same tables. Pure: no files, no Ray.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rlrf4rec.core import schema as S
from rlrf4rec.core.config import DataConfig

# Bumped when the tables this module writes change for the same inputs, so that existing runs rebuild them once
# (2: item_index carries the train-user count of each item, the item prior).
PROTOCOL_VERSION = 2


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from any parts, independent of Python's hash randomisation and of call order."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


@dataclass(frozen=True)
class ProtocolTables:
    item_index: pa.Table
    sequences: pa.Table
    rerank_lists: pa.Table
    leave_one_out: pa.Table
    stats: dict


def history_window(length: int, fraction: float, cap: int) -> tuple[int, int]:
    """[start, end) of the items the LLM may see: the most recent `cap` of the first `fraction` of the sequence."""
    end = max(1, math.floor(length * fraction))
    return max(0, end - cap), end


def split_users(user_ids: list[str], ratios: tuple[float, float, float], seed: int) -> dict[str, str]:
    """Seeded permutation of the sorted user ids cut into train/valid/test; each split keeps at least one user."""
    users = sorted(user_ids)
    if len(users) < 3:
        raise ValueError(f"need at least 3 users to split into train/valid/test, got {len(users)}")
    order = np.random.default_rng(stable_seed(seed, "split")).permutation(len(users))
    n_valid = max(1, round(ratios[1] * len(users)))
    n_test = max(1, round(ratios[2] * len(users)))
    n_train = len(users) - n_valid - n_test
    if n_train < 1:
        raise ValueError(f"split_ratios {ratios} leave no train users among {len(users)}")
    names = ["train"] * n_train + ["valid"] * n_valid + ["test"] * n_test
    return {users[i]: names[rank] for rank, i in enumerate(order)}


def build_protocol(interactions: pa.Table, items: pa.Table, cfg: DataConfig, seed: int) -> ProtocolTables:
    item_ids = items.column(S.ITEM_ID).to_pylist()
    to_idx = {item: i + 1 for i, item in enumerate(item_ids)}

    # Stable sort by (user, timestamp): equal timestamps keep file order, which is the only order the data gives.
    order = pc.sort_indices(interactions, sort_keys=[(S.USER_ID, "ascending"), (S.TIMESTAMP, "ascending")])
    inter = interactions.take(order)
    users = inter.column(S.USER_ID).to_numpy(zero_copy_only=False)
    item_col = inter.column(S.ITEM_ID).to_numpy(zero_copy_only=False)
    rating_col = inter.column(S.RATING).to_numpy()
    ts_col = inter.column(S.TIMESTAMP).to_numpy()
    bounds = np.flatnonzero(np.r_[True, users[1:] != users[:-1], True])

    per_user = {}
    dropped_short = 0
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi - lo < cfg.min_user_interactions:
            dropped_short += 1
            continue
        per_user[str(users[lo])] = (item_col[lo:hi], rating_col[lo:hi], ts_col[lo:hi])
    splits = split_users(list(per_user), cfg.split_ratios, seed)
    # The item prior counts every train user of the split, also those max_train_users leaves out below (they are
    # still train users: nothing of valid or test reaches the count).
    train_count = np.zeros(len(item_ids) + 1, dtype=np.int64)
    for user_id, (seq_items, _, _) in per_user.items():
        if splits[user_id] == "train":
            train_count[[to_idx[i] for i in set(seq_items.tolist())]] += 1
    item_index = pa.Table.from_pydict(
        {
            S.ITEM_ID: item_ids,
            S.ITEM_IDX: np.arange(1, len(item_ids) + 1, dtype=np.int32),
            S.TRAIN_COUNT: train_count[1:].astype(np.int32),
        },
        schema=S.ITEM_INDEX,
    )
    dropped_train = 0
    if cfg.max_train_users is not None:  # after the split: valid and test users are those of the full data
        train = sorted(u for u, s in splits.items() if s == "train")
        rng = np.random.default_rng(stable_seed(seed, "max_train_users"))
        kept = set(rng.choice(train, size=min(cfg.max_train_users, len(train)), replace=False).tolist())
        dropped_train = len(train) - len(kept)
        per_user = {u: v for u, v in per_user.items() if splits[u] != "train" or u in kept}

    # Negatives come from items present in the (filtered) log: an item nobody interacted with has no learned embedding.
    pool_all = np.unique(np.fromiter((to_idx[i] for i in item_col), dtype=np.int64, count=len(item_col)))
    idx_to_item = np.array([""] + item_ids, dtype=object)

    seq_rows: dict[str, list] = {name: [] for name in S.SEQUENCES.names}
    list_rows: dict[str, list] = {name: [] for name in S.RERANK_LISTS.names}
    loo_rows: dict[str, list] = {name: [] for name in S.LEAVE_ONE_OUT.names}
    list_size = cfg.list_positives + cfg.list_negatives
    for user_id in sorted(per_user):
        seq_items, seq_ratings, seq_ts = per_user[user_id]
        split = splits[user_id]
        start, end = history_window(len(seq_items), cfg.history_fraction, cfg.history_max)
        for name, value in zip(
            S.SEQUENCES.names,
            [user_id, split, list(seq_items), seq_ratings.tolist(), seq_ts.tolist(), start, end],
        ):
            seq_rows[name].append(value)

        seen = np.fromiter((to_idx[i] for i in seq_items), dtype=np.int64, count=len(seq_items))
        pool = np.setdiff1d(pool_all, seen, assume_unique=False)
        rng = np.random.default_rng(stable_seed(seed, "rerank", user_id))
        for list_idx, lo in enumerate(range(end, len(seq_items) - cfg.list_positives + 1, cfg.list_positives)):
            hi = lo + cfg.list_positives
            if cfg.list_negatives > len(pool):
                raise ValueError(
                    f"user {user_id} has only {len(pool)} never-seen items, fewer than "
                    f"data.list_negatives={cfg.list_negatives}; lower it"
                )
            negatives = rng.choice(pool, size=cfg.list_negatives, replace=False)
            candidates = np.concatenate([seq_items[lo:hi], idx_to_item[negatives]])
            labels = np.concatenate(
                [(seq_ratings[lo:hi] > cfg.rating_threshold).astype(np.int8), np.zeros(cfg.list_negatives, np.int8)]
            )
            perm = rng.permutation(list_size)
            list_rows[S.USER_ID].append(user_id)
            list_rows[S.SPLIT].append(split)
            list_rows[S.LIST_IDX].append(list_idx)
            list_rows[S.CANDIDATE_ITEMS].append(candidates[perm].tolist())
            list_rows[S.LABELS].append(labels[perm].tolist())

        loo_rows[S.USER_ID].append(user_id)
        loo_rows[S.TRAIN_ITEM_IDS].append(list(seq_items[:-2]))
        loo_rows[S.VALID_ITEM_ID].append(seq_items[-2])
        loo_rows[S.TEST_ITEM_ID].append(seq_items[-1])

    sequences = pa.Table.from_pydict(seq_rows, schema=S.SEQUENCES)
    rerank_lists = pa.Table.from_pydict(list_rows, schema=S.RERANK_LISTS)
    leave_one_out = pa.Table.from_pydict(loo_rows, schema=S.LEAVE_ONE_OUT)
    stats = _stats(sequences, rerank_lists, dropped_short)
    stats["train_users_left_out"] = dropped_train  # data.max_train_users
    return ProtocolTables(item_index, sequences, rerank_lists, leave_one_out, stats)


def _stats(sequences: pa.Table, rerank_lists: pa.Table, dropped_short: int) -> dict:
    split_col = rerank_lists.column(S.SPLIT).to_pylist()
    labels = rerank_lists.column(S.LABELS).to_pylist()
    seq_split = sequences.column(S.SPLIT).to_pylist()
    window = sequences.column(S.HISTORY_END).to_numpy() - sequences.column(S.HISTORY_START).to_numpy()
    stats = {
        "users": sequences.num_rows,
        "users_dropped_too_few_interactions": dropped_short,
        "history_window_mean": round(float(window.mean()), 2) if len(window) else 0.0,
        "rerank_lists": rerank_lists.num_rows,
        "positive_label_rate": round(float(np.mean([sum(x) / len(x) for x in labels])), 4) if labels else 0.0,
    }
    for split in S.SPLITS:
        stats[f"{split}/users"] = seq_split.count(split)
        stats[f"{split}/rerank_lists"] = split_col.count(split)
    return stats
