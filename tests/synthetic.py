"""A small synthetic dataset with a learnable signal, written in the generic Parquet layout.

Each user has a taste (genre A or B); `liked_fraction` of the interactions are items of that genre with high
ratings, the rest low ratings of the other genre. A user's knowledge vector encodes the taste, so a
knowledge-augmented re-ranker can beat an ID-only one on users it has not seen.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rlrf4rec import schema as S

NUM_ITEMS = 80


def write_dataset(
    directory: Path, num_users: int = 60, length: int = 30, liked_fraction: float = 0.7, seed: int = 0
) -> dict[str, int]:
    """Write interactions.parquet and items.parquet; returns user_id -> taste (0 = genre A, 1 = genre B)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    items = [str(i) for i in range(1, NUM_ITEMS + 1)]
    genre = {item: "A" if int(item) <= NUM_ITEMS // 2 else "B" for item in items}
    pq.write_table(
        pa.table(
            {
                "item_id": items,
                "title": [f"Movie {i}" for i in items],
                "year": [2000] * NUM_ITEMS,
                "genres": [[genre[i]] for i in items],
            }
        ),
        directory / "items.parquet",
    )
    rows, tastes = [], {}
    for u in range(num_users):
        user = f"u{u}"
        taste = int(rng.integers(2))
        tastes[user] = taste
        liked = [i for i in items if (genre[i] == "B") == bool(taste)]
        other = [i for i in items if (genre[i] == "B") != bool(taste)]
        n_liked = int(length * liked_fraction)
        picks = list(rng.choice(liked, n_liked, replace=False)) + list(
            rng.choice(other, length - n_liked, replace=False)
        )
        rng.shuffle(picks)
        for t, item in enumerate(picks):
            rating = float(rng.integers(4, 6)) if item in liked else float(rng.integers(1, 3))
            rows.append((user, str(item), rating, 1_000_000 + 60 * t))
    users, item_col, ratings, ts = zip(*rows)
    pq.write_table(
        pa.table({"user_id": users, "item_id": item_col, "rating": ratings, "timestamp": ts}),
        directory / "interactions.parquet",
    )
    return tastes


def write_knowledge(path: Path, tastes: dict[str, int], dim: int = 8, noise: float = 0.1, seed: int = 0) -> None:
    """User knowledge vectors: the taste one-hot in the first two dims plus Gaussian noise (schema.USER_KNOWLEDGE)."""
    rng = np.random.default_rng(seed)
    users = sorted(tastes)
    vectors = rng.normal(0, noise, size=(len(users), dim)).astype(np.float32)
    for row, user in enumerate(users):
        vectors[row, tastes[user]] += 1.0
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {
                S.USER_ID: users,
                S.KNOWLEDGE_TEXT: [f"likes genre {'AB'[tastes[u]]}" for u in users],
                S.VECTOR: [v.tolist() for v in vectors],
            },
            schema=S.USER_KNOWLEDGE,
        ),
        path,
    )
