"""Knowledge vectors: texts -> frozen sentence-encoder vectors, cached by text hash, one per text or one per segment.

Consumes texts (history texts, LLM preference texts, item texts) and an encoder directory or HF id; produces float32
vectors [N, D] (mean pooling over tokens, L2-normalised, as all-MiniLM-L6-v2 is trained) or segment vectors
[N, S, D], and a Parquet cache that maps sha256(text) to its vector so a text is encoded once per encoder. Knows
nothing about users, recommenders or rewards: the encode stage (stages/encode.py) writes user and item knowledge
with it; the reward scorer and serving read vectors back through it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from rlrf4rec.core import assets
from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import digest, read_parquet, write_parquet
from rlrf4rec.core.config import RunConfig

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


def embedding_cache(cfg: RunConfig) -> Path:
    """One cache per (encoder, max_length): a vector depends on both."""
    return cfg.layout.embedding_cache(digest(f"{cfg.models.encoder}|{cfg.encode.max_length}", 12))


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
