"""The encode stage: user and item knowledge, encoded by the frozen encoder (core/knowledge.py), as Parquet.

Consumes the data stage's tables and, with knowledge.user = llm, the start policy's texts (one per train and valid
user, written through the generate stage); produces `<run>/knowledge/<name>/user_knowledge.parquet` (one knowledge
text per user, its vector and its segment vectors) and `<run>/knowledge/items/item_knowledge.parquet`. Knows
nothing about recommenders or rewards.

User knowledge text (METHOD.md section 4) = preference text, then the history text. The preference text goes first
so that truncation at `max_length` tokens cuts the tail of the history, never the text being scored.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import pyarrow as pa

from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import Fingerprint, digest, publish, read_parquet, require_marker, write_parquet
from rlrf4rec.core.config import RunConfig, dump_config
from rlrf4rec.core.knowledge import embedding_cache, encode_cached, make_encoder, segment_vectors
from rlrf4rec.core.layout import GENERATIONS, ITEM_KNOWLEDGE, USER_KNOWLEDGE
from rlrf4rec.core.lineage import GenerationRequest
from rlrf4rec.core.prompts import user_knowledge_text
from rlrf4rec.core.stage import FORCE, Stage

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- stage


def write_user_knowledge(
    cfg: RunConfig, name: str, texts: dict[str, str], upstream: dict[str, str], *, force: bool = False
) -> Path:
    """Encode one knowledge text per user into `<run>/knowledge/<name>/user_knowledge.parquet` (skip if complete):
    the whole text's vector and, with knowledge.user_segments > 0, one vector per segment. `upstream`: the keys of
    the stages the texts were made from, by name."""
    text_digest = digest("\x1e".join(f"{u}\x1f{t}" for u, t in sorted(texts.items())))
    fingerprint = Fingerprint(
        "knowledge", cfg.section_hashes("models", "encode", "knowledge"), upstream, {"texts": text_digest}
    )

    def build(tmp: Path, stats: dict) -> None:
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
        write_parquet(table, tmp / USER_KNOWLEDGE, S.USER_KNOWLEDGE)
        stats.update(
            {
                "users": len(users),
                "dim": int(vectors.shape[1]),
                "encoder": cfg.models.encoder,
                "user_segments": cfg.knowledge.user_segments,
            }
        )

    return publish(cfg.layout.knowledge(name), fingerprint, build, dump_config(cfg), force=force)


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
    texts = item_knowledge_texts(cfg)
    text_digest = digest("\x1e".join(f"{i}\x1f{t}" for i, t in sorted(texts.items())))
    fingerprint = Fingerprint(
        "knowledge",
        cfg.section_hashes("models", "encode", "knowledge"),
        {"data": marker["fingerprint"]},
        {"texts": text_digest},
    )

    def build(tmp: Path, stats: dict) -> None:
        items = sorted(texts)
        started = time.perf_counter()
        vectors = encode_cached(make_encoder(cfg), [texts[i] for i in items], embedding_cache(cfg))
        table = pa.table(
            {S.ITEM_ID: items, S.KNOWLEDGE_TEXT: [texts[i] for i in items], S.VECTOR: [v.tolist() for v in vectors]},
            schema=S.ITEM_KNOWLEDGE,
        )
        write_parquet(table, tmp / ITEM_KNOWLEDGE, S.ITEM_KNOWLEDGE)
        stats.update(
            {
                "items": len(items),
                "dim": int(vectors.shape[1]),
                "kind": cfg.knowledge.item,
                "encode_seconds": round(time.perf_counter() - started, 1),
            }
        )

    return publish(cfg.layout.knowledge(stage), fingerprint, build, dump_config(cfg), force=force)


def policy_texts_dir(cfg: RunConfig, version: str) -> Path:
    """Where `version`'s one knowledge text per train and valid user is written."""
    return cfg.layout.generations(f"{version}-knowledge")


def generate_policy_texts(cfg: RunConfig, model: str, version: str) -> Path:
    """One text of `model` per train and valid user: the knowledge a recommender trains on. It is sample 0 of the
    generate stage's N (same seed), so a user's knowledge text is also the first of its best-of-N candidates.
    Written by the generate stage (Ray Data + vLLM, resumable) into `<run>/generations/<version>-knowledge/`."""
    from rlrf4rec.stages.generate import run_generate

    request = GenerationRequest(model, version, ("train", "valid"), num_samples=1)
    return run_generate(cfg, request, out=policy_texts_dir(cfg, version))


def policy_knowledge_texts(cfg: RunConfig, generations_dir: Path) -> dict[str, str]:
    """user -> knowledge text: the policy's text (generate_policy_texts) + the history text; users without a text
    (test users: theirs come at evaluation) keep the history text alone."""
    from rlrf4rec.core.history import user_history_texts

    gens = read_parquet(generations_dir / GENERATIONS, S.GENERATIONS)
    written = dict(zip(gens.column(S.USER_ID).to_pylist(), gens.column(S.PREFERENCE_TEXT).to_pylist()))
    with_history = cfg.knowledge.history_text
    return {u: user_knowledge_text(h, written.get(u), with_history) for u, h in user_history_texts(cfg).items()}


def write_policy_knowledge(
    cfg: RunConfig, model: str, version: str, upstream: dict[str, str], *, force: bool = False
) -> tuple[Path, Path]:
    """A policy's knowledge for every user the recommender trains on: one text of `model` per train and valid user
    (generate_policy_texts), with its history text, encoded into `<run>/knowledge/<version>/`. `upstream`: the
    keys of the stages the texts were made under, by name (the data stage, or the round's pairs). Returns
    (generations, knowledge)."""
    gen_dir = generate_policy_texts(cfg, model, version)
    upstream = {**upstream, "generations": require_marker(gen_dir, "generate")["fingerprint"]}
    return gen_dir, write_user_knowledge(cfg, version, policy_knowledge_texts(cfg, gen_dir), upstream, force=force)


def run_encode(cfg: RunConfig, *, force: bool = False) -> Path:
    """Base knowledge for every user of every split, and the items' knowledge (knowledge.item).

    knowledge.user = llm: the start policy's text (models.llm, or its warm start with loop.init = sft) + history for
    train and valid users (the base reward model learns
    from the kind of text it will score, as in KAR); history: the history text alone, no generation."""
    from rlrf4rec.core.history import user_history_texts

    upstream = {"data": require_marker(cfg.layout.data, "data")["fingerprint"]}
    write_item_knowledge(cfg, force=force)
    if cfg.knowledge.user == "history":
        return write_user_knowledge(cfg, "base", user_history_texts(cfg), upstream, force=force)
    from rlrf4rec.core.lineage import start_policy

    return write_policy_knowledge(cfg, start_policy(cfg), "base", upstream, force=force)[1]


# --------------------------------------------------------------------------------------------------- segments


# --------------------------------------------------------------------------------------------------- the stage record


def _llm_on_ray(cfg: RunConfig, args: argparse.Namespace) -> bool:
    """The stage generates (the start policy's user texts, the items' descriptions) on Ray with vLLM."""
    return "llm" in (cfg.knowledge.user, cfg.knowledge.item) and cfg.generate.engine == "vllm"


STAGE = Stage(
    "encode",
    "base knowledge: one base-policy text per train/valid user + history, and item texts, encoded",
    options=(FORCE,),
    on_ray=_llm_on_ray,
    in_run=run_encode,
    upstream=("data", "sft"),
)
