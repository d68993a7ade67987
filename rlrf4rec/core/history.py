"""History texts, read from a run's data stage: what the prompt, the knowledge text and the teacher profile say
about a user's window (the rendering itself is core/prompts.py and core/profile.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import read_tables, require_marker
from rlrf4rec.core.config import RunConfig


def user_history_texts(cfg: RunConfig, max_items: int | None = None) -> dict[str, str]:
    """user_id -> history text of its LLM window (its last `max_items` entries when given), from this run's data
    stage (every user of every split)."""
    from rlrf4rec.core.prompts import history_texts

    require_marker(cfg.layout.data, "data")
    tables = read_tables(cfg.layout.data, ("sequences", "items", "users"))
    return history_texts(tables["sequences"], tables["items"], tables["users"], max_items)


def prompt_history_texts(cfg: RunConfig) -> dict[str, str]:
    """user_id -> the history text its generation prompt names (generate.prompt_history entries)."""
    return user_history_texts(cfg, cfg.generate.prompt_history)


def teacher_texts(cfg: RunConfig, max_items: int | None) -> dict[str, str]:
    """user_id -> teacher profile (core/profile.py) of the last `max_items` window entries (all of the window with
    None), naming what the train users of the split (all of them, also those data.max_train_users leaves out;
    leave-user-out for each train user) watched after the same items."""
    from rlrf4rec.core import schema as S
    from rlrf4rec.core.profile import CoWatch, teacher_profiles, train_sequences

    require_marker(cfg.layout.data, "data")
    tables = read_tables(cfg.layout.data, ("interactions", "sequences", "items"))
    seqs = tables["sequences"]
    held = {u for u, s in zip(seqs.column(S.USER_ID).to_pylist(), seqs.column(S.SPLIT).to_pylist()) if s != "train"}
    cowatch = CoWatch.build(train_sequences(tables["interactions"], held, cfg.data.min_user_interactions))
    return teacher_profiles(seqs, tables["items"], cfg.generate.domain, max_items, cowatch)


def select_users(sequences: pa.Table, splits: Sequence[str], max_users: int | None) -> pa.Table:
    """The sequences of users in `splits`, sorted by user id, the first `max_users` of them (all when None)."""
    rows = sorted((r for r in sequences.to_pylist() if r[S.SPLIT] in splits), key=lambda r: r[S.USER_ID])
    return pa.Table.from_pylist(rows[:max_users], schema=sequences.schema)
