"""Knowledge encoding: texts -> frozen sentence-encoder vectors, cached by text hash.

Consumes texts (user history texts, LLM preference texts) and an encoder directory or HF id; produces float32
vectors [N, D] (mean pooling over tokens, L2-normalised, as all-MiniLM-L6-v2 is trained), and a Parquet cache that
maps sha256(text) to its vector so a text is encoded once per encoder. Knows nothing about users, recommenders or
rewards.

User knowledge text (METHOD.md section 4) = preference text, then the history text. The preference text goes first
so that truncation at `max_length` tokens cuts the tail of the history, never the text being scored.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from rlrf4rec import assets
from rlrf4rec import schema as S
from rlrf4rec.artifacts import is_complete, read_parquet, require_marker, stage_output, write_parquet
from rlrf4rec.config import RunConfig, dump_config

log = logging.getLogger(__name__)


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def user_knowledge_text(history: str, preference_text: str | None = None) -> str:
    if preference_text is None:
        return history
    return f"Preferences: {preference_text.strip()}\n{history}"


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
    key = f"{cfg.models.encoder}|{cfg.encode.max_length}"
    return cfg.run_path / "cache" / f"embeddings-{hashlib.sha256(key.encode()).hexdigest()[:12]}.parquet"


def write_user_knowledge(cfg: RunConfig, name: str, texts: dict[str, str], upstream: str, *, force: bool = False):
    """Encode one knowledge text per user into `<run>/knowledge/<name>/user_knowledge.parquet` (skip if complete)."""
    stage_dir = cfg.run_path / "knowledge" / name
    text_digest = hashlib.sha256("\x1e".join(f"{u}\x1f{t}" for u, t in sorted(texts.items())).encode()).hexdigest()
    fingerprint = f"{cfg.section_hash('models', 'encode')}-{upstream}-{text_digest[:16]}"
    if not force and is_complete(stage_dir, fingerprint):
        log.info("knowledge/%s: complete output matches; nothing to do", name)
        return stage_dir
    home = assets.asset_home(cfg.assets.home)
    encoder = TextEncoder(assets.resolve(cfg.models.encoder, home), cfg.encode.max_length, cfg.encode.batch_size)
    users = sorted(texts)
    vectors = encode_cached(encoder, [texts[u] for u in users], embedding_cache(cfg))
    table = pa.table(
        {S.USER_ID: users, S.KNOWLEDGE_TEXT: [texts[u] for u in users], S.VECTOR: [v.tolist() for v in vectors]},
        schema=S.USER_KNOWLEDGE,
    )
    with stage_output(stage_dir, fingerprint, dump_config(cfg)) as (tmp, stats):
        write_parquet(table, tmp / "user_knowledge.parquet", S.USER_KNOWLEDGE)
        stats.update({"users": len(users), "dim": int(vectors.shape[1]), "encoder": cfg.models.encoder})
    return stage_dir


def run_encode(cfg: RunConfig, *, force: bool = False) -> Path:
    """Base knowledge: each user's history text alone (no LLM text yet), for every user of every split."""
    from rlrf4rec.data import user_history_texts

    texts = user_history_texts(cfg)
    marker = require_marker(cfg.run_path / "data", "data")
    return write_user_knowledge(cfg, "base", texts, marker["fingerprint"], force=force)
