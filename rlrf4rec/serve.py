"""The Ray Serve re-ranking application: ingress -> knowledge lookup (-> on-line generation) -> re-ranker.

Deployments, composed through DeploymentHandles:
- `Ingress` (FastAPI): validates the request (422 with field errors from pydantic, 400 naming unknown item ids),
  asks `KnowledgeLookup` for the user's knowledge under a deadline, sends the query to `Reranker`, answers with the
  ranked items, the preference text used and the path that served it ("knowledge" or "fallback" + reason).
- `KnowledgeLookup`: the precomputed knowledge of one version (text + vector per user). For users without it and
  `generation: true`, asks `PreferenceGenerator` for a text under a deadline, encodes it and caches it; a late text
  still lands in the cache for the user's next request.
- `PreferenceGenerator` (optional): the version's policy LLM (vLLM or transformers), greedy, `@serve.batch`.
- `Reranker`: the knowledge-augmented PRM of the version and the ID-only PRM (the fallback), `@serve.batch`.
`user_config: {version: ...}` on KnowledgeLookup, Reranker and PreferenceGenerator swaps the version in place.
Overload: each deployment's `max_queued_requests` sheds load with 503 instead of letting requests time out.
The pure scoring and lookup code is rlrf4rec.online; this module only wires it into Serve.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import math
import time
from pathlib import Path
from typing import Literal

import numpy as np
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from rlrf4rec import online

log = logging.getLogger(__name__)

MAX_CANDIDATES = 1000
MAX_HISTORY = 200
FALLBACK_REASONS = (
    "no_knowledge",
    "knowledge_late",
    "knowledge_error",
    "generation_late",
    "generation_error",
    "version_mismatch",
)


# ------------------------------------------------------------------------------------------------------ HTTP API


class HistoryEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item_id: str = Field(min_length=1, max_length=128)
    rating: float | None = Field(None, ge=0, le=5, description="0-5 stars; only used to prompt on-line generation")


class RankRequest(BaseModel):
    """A user (known to the run, or described by a recent history) and the candidates to re-rank."""

    model_config = ConfigDict(extra="forbid")
    user_id: str | None = Field(None, min_length=1, max_length=128, description="a user id of the run's dataset")
    history: list[HistoryEntry] | None = Field(
        None, max_length=MAX_HISTORY, description="recent interactions, oldest first (default: the stored window)"
    )
    candidates: list[str] = Field(min_length=1, max_length=MAX_CANDIDATES, description="item ids to re-rank")
    top_k: int | None = Field(None, ge=1, description="how many ranked items to return (default: all)")

    @model_validator(mode="after")
    def _check(self) -> RankRequest:
        seen, dupes = set(), []
        for c in self.candidates:
            if c in seen:
                dupes.append(c)
            seen.add(c)
        if dupes:
            raise ValueError(f"candidates: duplicate item ids {sorted(set(dupes))[:20]}; send each candidate once")
        if self.top_k is not None and self.top_k > len(self.candidates):
            raise ValueError(f"top_k={self.top_k} exceeds the {len(self.candidates)} candidates; lower top_k")
        return self


class RankedItem(BaseModel):
    item_id: str
    score: float


class RankResponse(BaseModel):
    items: list[RankedItem] = Field(description="best first")
    path: Literal["knowledge", "fallback"] = Field(description="knowledge-augmented model, or ID-only fallback")
    fallback_reason: str | None = Field(None, description=f"why the fallback served it: one of {FALLBACK_REASONS}")
    preference_text: str | None = Field(None, description="the preference text behind the ranking (knowledge path)")
    knowledge_source: Literal["precomputed", "generated"] | None = None
    knowledge_version: str | None = None
    model_version: str


class ServeArgs(BaseModel):
    """Arguments of the application (`args:` in serve_config.yaml, or `rlrf4rec serve` flags)."""

    model_config = ConfigDict(extra="forbid")
    run_dir: str = Field(description="a finished run directory (rlrf4rec run)")
    version: str = Field("latest", description="'latest', 'base' or 'round<t>'; user_config can change it live")
    knowledge_timeout_ms: float = Field(50.0, gt=0, description="after this the ID-only fallback answers")
    generation: bool = Field(False, description="generate knowledge on line for users without it")
    generation_deadline_ms: float = Field(2000.0, gt=0, description="how long a request waits for a new text")
    threads: int = Field(1, ge=1, description="torch threads per Reranker replica")


def _version_from(user_config: dict | None, default: str) -> str:
    config = dict(user_config or {})
    unknown = set(config) - {"version"}
    if unknown:
        raise ValueError(f"user_config: unknown keys {sorted(unknown)}; the only key is 'version'")
    return config.get("version", default)


# --------------------------------------------------------------------------------------------------- deployments


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64, max_queued_requests=256)
class Reranker:
    def __init__(self, run_dir: str, version: str, threads: int = 1):
        import torch

        torch.set_num_threads(threads)
        self.run_dir = Path(run_dir)
        self.core = online.Reranker(self.run_dir, online.resolve_version(self.run_dir, version))

    async def reconfigure(self, user_config: dict) -> None:
        # async: runs on the replica's event loop, between batches, never beside one in a thread.
        version = online.resolve_version(self.run_dir, _version_from(user_config, self.core.version))
        if version.name != self.core.version:
            self.core.load_version(version)
            log.info("re-ranker now serves version %s", version.name)

    # No wait for batch-mates: whatever queued while the previous batch ran forms the next one.
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def rank(self, queries: list[online.Query]) -> list[tuple[np.ndarray, str]]:
        """(scores, model version used: the knowledge version, or "id" for the ID-only model) per query."""
        return self.core.score(queries)


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=16, max_queued_requests=64)
class PreferenceGenerator:
    """The policy LLM of a version, greedy: one preference text per prompt, prompts batched."""

    def __init__(self, run_dir: str, version: str):
        self.run_dir = Path(run_dir)
        self.version = ""
        self._load(version)

    def _load(self, name: str) -> None:
        import dataclasses

        from rlrf4rec import assets
        from rlrf4rec.generate import TransformersEngine, VLLMEngine, chat_renderer

        version = online.resolve_version(self.run_dir, name)
        if version.name == self.version:
            return
        cfg = online.run_config(self.run_dir)
        model = assets.resolve(version.policy, assets.asset_home(cfg.assets.home))
        gen_cfg = dataclasses.replace(cfg.generate, temperature=0.0)
        engine = (VLLMEngine if cfg.generate.engine == "vllm" else TransformersEngine)(model, gen_cfg)
        self.policy = (engine, chat_renderer(model), cfg.generate.domain)  # one assignment: batches see one policy
        self.version = version.name

    async def reconfigure(self, user_config: dict) -> None:
        await asyncio.to_thread(self._load, _version_from(user_config, self.version))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def generate(self, history_texts: list[str]) -> list[str]:
        from rlrf4rec.prompts import preference_messages

        engine, render, domain = self.policy
        prompts = [render(preference_messages(h, domain)) for h in history_texts]
        completions = await asyncio.to_thread(engine.generate, prompts, [0] * len(prompts))
        return [c.text.strip() for c in completions]


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=128, max_queued_requests=256)
class KnowledgeLookup:
    CACHE_SIZE = 10_000
    GENERATION_TIMEOUT_S = 120.0  # a generation still running after this is abandoned (the next request retries)

    def __init__(
        self, run_dir: str, version: str, generator: DeploymentHandle | None = None, deadline_ms: float = 2000.0
    ):
        self.run_dir = Path(run_dir)
        self.store = online.KnowledgeStore(online.resolve_version(self.run_dir, version))
        self.generator, self.deadline_s = generator, deadline_ms / 1000
        self.generated: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self.pending: dict[str, asyncio.Task] = {}
        self.catalog = self.encoder = None
        if generator is not None:
            from rlrf4rec import assets
            from rlrf4rec.encode import TextEncoder

            cfg = online.run_config(self.run_dir)
            self.catalog = online.ItemCatalog(self.run_dir)
            encoder = assets.resolve(cfg.models.encoder, assets.asset_home(cfg.assets.home))
            self.encoder = TextEncoder(encoder, max_length=cfg.encode.max_length)

    async def reconfigure(self, user_config: dict) -> None:
        version = online.resolve_version(self.run_dir, _version_from(user_config, self.store.version))
        if version.name != self.store.version:
            self.store = online.KnowledgeStore(version)
            self.generated.clear()  # texts of the previous policy; late ones are dropped by _generate
            log.info("knowledge now serves version %s", version.name)

    async def lookup(self, user_id: str | None, history: list[tuple[str, float | None]] | None) -> dict:
        """{"text", "vector", "source", "version"} of the user, or {"reason"} when there is none in time."""
        known = self.store.get(user_id) if user_id is not None else None
        if known is not None:
            return {"text": known.text, "vector": known.vector, "source": "precomputed", "version": self.store.version}
        if self.generator is None:
            return {"reason": "no_knowledge"}
        attributes = self.catalog.attributes.get(user_id) if user_id is not None else None
        if history is None and user_id in self.catalog.windows:
            history = self.catalog.windows[user_id]  # with ratings, as the offline prompts had them
        if not history:
            return {"reason": "no_knowledge"}
        key = hashlib.sha256(repr((self.store.version, user_id, history)).encode()).hexdigest()
        if key in self.generated:
            self.generated.move_to_end(key)
            return self.generated[key]
        task = self.pending.get(key)
        if task is None:
            task = self.pending[key] = asyncio.create_task(self._generate(key, history, attributes))
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.deadline_s)
        except asyncio.TimeoutError:
            return {"reason": "generation_late"}

    async def _generate(self, key: str, history: list[tuple[str, float | None]], attributes: dict | None) -> dict:
        """Generate, encode and cache one user's knowledge; never raises (a failure is a fallback reason)."""
        from rlrf4rec.encode import user_knowledge_text
        from rlrf4rec.prompts import HistoryItem, history_text

        version = self.store.version
        try:
            hist = history_text([HistoryItem(*self.catalog.meta[i], r) for i, r in history], attributes)
            call = self.generator.generate.remote(hist)
            try:
                preference = await asyncio.wait_for(call, self.GENERATION_TIMEOUT_S)
            except asyncio.TimeoutError:
                call.cancel()
                raise
            text = user_knowledge_text(hist, preference)
            vector = (await asyncio.to_thread(self.encoder.encode, [text]))[0]
            out = {"text": text, "vector": vector, "source": "generated", "version": version}
            if version == self.store.version:  # a version swap while generating: the text is the old policy's
                self.generated[key] = out
                while len(self.generated) > self.CACHE_SIZE:
                    self.generated.popitem(last=False)
            return out
        except Exception:
            log.exception("on-line generation failed")
            return {"reason": "generation_error"}
        finally:
            self.pending.pop(key, None)


api = FastAPI(
    title="rlrf4rec re-ranking",
    description="Re-ranks candidate items for a user with the knowledge-augmented re-ranker of an rlrf4rec run, "
    "and returns the preference text behind the ranking. Falls back to the ID-only re-ranker when the user's "
    "knowledge is missing or late.",
)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=128, max_queued_requests=256)
@serve.ingress(api)
class Ingress:
    RETRIES = 3  # a replica that died mid-request: the query is idempotent, ask another one

    def __init__(
        self, knowledge: DeploymentHandle, reranker: DeploymentHandle, run_dir: str, knowledge_timeout_ms: float
    ):
        from ray.serve.metrics import Counter, Histogram

        from rlrf4rec import schema as S
        from rlrf4rec.artifacts import read_parquet
        from rlrf4rec.data import TABLES

        self.knowledge, self.reranker = knowledge, reranker
        index = read_parquet(Path(run_dir) / "data" / "item_index.parquet", TABLES["item_index"])
        self.items = frozenset(index.column(S.ITEM_ID).to_pylist())
        self.timeout_s = knowledge_timeout_ms / 1000
        self.counts: collections.Counter[str] = collections.Counter()
        self.requests = Counter(
            "rlrf4rec_rank_requests", "re-rank requests by serving path", tag_keys=("path", "reason")
        )
        self.latency = Histogram(
            "rlrf4rec_rank_latency_ms",
            "re-rank latency inside the ingress",
            boundaries=[1, 2, 5, 10, 20, 30, 50, 100, 200, 500, 1000, 5000],
            tag_keys=("path",),
        )

    def _unknown(self, field: str, ids: list[str]) -> None:
        unknown = list(dict.fromkeys(i for i in ids if i not in self.items))
        if unknown:
            raise HTTPException(
                400,
                detail={
                    "field": field,
                    "error": f"{len(unknown)} unknown item id(s); send ids from the run's item catalog",
                    "unknown_item_ids": unknown[:50],
                },
            )

    async def _knowledge(self, req: RankRequest) -> dict:
        history = None if req.history is None else [(h.item_id, h.rating) for h in req.history]
        response = self.knowledge.lookup.remote(req.user_id, history)
        try:
            return await asyncio.wait_for(response, self.timeout_s)
        except asyncio.TimeoutError:
            response.cancel()  # free the lookup's slot; a generation it started runs on, shielded, into the cache
            return {"reason": "knowledge_late"}
        except Exception as e:  # overloaded, dead or failing: the ID-only path still answers
            log.warning("knowledge lookup failed: %r", e)
            return {"reason": "knowledge_error"}

    async def _rank(self, query: online.Query) -> tuple[np.ndarray, str]:
        for attempt in range(self.RETRIES):
            try:
                return await self.reranker.rank.remote(query)
            except RayActorError as e:  # includes ActorDiedError, ActorUnavailableError
                if attempt == self.RETRIES - 1:
                    raise HTTPException(503, detail="re-ranker unavailable; retry later") from e
                log.warning("re-ranker replica unavailable, retrying (%d)", attempt + 1)
        raise AssertionError("unreachable")

    @api.post("/rank", response_model=RankResponse)
    async def rank(self, req: RankRequest) -> RankResponse:
        """Re-rank `candidates` for the user; best first."""
        start = time.perf_counter()
        self._unknown("candidates", req.candidates)
        if req.history is not None:
            self._unknown("history", [h.item_id for h in req.history])
        k = await self._knowledge(req)
        history = None if req.history is None else [h.item_id for h in req.history]
        query = online.Query(req.candidates, req.user_id, history, k.get("vector"), k.get("version"))
        try:
            scores, model_version = await self._rank(query)
        except BackPressureError as e:
            self.counts["shed"] += 1
            retry = {"Retry-After": str(math.ceil(e.retry_after_s))} if e.retry_after_s is not None else None
            raise HTTPException(e.status_code, detail=f"re-ranker overloaded: {e.message}", headers=retry) from e
        if "vector" not in k:
            path, reason = "fallback", k["reason"]
        elif model_version == "id":  # mid version swap: this knowledge is not the model's; never mix them
            path, reason = "fallback", "version_mismatch"
        else:
            path, reason = "knowledge", None
        self.counts[path if reason is None else f"fallback/{reason}"] += 1
        self.requests.inc(tags={"path": path, "reason": reason or ""})
        self.latency.observe((time.perf_counter() - start) * 1000, tags={"path": path})
        ranked = online.top_k(req.candidates, scores, req.top_k or len(req.candidates))
        return RankResponse(
            items=[RankedItem(item_id=i, score=s) for i, s in ranked],
            path=path,
            fallback_reason=reason,
            preference_text=online.preference_of(k["text"]) if path == "knowledge" else None,
            knowledge_source=k.get("source") if path == "knowledge" else None,
            knowledge_version=k.get("version"),
            model_version=model_version,
        )

    @api.get("/stats")
    async def stats(self) -> dict:
        """Requests served by this ingress replica, by path and fallback reason (Ray's metrics have all replicas)."""
        return {"replica": serve.get_replica_context().replica_id.unique_id, "counts": dict(self.counts)}

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}


def build_app(args: ServeArgs) -> serve.Application:
    """The application builder named by serve_config.yaml (`import_path: rlrf4rec.serve:build_app`)."""
    if isinstance(args, dict):
        args = ServeArgs(**args)
    run_dir = str(Path(args.run_dir).resolve())
    # Resolved once, here: every replica starts on the same version even if a round finishes meanwhile (and it
    # fails here, with the fix, rather than inside a replica).
    version = online.resolve_version(Path(run_dir), args.version).name
    generator = PreferenceGenerator.bind(run_dir, version) if args.generation else None
    knowledge = KnowledgeLookup.bind(run_dir, version, generator, args.generation_deadline_ms)
    reranker = Reranker.bind(run_dir, version, args.threads)
    # With generation, the lookup itself may wait up to its generation deadline: the ingress waits that long too.
    timeout_ms = args.knowledge_timeout_ms + (args.generation_deadline_ms if args.generation else 0)
    return Ingress.bind(knowledge, reranker, run_dir, timeout_ms)
