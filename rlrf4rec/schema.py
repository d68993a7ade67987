"""Column names and Arrow schemas of every artifact rlrf4rec writes.

Each stage reads and writes Parquet through these names only, so a column is renamed in one place. The canonical
tables (interactions, items, users) are what every raw-format loader produces; the protocol tables (sequences,
rerank lists, leave-one-out) are what the recommender, prompt and reward stages consume.
"""

from __future__ import annotations

import pyarrow as pa

# Canonical tables (output of rlrf4rec.formats loaders).
USER_ID = "user_id"
ITEM_ID = "item_id"
RATING = "rating"
TIMESTAMP = "timestamp"
TITLE = "title"
YEAR = "year"
GENRES = "genres"
AGE = "age"
GENDER = "gender"
OCCUPATION = "occupation"
ITEM_IDX = "item_idx"  # 1-based dense index; 0 is padding in every model

INTERACTIONS = pa.schema(
    [
        pa.field(USER_ID, pa.string(), nullable=False),
        pa.field(ITEM_ID, pa.string(), nullable=False),
        pa.field(RATING, pa.float32(), nullable=False),
        pa.field(TIMESTAMP, pa.int64(), nullable=False),
    ]
)

ITEMS = pa.schema(
    [
        pa.field(ITEM_ID, pa.string(), nullable=False),
        pa.field(TITLE, pa.string(), nullable=False),
        pa.field(YEAR, pa.int32()),
        pa.field(GENRES, pa.list_(pa.string()), nullable=False),
    ]
)

USERS = pa.schema(
    [
        pa.field(USER_ID, pa.string(), nullable=False),
        pa.field(AGE, pa.int32()),
        pa.field(GENDER, pa.string()),
        pa.field(OCCUPATION, pa.string()),
    ]
)

# Protocol tables (output of rlrf4rec.protocol, METHOD.md section 1).
SPLIT = "split"  # "train" | "valid" | "test", assigned per user
ITEM_IDS = "item_ids"
RATINGS = "ratings"
TIMESTAMPS = "timestamps"
HISTORY_START = "history_start"  # history window is item_ids[history_start:history_end]
HISTORY_END = "history_end"  # everything at or after this index is never shown to the LLM
LIST_IDX = "list_idx"
CANDIDATE_ITEMS = "candidate_items"
LABELS = "labels"
TRAIN_ITEM_IDS = "train_item_ids"
VALID_ITEM_ID = "valid_item_id"
TEST_ITEM_ID = "test_item_id"

SPLITS = ("train", "valid", "test")

ITEM_INDEX = pa.schema(
    [
        pa.field(ITEM_ID, pa.string(), nullable=False),
        pa.field(ITEM_IDX, pa.int32(), nullable=False),
    ]
)

SEQUENCES = pa.schema(
    [
        pa.field(USER_ID, pa.string(), nullable=False),
        pa.field(SPLIT, pa.string(), nullable=False),
        pa.field(ITEM_IDS, pa.list_(pa.string()), nullable=False),
        pa.field(RATINGS, pa.list_(pa.float32()), nullable=False),
        pa.field(TIMESTAMPS, pa.list_(pa.int64()), nullable=False),
        pa.field(HISTORY_START, pa.int32(), nullable=False),
        pa.field(HISTORY_END, pa.int32(), nullable=False),
    ]
)

RERANK_LISTS = pa.schema(
    [
        pa.field(USER_ID, pa.string(), nullable=False),
        pa.field(SPLIT, pa.string(), nullable=False),
        pa.field(LIST_IDX, pa.int32(), nullable=False),
        pa.field(CANDIDATE_ITEMS, pa.list_(pa.string()), nullable=False),
        pa.field(LABELS, pa.list_(pa.int8()), nullable=False),
    ]
)

LEAVE_ONE_OUT = pa.schema(
    [
        pa.field(USER_ID, pa.string(), nullable=False),
        pa.field(TRAIN_ITEM_IDS, pa.list_(pa.string()), nullable=False),
        pa.field(VALID_ITEM_ID, pa.string(), nullable=False),
        pa.field(TEST_ITEM_ID, pa.string(), nullable=False),
    ]
)
