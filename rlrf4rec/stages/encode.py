"""Knowledge encoding: texts -> frozen sentence-encoder vectors, cached by text hash.

Consumes texts (user history texts, LLM preference texts) and an encoder directory or HF id; produces float32
vectors [N, D] (mean pooling over tokens, L2-normalised, as all-MiniLM-L6-v2 is trained), and a Parquet cache that
maps sha256(text) to its vector so a text is encoded once per encoder. Knows nothing about users, recommenders or
rewards.

User knowledge text (METHOD.md section 4) = preference text, then the history text. The preference text goes first
so that truncation at `max_length` tokens cuts the tail of the history, never the text being scored.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from rlrf4rec.core import assets
from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import digest, is_complete, read_parquet, require_marker, stage_output, write_parquet
from rlrf4rec.core.config import RunConfig, dump_config
from rlrf4rec.core.layout import GENERATIONS, ITEM_KNOWLEDGE, USER_KNOWLEDGE
from rlrf4rec.core.prompts import user_knowledge_text

log = logging.getLogger(__name__)


def text_hash(text: str) -> str:
    return digest(text, 32)


class TextEncoder:
    """A frozen HF encoder with mean pooling; loads once, encodes batches sorted by length to limit padding."""

    def __init__(self, model: str, max_length: int = 512, batch_size: int = 32, device: str | None = None):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.name = model
        self.max_length, self.batch_size = max_length, batch_size
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModel.from_pretrained(model).to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """texts [N] -> vectors [N, D] float32, L2-normalised."""
        import torch

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        with torch.inference_mode():
            for lo in range(0, len(texts), self.batch_size):
                idx = order[lo : lo + self.batch_size]
                batch = self.tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**batch).last_hidden_state  # [B, T, D]
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # [B, D]
                out[idx] = torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()
        return out


EMBEDDING_CACHE = pa.schema(
    [pa.field(S.TEXT_HASH, pa.string(), nullable=False), pa.field(S.VECTOR, pa.list_(pa.float32()), nullable=False)]
)


def vectors_of(table: pa.Table, column: str = S.VECTOR) -> np.ndarray:
    """A list<float32> column of equal-length vectors -> [N, D] float32 without a Python loop."""
    if table.num_rows == 0:
        return np.zeros((0, 0), np.float32)
    flat = table.column(column).combine_chunks()
    return flat.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(table.num_rows, -1)


def encode_cached(encoder: TextEncoder, texts: Sequence[str], cache_path: Path | None) -> np.ndarray:
    """Encode `texts`, reusing and extending the cache at `cache_path` (one cache file per encoder)."""
    keys = [text_hash(t) for t in texts]
    cached: dict[str, np.ndarray] = {}
    if cache_path is not None and cache_path.is_file():
        table = read_parquet(cache_path, EMBEDDING_CACHE)
        cached = dict(zip(table.column(S.TEXT_HASH).to_pylist(), vectors_of(table)))
    missing = sorted({k: i for i, k in enumerate(keys) if k not in cached}.items())
    if missing:
        fresh = encoder.encode([texts[i] for _, i in missing])
        for (key, _), vector in zip(missing, fresh):
            cached[key] = vector
        log.info("encoded %d new texts (%d from cache)", len(missing), len(set(keys)) - len(missing))
        if cache_path is not None:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            table = pa.table(
                {S.TEXT_HASH: list(cached), S.VECTOR: [v.tolist() for v in cached.values()]}, schema=EMBEDDING_CACHE
            )
            write_parquet(table, cache_path, EMBEDDING_CACHE)
    return np.stack([cached[k] for k in keys]) if keys else np.zeros((0, encoder.dim), np.float32)


# --------------------------------------------------------------------------------------------------- stage


def embedding_cache(cfg: RunConfig) -> Path:
    """One cache per (encoder, max_length): a vector depends on both."""
    return cfg.layout.embedding_cache(digest(f"{cfg.models.encoder}|{cfg.encode.max_length}", 12))


def write_user_knowledge(cfg: RunConfig, name: str, texts: dict[str, str], upstream: str, *, force: bool = False):
    """Encode one knowledge text per user into `<run>/knowledge/<name>/user_knowledge.parquet` (skip if complete):
    the whole text's vector and, with knowledge.user_segments > 0, one vector per segment."""
    stage_dir = cfg.layout.knowledge(name)
    text_digest = digest("\x1e".join(f"{u}\x1f{t}" for u, t in sorted(texts.items())))
    fingerprint = f"{cfg.section_hash('models', 'encode', 'knowledge')}-{upstream}-{text_digest}"
    if not force and is_complete(stage_dir, fingerprint):
        log.info("knowledge/%s: complete output matches; nothing to do", name)
        return stage_dir
    encoder = make_encoder(cfg)
    users = sorted(texts)
    rows = [texts[u] for u in users]
    vectors = encode_cached(encoder, rows, embedding_cache(cfg))
    segments = None
    if cfg.knowledge.user_segments:
        per_user = segment_vectors(encoder, rows, cfg.knowledge.user_segments, embedding_cache(cfg))
        segments = [v.tolist() for v in per_user]
    table = pa.table(
        {
            S.USER_ID: users,
            S.KNOWLEDGE_TEXT: rows,
            S.VECTOR: [v.tolist() for v in vectors],
            S.SEGMENTS: segments if segments is not None else [None] * len(users),
        },
        schema=S.USER_KNOWLEDGE,
    )
    with stage_output(stage_dir, fingerprint, dump_config(cfg)) as (tmp, stats):
        write_parquet(table, tmp / USER_KNOWLEDGE, S.USER_KNOWLEDGE)
        stats.update(
            {
                "users": len(users),
                "dim": int(vectors.shape[1]),
                "encoder": cfg.models.encoder,
                "user_segments": cfg.knowledge.user_segments,
            }
        )
    return stage_dir


def make_encoder(cfg: RunConfig) -> TextEncoder:
    home = assets.asset_home(cfg.assets.home)
    return TextEncoder(assets.resolve(cfg.models.encoder, home), cfg.encode.max_length, cfg.encode.batch_size)


def user_vectors(table: pa.Table) -> np.ndarray:
    """A user knowledge table (schema.USER_KNOWLEDGE) -> [U, S, D] segments (zero rows = padding) when it holds
    segments, else the whole texts' vectors [U, D]; rows in table order. No Python loop over users or segments."""
    column = table.column(S.SEGMENTS)
    if table.num_rows == 0 or column.null_count == table.num_rows:
        return vectors_of(table)
    if column.null_count:
        raise ValueError("a user knowledge table holds segments for some users only; re-run its stage")
    return segments_of(column.combine_chunks())


def segments_of(column: pa.ListArray) -> np.ndarray:
    """list<list<float32>> (segments of equal-length vectors per row) -> [rows, max segments, D], zero padded."""
    counts = column.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
    inner = column.flatten()  # one list<float32> per segment, the rows' offsets applied
    values = inner.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    dim = values.size // len(inner) if len(inner) else 0
    out = np.zeros((len(counts), max(int(counts.max(initial=0)), 1), dim), np.float32)
    owners = np.repeat(np.arange(len(counts)), counts)
    positions = np.arange(len(inner)) - np.repeat(np.cumsum(counts) - counts, counts)
    out[owners, positions] = values.reshape(len(inner), dim)
    return out


def pad_segments(segments: Sequence[np.ndarray]) -> np.ndarray:
    """[S_i, D] per user -> [U, max S_i, D], zero rows after each user's last segment (the models' padding)."""
    dim = segments[0].shape[-1] if segments else 0
    out = np.zeros((len(segments), max((len(s) for s in segments), default=1), dim), np.float32)
    for u, s in enumerate(segments):
        out[u, : len(s)] = s
    return out


def encode_user_texts(encoder: TextEncoder, texts: Sequence[str], user_segments: int, cache: Path | None):
    """Knowledge texts -> what a recommender trained with `user_segments` reads: [N, D], or [N, S, D] segments."""
    if not user_segments:
        return encode_cached(encoder, texts, cache)
    return encode_segments(encoder, texts, user_segments, cache)


def item_knowledge_texts(cfg: RunConfig) -> dict[str, str]:
    """item_id -> item knowledge text: the metadata line (title, year, genres); with knowledge.item = llm, then the
    LLM's description of the item (KAR's item knowledge; the facts stay first so truncation cuts the description)."""
    from rlrf4rec.core.artifacts import read_table
    from rlrf4rec.core.prompts import item_metadata_texts

    texts = item_metadata_texts(read_table(cfg.layout.data, "items"))
    if cfg.knowledge.item == "llm":
        from rlrf4rec.stages.generate import run_item_generate

        gens = read_parquet(run_item_generate(cfg) / GENERATIONS, S.GENERATIONS)
        described = dict(zip(gens.column(S.USER_ID).to_pylist(), gens.column(S.PREFERENCE_TEXT).to_pylist()))
        texts = {i: f"{t}\n{described[i].strip()}" if described.get(i, "").strip() else t for i, t in texts.items()}
    return texts


def write_item_knowledge(cfg: RunConfig, *, stage: str = "items", force: bool = False) -> Path | None:
    """Item knowledge (knowledge.item = metadata | llm): one text per item (item_knowledge_texts), encoded by the
    frozen encoder into `<run>/knowledge/<stage>/item_knowledge.parquet`. None when knowledge.item = none."""
    if cfg.knowledge.item == "none":
        return None
    marker = require_marker(cfg.layout.data, "data")
    stage_dir = cfg.layout.knowledge(stage)
    texts = item_knowledge_texts(cfg)
    text_digest = digest("\x1e".join(f"{i}\x1f{t}" for i, t in sorted(texts.items())))
    fingerprint = f"{cfg.section_hash('models', 'encode', 'knowledge')}-{marker['fingerprint']}-{text_digest}"
    if not force and is_complete(stage_dir, fingerprint):
        return stage_dir
    items = sorted(texts)
    started = time.perf_counter()
    vectors = encode_cached(make_encoder(cfg), [texts[i] for i in items], embedding_cache(cfg))
    table = pa.table(
        {S.ITEM_ID: items, S.KNOWLEDGE_TEXT: [texts[i] for i in items], S.VECTOR: [v.tolist() for v in vectors]},
        schema=S.ITEM_KNOWLEDGE,
    )
    with stage_output(stage_dir, fingerprint, dump_config(cfg)) as (tmp, stats):
        write_parquet(table, tmp / ITEM_KNOWLEDGE, S.ITEM_KNOWLEDGE)
        stats.update(
            {
                "items": len(items),
                "dim": int(vectors.shape[1]),
                "kind": cfg.knowledge.item,
                "encode_seconds": round(time.perf_counter() - started, 1),
            }
        )
    return stage_dir


def policy_texts_dir(cfg: RunConfig, version: str) -> Path:
    """Where `version`'s one knowledge text per train and valid user is written."""
    return cfg.layout.generations(f"{version}-knowledge")


def generate_policy_texts(cfg: RunConfig, model: str, version: str) -> Path:
    """One text of `model` per train and valid user: the knowledge a recommender trains on. It is sample 0 of the
    generate stage's N (same seed), so a user's knowledge text is also the first of its best-of-N candidates.
    Written by the generate stage (Ray Data + vLLM, resumable) into `<run>/generations/<version>-knowledge/`."""
    from rlrf4rec.stages.generate import run_generate

    one = dataclasses.replace(cfg.generate, num_samples=1, splits=("train", "valid"), max_users=None)
    return run_generate(
        dataclasses.replace(cfg, generate=one), model=model, policy_version=version, out=policy_texts_dir(cfg, version)
    )


def policy_knowledge_texts(cfg: RunConfig, generations_dir: Path) -> dict[str, str]:
    """user -> knowledge text: the policy's text (generate_policy_texts) + the history text; users without a text
    (test users: theirs come at evaluation) keep the history text alone."""
    from rlrf4rec.stages.data import user_history_texts

    gens = read_parquet(generations_dir / GENERATIONS, S.GENERATIONS)
    written = dict(zip(gens.column(S.USER_ID).to_pylist(), gens.column(S.PREFERENCE_TEXT).to_pylist()))
    with_history = cfg.knowledge.history_text
    return {u: user_knowledge_text(h, written.get(u), with_history) for u, h in user_history_texts(cfg).items()}


def write_policy_knowledge(
    cfg: RunConfig, model: str, version: str, upstream: str, *, force: bool = False
) -> tuple[Path, Path]:
    """A policy's knowledge for every user the recommender trains on: one text of `model` per train and valid user
    (generate_policy_texts), with its history text, encoded into `<run>/knowledge/<version>/`. `upstream`: the
    fingerprint the texts were made under (data stage, or the round's pairs). Returns (generations, knowledge)."""
    gen_dir = generate_policy_texts(cfg, model, version)
    upstream = f"{upstream}-{require_marker(gen_dir, 'generate')['fingerprint']}"
    return gen_dir, write_user_knowledge(cfg, version, policy_knowledge_texts(cfg, gen_dir), upstream, force=force)


def run_encode(cfg: RunConfig, *, force: bool = False) -> Path:
    """Base knowledge for every user of every split, and the items' knowledge (knowledge.item).

    knowledge.user = llm: the start policy's text (models.llm, or its warm start with loop.init = sft) + history for
    train and valid users (the base reward model learns
    from the kind of text it will score, as in KAR); history: the history text alone, no generation."""
    from rlrf4rec.stages.data import user_history_texts

    upstream = require_marker(cfg.layout.data, "data")["fingerprint"]
    write_item_knowledge(cfg, force=force)
    if cfg.knowledge.user == "history":
        return write_user_knowledge(cfg, "base", user_history_texts(cfg), upstream, force=force)
    from rlrf4rec.stages.sft import start_policy

    return write_policy_knowledge(cfg, start_policy(cfg), "base", upstream, force=force)[1]


# --------------------------------------------------------------------------------------------------- segments

_SEGMENT_END = re.compile(r"(?<=[.;!?])\s+|\s*\n+\s*")


def text_segments(text: str, max_segments: int) -> list[str]:
    """A knowledge text cut into its sentences / list entries (at . ; ! ? and newlines), at most `max_segments`.

    One mean-pooled vector per user dilutes each thing the text says by everything else it says; one vector per
    segment lets each candidate attend to the part of the text about it (models.PRM with interaction). Over the cap,
    the first half and the last half are kept: a user text is the preference text, then the history oldest first,
    so this keeps what the LLM wrote and the most recent history, and drops the oldest history entries."""
    parts = [p for p in (p.strip() for p in _SEGMENT_END.split(text)) if len(p) > 2]
    if len(parts) > max_segments:
        head = max_segments // 2
        parts = parts[:head] + parts[len(parts) - (max_segments - head) :]
    return parts or [text.strip() or "(empty)"]


def encode_segments(
    encoder: TextEncoder, texts: Sequence[str], max_segments: int, cache_path: Path | None
) -> np.ndarray:
    """texts [U] -> segment vectors [U, S, D] (S = the longest text's segment count, at most `max_segments`), rows
    past a text's last segment all zero (the models' padding)."""
    return pad_segments(segment_vectors(encoder, texts, max_segments, cache_path))


def segment_vectors(
    encoder: TextEncoder, texts: Sequence[str], max_segments: int, cache_path: Path | None
) -> list[np.ndarray]:
    """texts [U] -> one [S_u, D] array of segment vectors per text, all segments encoded in one cached pass."""
    segments = [text_segments(t, max_segments) for t in texts]
    flat = encode_cached(encoder, [s for segs in segments for s in segs], cache_path)  # [sum S_u, D]
    bounds = np.cumsum([0, *map(len, segments)])
    return [flat[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]
