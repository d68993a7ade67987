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

from rlrf4rec.core import schema as S

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
                S.SEGMENTS: [None] * len(users),
            },
            schema=S.USER_KNOWLEDGE,
        ),
        path,
    )


SERVING_SPEC = dict(
    interaction=True, max_epochs=15, patience=5, batch_size=64, lr=2e-3, history_len=4, dropout=0.0, warmup_epochs=0
)


def preference(taste: int, wording: int = 0) -> str:
    liked, other = "AB"[taste], "AB"[1 - taste]
    if wording == 0:
        return f"Loves genre {liked} movies and avoids genre {other} ones."
    return f"A fan of genre {liked}; genre {other} bores this viewer."


def write_serving_run(root: Path, llm: str, encoder: str) -> tuple[Path, dict[str, int]]:
    """A finished run directory as `rlrf4rec serve` reads it: data, recommender/{id,base,round1} and
    knowledge/{base,round1} (the real encoder's vectors of per-taste preference texts; round1 words them anew).

    Ratings are half liked, half not, so a history's items reveal no taste: only the knowledge does.
    """
    import torch

    from rlrf4rec.core.artifacts import stage_output, write_json, write_parquet
    from rlrf4rec.core.config import RunConfig, dump_config, from_dict
    from rlrf4rec.core.knowledge import TextEncoder
    from rlrf4rec.core.lineage import Round
    from rlrf4rec.core.prompts import user_knowledge_text
    from rlrf4rec.core.recommender import ModelSpec, fit, save_checkpoint
    from rlrf4rec.stages.data import run_data
    from rlrf4rec.stages.train import build

    tastes = write_dataset(root / "raw", num_users=400, length=40, liked_fraction=0.5)
    cfg = from_dict(
        RunConfig,
        {
            "name": "serve",
            "run_dir": str(root / "run"),
            "models": {"llm": llm, "encoder": encoder},
            "data": {"format": "parquet", "path": str(root / "raw")},
            "generate": {"engine": "transformers", "max_new_tokens": 8},
        },
    )
    data_dir = run_data(cfg)
    run = cfg.run_path
    text_encoder = TextEncoder(encoder, max_length=64)
    users = sorted(tastes)
    for version, wording in (("base", 0), ("round1", 1)):
        texts = [user_knowledge_text(f"History: {len(u)} movies", preference(tastes[u], wording)) for u in users]
        with stage_output(run / "knowledge" / version, version, dump_config(cfg)) as (tmp, _):
            table = pa.table(
                {
                    S.USER_ID: users,
                    S.KNOWLEDGE_TEXT: texts,
                    S.VECTOR: [v.tolist() for v in text_encoder.encode(texts)],
                    S.SEGMENTS: [None] * len(users),
                },
                schema=S.USER_KNOWLEDGE,
            )
            write_parquet(table, tmp / "user_knowledge.parquet", S.USER_KNOWLEDGE)
    spec = ModelSpec(**SERVING_SPEC)
    for variant in ("id", "base", "round1"):
        path = None if variant == "id" else run / "knowledge" / variant / "user_knowledge.parquet"
        task, knowledge, model = build(data_dir, path, spec, seed=0)
        state = fit(task, model, knowledge, seed=0)
        with stage_output(run / "recommender" / variant, variant, dump_config(cfg)) as (tmp, _):
            save_checkpoint(tmp, state.best_model, spec, knowledge)
    # One DPO round recorded as the loop records it: round1's texts are the tuned policy's (a model not written here).
    done = Round(0, "dpo", llm, str(run / "dpo" / "round0" / "model"), str(run / "recommender" / "base"),
                 str(run / "recommender" / "round1"))  # fmt: skip
    (run / "rounds").mkdir()
    write_json({"rounds": [done.to_dict()]}, run / "rounds" / "manifest.json")
    torch.set_num_threads(1)
    return run, tastes


def stage_with(path: Path, name: str, table: pa.Table, schema: pa.Schema) -> Path:
    """A complete stage directory (marker fingerprint "fp-<dir name>") holding one Parquet file."""
    from rlrf4rec.core.artifacts import stage_output, write_parquet

    with stage_output(path, "fp-" + path.name, "") as (tmp, _):
        write_parquet(table, tmp / name, schema)
    return path


def generations_table(rows: list[tuple], splits: dict[str, str] | None = None) -> pa.Table:
    """schema.GENERATIONS rows from (user, sample_idx, text, flags) tuples; split "train" unless `splits` names it."""
    n = len(rows)
    return pa.table(
        {
            S.USER_ID: [r[0] for r in rows],
            S.SAMPLE_IDX: pa.array([r[1] for r in rows], pa.int32()),
            S.SPLIT: [(splits or {}).get(r[0], "train") for r in rows],
            S.PROMPT: ["p"] * n,
            S.PREFERENCE_TEXT: [r[2] for r in rows],
            S.PROMPT_TOKENS: pa.array([10] * n, pa.int32()),
            S.COMPLETION_TOKENS: pa.array([5] * n, pa.int32()),
            S.FINISH_REASON: ["stop"] * n,
            S.SEED: pa.array(range(n), pa.int64()),
            S.TEMPERATURE: [1.0] * n,
            S.TOP_P: [0.95] * n,
            S.MAX_NEW_TOKENS: pa.array([64] * n, pa.int32()),
            S.MODEL: ["m"] * n,
            S.POLICY_VERSION: ["base"] * n,
            S.FLAGS: [r[3] for r in rows],
        },
        schema=S.GENERATIONS,
    )
