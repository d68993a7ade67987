"""Column names and Arrow schemas of every artifact rlrf4rec writes.

Each stage reads and writes Parquet through these names only, so a column is renamed in one place. The canonical
tables (interactions, items, users) are what every raw-format loader produces; the protocol tables (sequences,
rerank lists, leave-one-out) are what the recommender, prompt and reward stages consume.
"""

from __future__ import annotations

import pyarrow as pa

# Canonical tables (output of rlrf4rec.core.formats loaders).
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

# Protocol tables (output of rlrf4rec.core.protocol, METHOD.md section 1).
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
TRAIN_COUNT = "train_count"  # train users (of the whole split, before max_train_users) who interacted with the item
VALID_ITEM_ID = "valid_item_id"
TEST_ITEM_ID = "test_item_id"

SPLITS = ("train", "valid", "test")

ITEM_INDEX = pa.schema(
    [
        pa.field(ITEM_ID, pa.string(), nullable=False),
        pa.field(ITEM_IDX, pa.int32(), nullable=False),
        pa.field(TRAIN_COUNT, pa.int32(), nullable=False),
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

# Knowledge (output of rlrf4rec.stages.encode): one vector per user text.
TEXT_HASH = "text_hash"
VECTOR = "vector"
KNOWLEDGE_TEXT = "knowledge_text"
SEGMENTS = "segments"  # one vector per sentence / list entry of a knowledge text ([S, D]; knowledge.user_segments)

USER_KNOWLEDGE = pa.schema(
    [
        pa.field(USER_ID, pa.string(), nullable=False),
        pa.field(KNOWLEDGE_TEXT, pa.string(), nullable=False),
        pa.field(VECTOR, pa.list_(pa.float32()), nullable=False),
        pa.field(SEGMENTS, pa.list_(pa.list_(pa.float32()))),  # null when knowledge.user_segments = 0
    ]
)

# Item knowledge (knowledge.item): one text and vector per item.
ITEM_KNOWLEDGE = pa.schema(
    [
        pa.field(ITEM_ID, pa.string(), nullable=False),
        pa.field(KNOWLEDGE_TEXT, pa.string(), nullable=False),
        pa.field(VECTOR, pa.list_(pa.float32()), nullable=False),
    ]
)

# Generation tables (output of rlrf4rec.stages.generate, METHOD.md section 3): one row per (user, sample_idx).
SAMPLE_IDX = "sample_idx"
PROMPT = "prompt"  # the exact text the LLM saw, chat template applied
PREFERENCE_TEXT = "preference_text"
PROMPT_TOKENS = "prompt_tokens"
COMPLETION_TOKENS = "completion_tokens"  # includes the end-of-turn token when the model stopped by itself
FINISH_REASON = "finish_reason"  # "stop" | "length"
SEED = "seed"  # 31-bit per-row sampling seed derived from (run seed, user, sample_idx)
TEMPERATURE = "temperature"
TOP_P = "top_p"
MAX_NEW_TOKENS = "max_new_tokens"
MODEL = "model"  # the model reference the text came from (embedded name, HF id or checkpoint path)
POLICY_VERSION = "policy_version"  # "base", then one version per DPO round
FLAGS = "flags"  # quality flags, any of QUALITY_FLAGS (rlrf4rec.stages.generate.quality_flags)
QUALITY_FLAGS = ("empty", "truncated", "degenerate", "off_topic")
ERROR = "error"

GENERATIONS = pa.schema(
    [
        pa.field(USER_ID, pa.string(), nullable=False),
        pa.field(SAMPLE_IDX, pa.int32(), nullable=False),
        pa.field(SPLIT, pa.string(), nullable=False),
        pa.field(PROMPT, pa.string(), nullable=False),
        pa.field(PREFERENCE_TEXT, pa.string(), nullable=False),
        pa.field(PROMPT_TOKENS, pa.int32(), nullable=False),
        pa.field(COMPLETION_TOKENS, pa.int32(), nullable=False),
        pa.field(FINISH_REASON, pa.string(), nullable=False),
        pa.field(SEED, pa.int64(), nullable=False),
        pa.field(TEMPERATURE, pa.float64(), nullable=False),
        pa.field(TOP_P, pa.float64(), nullable=False),
        pa.field(MAX_NEW_TOKENS, pa.int32(), nullable=False),
        pa.field(MODEL, pa.string(), nullable=False),
        pa.field(POLICY_VERSION, pa.string(), nullable=False),
        pa.field(FLAGS, pa.list_(pa.string()), nullable=False),
    ]
)

GENERATION_ERRORS = pa.schema(
    [
        pa.field(USER_ID, pa.string(), nullable=False),
        pa.field(SAMPLE_IDX, pa.int32(), nullable=False),
        pa.field(ERROR, pa.string(), nullable=False),
    ]
)

# Rewards (output of rlrf4rec.stages.reward): one per generation key.
REWARD = "reward"
ROUND = "round"

REWARDS = pa.schema(
    [
        pa.field(USER_ID, pa.string(), nullable=False),
        pa.field(SAMPLE_IDX, pa.int32(), nullable=False),
        pa.field(SPLIT, pa.string(), nullable=False),
        pa.field(POLICY_VERSION, pa.string(), nullable=False),
        pa.field(REWARD, pa.float64(), nullable=False),
    ]
)

# DPO pairs (output of rlrf4rec.stages.pairs) in TRL's conversational format: prompt, chosen and rejected are chat
# messages, so TRL applies the policy's own chat template. The rest is provenance.
MESSAGES = pa.list_(pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())]))
CHOSEN = "chosen"
REJECTED = "rejected"
CHOSEN_SAMPLE_IDX = "chosen_sample_idx"
REJECTED_SAMPLE_IDX = "rejected_sample_idx"
CHOSEN_REWARD = "chosen_reward"
REJECTED_REWARD = "rejected_reward"
REWARD_MARGIN = "reward_margin"

PAIRS = pa.schema(
    [
        pa.field(USER_ID, pa.string(), nullable=False),
        pa.field(SPLIT, pa.string(), nullable=False),
        pa.field(PROMPT, MESSAGES, nullable=False),
        pa.field(CHOSEN, MESSAGES, nullable=False),
        pa.field(REJECTED, MESSAGES, nullable=False),
        pa.field(CHOSEN_SAMPLE_IDX, pa.int32(), nullable=False),
        pa.field(REJECTED_SAMPLE_IDX, pa.int32(), nullable=False),
        pa.field(CHOSEN_REWARD, pa.float64(), nullable=False),
        pa.field(REJECTED_REWARD, pa.float64(), nullable=False),
        pa.field(REWARD_MARGIN, pa.float64(), nullable=False),
        pa.field(POLICY_VERSION, pa.string(), nullable=False),
        pa.field(ROUND, pa.int32(), nullable=False),
    ]
)

# Supervised warm-start examples (output of rlrf4rec.stages.sft) in TRL's conversational prompt-completion format:
# the generation prompt's messages and the assistant's target answer.
COMPLETION = "completion"
SFT_EXAMPLES = pa.schema(
    [
        pa.field(USER_ID, pa.string(), nullable=False),
        pa.field(SPLIT, pa.string(), nullable=False),
        pa.field(PROMPT, MESSAGES, nullable=False),
        pa.field(COMPLETION, MESSAGES, nullable=False),
    ]
)

# GRPO's prompts (stages/grpo.py): one per train user, the generate stage's chat messages; the reward function
# reads user_id to score the completions.
GRPO_PROMPTS = pa.schema(
    [
        pa.field(USER_ID, pa.string(), nullable=False),
        pa.field(PROMPT, MESSAGES, nullable=False),
    ]
)

# The data stage's protocol tables: name -> schema (each one `<run>/data/<name>.parquet`, layout.data_table).
TABLES = {
    "interactions": INTERACTIONS,
    "items": ITEMS,
    "users": USERS,
    "item_index": ITEM_INDEX,
    "sequences": SEQUENCES,
    "rerank_lists": RERANK_LISTS,
    "leave_one_out": LEAVE_ONE_OUT,
}
RERANK_TABLES = ("item_index", "items", "sequences", "rerank_lists", "leave_one_out")  # what a re-ranker task reads
