"""The generation stage: N preference texts per user from the policy LLM (METHOD.md section 3, best-of-N).

Consumes the data stage's sequences/items/users and the `generate`, `models.llm` and `seed` config; produces
`<run>/generate/generations.parquet` (schema.GENERATIONS: one row per (user, sample_idx) with the exact prompt, the
text, token counts, its seed and quality flags) and `generation_errors.parquet` (requests that failed, with the
reason). Every request is sampled with its own seed derived from (run seed, user, sample_idx).

The engines (rlrf4rec.core.engines) share one interface, `generate(prompts, seeds) -> list[Completion]`: VLLMEngine
runs here on Ray Data (one engine per actor, loaded once), TransformersEngine in this process (baseline, fallback).

Resumable: each finished batch is written at once as a numbered shard in `<run>/generate.parts/`. A re-run generates
only the requests no shard holds yet, so a killed run continues where it stopped. The shards are reused only while
the settings a text depends on are unchanged (model, policy version, seed, sampling, engine, dtype, data); growing
`max_users` or `num_samples` reuses them too. When no request is left the shards are consolidated and
`<run>/generate/` is published atomically with its marker (rlrf4rec.core.artifacts), then the shards are removed.
Knows nothing about rewards or encoders, nor how Ray was started (entry points start it).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from rlrf4rec.core import assets
from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import (
    Fingerprint,
    digest,
    model_identity,
    publish,
    read_marker,
    read_parquet,
    read_table,
    read_tables,
    require_marker,
    write_json,
    write_parquet,
)
from rlrf4rec.core.cluster import map_batches_on_ray
from rlrf4rec.core.config import GenerateConfig, RunConfig, dump_config
from rlrf4rec.core.engines import ENGINE_CLASSES, Completion, Engine, chat_renderer, resolve_dtype
from rlrf4rec.core.history import select_users
from rlrf4rec.core.layout import (
    ERROR_SHARD,
    GENERATION_ERRORS,
    GENERATION_SHARD,
    GENERATIONS,
    PREVIOUS_SHARD,
    WORK_MARKER,
    parts_dir,
    shard,
    shard_glob,
)
from rlrf4rec.core.lineage import GenerationRequest
from rlrf4rec.core.prompts import prompt_messages
from rlrf4rec.core.protocol import stable_seed
from rlrf4rec.core.stage import FORCE, Stage

log = logging.getLogger(__name__)

REQUESTS = pa.schema([S.GENERATIONS.field(name) for name in (S.USER_ID, S.SAMPLE_IDX, S.SPLIT, S.PROMPT, S.SEED)])
REQUEST_COLUMNS = REQUESTS.names

# --------------------------------------------------------------------------------------------------- requests (pure)


def request_seed(run_seed: int, user_id: str, sample_idx: int) -> int:
    # 31 bits: every engine's seed type (torch, vLLM, numpy) takes it, and any row can be regenerated from it.
    return stable_seed(run_seed, "generate", user_id, sample_idx) & 0x7FFFFFFF


def build_requests(
    sequences: pa.Table,
    items: pa.Table,
    users: pa.Table | None,
    render: Callable[[list[dict[str, str]]], str],
    cfg: GenerateConfig,
    run_seed: int,
) -> pa.Table:
    """One row per (user, sample_idx): the user's rendered prompt and that sample's seed (REQUEST_COLUMNS).

    `render` applies the model's chat template to the messages. Rows are ordered by user so the N samples of one
    prompt land in the same engine batch (prefix caching shares the prompt's KV cache).
    """
    chosen = select_users(sequences, cfg.splits, cfg.max_users)
    messages = prompt_messages(chosen, items, users, cfg.prompt_history, cfg.domain)
    rows = []
    for user_id, split in zip(chosen.column(S.USER_ID).to_pylist(), chosen.column(S.SPLIT).to_pylist()):
        prompt = render(messages[user_id])
        for k in range(cfg.num_samples):
            rows.append(dict(zip(REQUEST_COLUMNS, [user_id, k, split, prompt, request_seed(run_seed, user_id, k)])))
    return pa.Table.from_pylist(rows, schema=REQUESTS)


def keys(table: pa.Table) -> list[tuple[str, int]]:
    return list(zip(table.column(S.USER_ID).to_pylist(), table.column(S.SAMPLE_IDX).to_pylist()))


def quality_flags(text: str, finish_reason: str, domain: str = "movies") -> list[str]:
    """Flags "empty", "truncated" (hit max_new_tokens), "degenerate" (under 5 words, or mostly repeated 3-grams),
    "off_topic" (names none of the domain's factors or genres: prompts.TOPIC_WORDS)."""
    from rlrf4rec.core.prompts import mentions_topic

    words = text.split()
    flags = []
    if not words:
        flags.append("empty")
    if finish_reason == "length":
        flags.append("truncated")
    trigrams = list(zip(words, words[1:], words[2:]))
    repeated = 1 - len(set(trigrams)) / len(trigrams) if len(trigrams) >= 10 else 0.0
    if words and (len(words) < 5 or repeated > 0.5):
        flags.append("degenerate")
    if words and not mentions_topic(text, domain):
        flags.append("off_topic")
    return flags


# --------------------------------------------------------------------------------------------------- Ray Data


def replica_cpus(cfg: GenerateConfig) -> int:
    """Ray CPUs per engine replica: generate.cpus_per_replica, else 1 beside a GPU, else the largest node's CPUs
    shared among the CPU replicas (a CPU replica computes on as many threads as it is given)."""
    import ray

    if cfg.cpus_per_replica is not None:
        return cfg.cpus_per_replica
    if cfg.num_gpus_per_replica:
        return 1
    node_cpus = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=1)
    return max(1, int(node_cpus) // cfg.concurrency)


class GenerateBatch:
    """A batch of request rows -> the same rows plus completion columns and `error` (null when it succeeded).

    A callable class for `map_batches`: the engine loads once per actor. A batch that raises is retried row by row,
    so one bad request becomes one error row instead of failing its batch-mates or the run.

    The engine is built and called on one thread of its own. A Ray Data actor constructs the UDF on one thread and
    calls it on another, and OpenMP keeps a team of worker threads per calling thread: on a CPU the engine's work
    then ran beside a second, idle team whose threads spin for a while after every use (0.8x the same engine in a
    plain process; with OMP_WAIT_POLICY=ACTIVE 0.5x, benchmarks/vllm_settings.py).
    """

    def __init__(self, make_engine: Callable[[], Engine]):
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.engine = self._thread.submit(make_engine).result()

    def _generate(self, prompts: list[str], seeds: list[int]) -> list[Completion]:
        return list(self._thread.submit(self.engine.generate, prompts, seeds).result())

    def __call__(self, batch: pa.Table) -> pa.Table:
        prompts, seeds = batch.column(S.PROMPT).to_pylist(), batch.column(S.SEED).to_pylist()
        try:
            results: list[Completion | str] = self._generate(prompts, seeds)
        except Exception as exc:  # isolate the failing rows; each failure is kept as an error row
            log.warning("generate: batch of %d failed (%s); retrying row by row", len(prompts), exc)
            results = [self._one(p, s) for p, s in zip(prompts, seeds)]
        assert len(results) == len(prompts), (len(results), len(prompts))
        done = [r if isinstance(r, Completion) else None for r in results]
        columns = {
            S.PREFERENCE_TEXT: [c.text.strip() if c else "" for c in done],
            S.PROMPT_TOKENS: [c.prompt_tokens if c else 0 for c in done],
            S.COMPLETION_TOKENS: [c.completion_tokens if c else 0 for c in done],
            S.FINISH_REASON: [c.finish_reason if c else "" for c in done],
            S.ERROR: [None if c else r for c, r in zip(done, results)],
        }
        out = batch.select(REQUEST_COLUMNS)
        for name, values in columns.items():
            out = out.append_column(name, pa.array(values, pa.int32() if "tokens" in name else pa.string()))
        return out

    def _one(self, prompt: str, seed: int) -> Completion | str:
        try:
            (completion,) = self._generate([prompt], [seed])
            return completion
        except Exception as exc:  # the reason goes to the errors table
            return f"{type(exc).__name__}: {exc}"


def run_local(requests: pa.Table, make_engine: Callable[[], Engine], batch_size: int) -> Iterator[pa.Table]:
    """Generate in this process, one batch at a time."""
    generate = GenerateBatch(make_engine)
    for start in range(0, requests.num_rows, batch_size):
        yield generate(requests.slice(start, batch_size))


def run_on_ray(requests: pa.Table, make_engine: Callable[[], Engine], cfg: GenerateConfig) -> Iterator[pa.Table]:
    """Generate on Ray Data, `concurrency` engine replicas; yields output batches as they finish (in any order)."""
    return map_batches_on_ray(
        requests,
        GenerateBatch,
        (make_engine,),
        batch_size=cfg.batch_size,
        concurrency=cfg.concurrency,
        num_cpus=replica_cpus(cfg),
        num_gpus=cfg.num_gpus_per_replica,
        what="generate.engine=vllm",
    )


# --------------------------------------------------------------------------------------------------- resumable shards


def open_parts(parts: Path, work_fingerprint: str, *, fresh: bool = False) -> None:
    """Create the shard directory, discarding it when it holds work for other settings (or when `fresh`)."""
    marker = parts / WORK_MARKER
    if parts.exists():
        held = json.loads(marker.read_text())["fingerprint"] if marker.is_file() else None
        if fresh or held != work_fingerprint:
            log.info("generate: discarding shards in %s (%s)", parts, "forced" if fresh else "other settings")
            shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    for stale in parts.glob(".*.tmp-*"):
        stale.unlink()
    if not marker.is_file():
        write_json({"fingerprint": work_fingerprint}, marker)


def _read_shards(parts: Path, prefix: str, schema: pa.Schema) -> pa.Table:
    tables = [read_parquet(p, schema) for p in sorted(parts.glob(shard_glob(prefix)))]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def _write_outputs(out: pa.Table, parts: Path, index: int, meta: dict, domain: str) -> tuple[int, int]:
    """Split one GenerateBatch output into a generations shard and an errors shard; returns their row counts."""
    succeeded = out.column(S.ERROR).is_null()
    ok, bad = out.filter(succeeded), out.filter(pc.invert(succeeded))
    if ok.num_rows:
        flags = [
            quality_flags(t, r, domain)
            for t, r in zip(ok.column(S.PREFERENCE_TEXT).to_pylist(), ok.column(S.FINISH_REASON).to_pylist())
        ]
        ok = ok.append_column(S.FLAGS, pa.array(flags, pa.list_(pa.string())))
        for name, value in meta.items():
            ok = ok.append_column(name, pa.array([value] * ok.num_rows))
        write_parquet(ok, parts / shard(GENERATION_SHARD, index), S.GENERATIONS)
    if bad.num_rows:
        write_parquet(bad, parts / shard(ERROR_SHARD, index), S.GENERATION_ERRORS)
    return ok.num_rows, bad.num_rows


def generate_missing(
    requests: pa.Table,
    parts: Path,
    run_batches: Callable[[pa.Table], Iterable[pa.Table]],
    meta: dict,
    domain: str = "movies",
) -> dict:
    """Generate the requests no shard in `parts` holds yet, writing one shard per finished batch; returns stats."""
    done = set(keys(_read_shards(parts, GENERATION_SHARD, S.GENERATIONS)))
    todo = requests.filter(pa.array([k not in done for k in keys(requests)]))
    log.info(
        "generate: %d requests, %d already in shards, %d to go",
        requests.num_rows,
        len(done & set(keys(requests))),
        todo.num_rows,
    )
    index = 1 + max((int(p.stem[4:]) for p in parts.glob("*-*.parquet") if p.stem[4:].isdigit()), default=-1)
    rows = errors = tokens = 0
    started = last_log = time.time()
    for out in run_batches(todo) if todo.num_rows else []:
        n_ok, n_bad = _write_outputs(out, parts, index, meta, domain)
        index, rows, errors = index + 1, rows + n_ok, errors + n_bad
        tokens += sum(out.column(S.COMPLETION_TOKENS).to_pylist())
        if time.time() - last_log > 10 or rows + errors == todo.num_rows:
            elapsed = max(time.time() - started, 1e-9)
            rate = (rows + errors) / elapsed
            log.info(
                "generate: %d/%d rows, %d errors, %.2f rows/s, %.1f tokens/s, ETA %.0f s",
                rows + errors,
                todo.num_rows,
                errors,
                rate,
                tokens / elapsed,
                (todo.num_rows - rows - errors) / rate if rate else float("nan"),
            )
            last_log = time.time()
    elapsed = time.time() - started
    return {
        "generated_now": rows,
        "failed_now": errors,
        "seconds_now": round(elapsed, 1),
        "tokens_per_s_now": round(tokens / elapsed, 1) if rows else 0.0,
    }


def consolidate(parts: Path, requests: pa.Table) -> tuple[pa.Table, pa.Table]:
    """All shards -> (generations, errors) for exactly `requests`: one row per key, generations win over errors."""
    wanted = set(keys(requests))
    gens = _read_shards(parts, GENERATION_SHARD, S.GENERATIONS)
    first, seen = [], set()
    for i, key in enumerate(keys(gens)):
        if key in wanted and key not in seen:
            seen.add(key)
            first.append(i)
    if gens.num_rows - len(first):
        log.warning("generate: dropped %d shard rows that were duplicates or not requested", gens.num_rows - len(first))
    gens = gens.take(pa.array(first, pa.int64())).sort_by([(S.USER_ID, "ascending"), (S.SAMPLE_IDX, "ascending")])
    errs = _read_shards(parts, ERROR_SHARD, S.GENERATION_ERRORS)
    latest = {key: i for i, key in enumerate(keys(errs)) if key in wanted and key not in seen}  # last attempt wins
    errs = errs.take(pa.array(sorted(latest.values()), pa.int64())).sort_by(
        [(S.USER_ID, "ascending"), (S.SAMPLE_IDX, "ascending")]
    )
    assert len(set(keys(gens))) == gens.num_rows, "duplicate keys in generations"
    assert seen.isdisjoint(latest) and len(seen) + len(latest) <= len(wanted)
    return gens, errs


# --------------------------------------------------------------------------------------------------- the stage


def fingerprint_dtype(g: GenerateConfig) -> str:
    """The dtype a text depends on. "auto" on CPU replicas is resolved here, assuming the replicas' machines are of
    this one's kind (a local or CPU cluster), so `auto` and the dtype it picks share their rows; GPU replicas resolve
    it on a machine the driver may not resemble, and stay keyed as "auto". A cluster mixing machines with and
    without native bf16 (or GPUs with and without bf16) under "auto" files rows of either dtype under one key: each
    is still a seeded sample of the same policy, but not the sample the other dtype would give; set the dtype
    explicitly there."""
    return resolve_dtype(g.dtype)[0] if g.num_gpus_per_replica == 0 else g.dtype


def run_relative_model(cfg: RunConfig, model: str) -> str:
    """How a fingerprint names the model: one this run's stages wrote (`<run>/dpo/round0/model`) by its place in
    the run directory, so a run directory moved or copied elsewhere keeps its texts; any other by name or path."""
    root, path = cfg.run_path.resolve(), Path(model).resolve()
    return f"<run>/{path.relative_to(root)}" if path.is_dir() and path.is_relative_to(root) else model


def fingerprint(
    cfg: RunConfig, g: GenerateConfig, data_fingerprint: str, model: str, policy_version: str
) -> Fingerprint:
    """What the stage's texts depend on (`g`: the generate settings it runs with): its key starts with the digest of
    what one row's text depends on (its prefix, the key of the shards it resumes from), then the digest of that plus
    which requests the stage holds."""
    identity = model_identity(
        assets.resolve(model, assets.asset_home(cfg.assets.home), fetch=False)
        if model.startswith(assets.EMBEDDED_PREFIX)
        else model
    )
    text = {
        "model": run_relative_model(cfg, model),
        **({"model_fingerprint": identity} if identity else {}),
        "policy_version": policy_version,
        "seed": cfg.seed,
        "data": data_fingerprint,
        **{k: getattr(g, k) for k in ("engine", "temperature", "top_p", "max_new_tokens", "domain")},
        "dtype": fingerprint_dtype(g),
        **({"prompt_history": g.prompt_history} if g.prompt_history is not None else {}),
    }
    requested = {"splits": list(g.splits), "max_users": g.max_users, "num_samples": g.num_samples}
    upstream = {"data": data_fingerprint, **({"policy": identity} if identity else {})}
    return Fingerprint("generate", {}, upstream, {"text": text, "requests": requested}, prefix=digest(text))


def run_generate(
    cfg: RunConfig,
    request: GenerationRequest | None = None,
    *,
    force: bool = False,
    make_engine: Callable[[], Engine] | None = None,
    out: Path | None = None,
) -> Path:
    """Write the stage directory `out` (default `<run>/generate/`) or find it complete, and return it. `request`:
    whose texts, for which users, how many (default: models.llm's, as the generate section says). The loop writes
    one per policy and split (layout.generations)."""
    data_dir = cfg.layout.data
    data_marker = read_marker(data_dir)
    if data_marker is None:
        raise FileNotFoundError(f"{data_dir} holds no complete data stage; run `rlrf4rec data` first")
    if request is None:
        request = GenerationRequest(cfg.models.llm, "base", cfg.generate.splits, cfg.generate.max_users)
    model, policy_version, g = request.model, request.version, request.settings(cfg.generate)
    model_path = assets.resolve(model, assets.asset_home(cfg.assets.home))

    def requests() -> pa.Table:
        tables = read_tables(data_dir, ("sequences", "items", "users"))
        return build_requests(
            tables["sequences"], tables["items"], tables["users"], chat_renderer(model_path), g, cfg.seed
        )

    return generate_requests(
        g,
        requests,
        out or cfg.layout.generate,
        fingerprint=fingerprint(cfg, g, data_marker["fingerprint"], model, policy_version),
        model=(model, model_path),
        policy_version=policy_version,
        config_dump=dump_config(cfg),
        make_engine=make_engine,
        force=force,
    )


def policy_generations(cfg: RunConfig, split: str, max_users: int | None, model: str, version: str) -> Path:
    """N texts of `model` per user of one split (the first `max_users`), in `<run>/generations/<version>-<split>/`.
    Named by policy, not by what asks for them: a loop's round t+1 finds policy_{t+1}'s valid texts already written
    in round t, and every DPO arm of `rlrf4rec arms` shares the base policy's."""
    request = GenerationRequest(model, version, (split,), max_users)
    return run_generate(cfg, request, out=cfg.layout.generations(f"{version}-{split}"))


def generate_requests(
    g: GenerateConfig,
    requests: pa.Table | Callable[[], pa.Table],
    stage_dir: Path,
    *,
    fingerprint: Fingerprint,
    model: tuple[str, str],
    policy_version: str,
    config_dump: str,
    make_engine: Callable[[], Engine] | None = None,
    force: bool = False,
) -> Path:
    """The stage's engine part: `requests` (REQUESTS rows, or a function making them, called only when the stage is
    not complete) -> `stage_dir`, resumable through `<stage>.parts/`. `fingerprint`: as `fingerprint` makes it, its
    prefix the key of what one row's text depends on; `model`: (as configured, resolved path)."""
    model, model_path = model
    parts = parts_dir(stage_dir)
    built = []

    def build(tmp: Path, stats: dict) -> None:
        built.append(tmp)
        rows = requests() if callable(requests) else requests
        open_parts(parts, fingerprint.prefix, fresh=force)
        previous = read_marker(stage_dir)
        if not force and previous and previous["fingerprint"].startswith(fingerprint.prefix + "-"):
            # Same texts, other request set (e.g. more users): the published rows count as done.
            shutil.copyfile(stage_dir / GENERATIONS, parts / PREVIOUS_SHARD)
        engine = make_engine or partial(ENGINE_CLASSES[g.engine], model_path, g)
        if g.dtype == "auto":  # each replica resolves it on its own machine; say what this one would pick
            log.info("generate.dtype auto: %s here (%s)", *resolve_dtype(g.dtype))
        if g.engine == "vllm":
            run_batches = partial(run_on_ray, make_engine=engine, cfg=g)
        else:
            run_batches = partial(run_local, make_engine=engine, batch_size=g.batch_size)
        meta = {
            S.TEMPERATURE: g.temperature,
            S.TOP_P: g.top_p,
            S.MAX_NEW_TOKENS: g.max_new_tokens,
            S.MODEL: model,
            S.POLICY_VERSION: policy_version,
        }
        attempt = generate_missing(rows, parts, run_batches, meta, g.domain)
        gens, errs = consolidate(parts, rows)
        if not gens.num_rows:
            first = errs.column(S.ERROR)[0].as_py() if errs.num_rows else "no rows"
            raise RuntimeError(f"generate: every request failed (first error: {first}); shards kept in {parts}")
        if errs.num_rows:
            log.warning("generate: %d requests failed; reasons in generation_errors.parquet", errs.num_rows)
        write_parquet(gens, tmp / GENERATIONS, S.GENERATIONS)
        write_parquet(errs, tmp / GENERATION_ERRORS, S.GENERATION_ERRORS)
        stats.update(generation_stats(gens, errs), **attempt, model=model, policy_version=policy_version)

    publish(stage_dir, fingerprint, build, config_dump, force=force)
    if built:  # published: its shards are in the stage's table
        shutil.rmtree(parts)
    return stage_dir


# --------------------------------------------------------------------------------------------------- item texts

ITEM_SPLIT = "items"  # the split of item-text rows, whose key column user_id holds the item id


def item_requests(items: pa.Table, render: Callable[[list[dict[str, str]]], str], domain: str) -> pa.Table:
    """One request per item (schema.ITEMS rows), sorted by id: KAR's item prompt, greedy, so its seed plays no part."""
    from rlrf4rec.core.prompts import item_messages

    rows = sorted(items.select([S.ITEM_ID, S.TITLE, S.YEAR, S.GENRES]).to_pylist(), key=lambda r: r[S.ITEM_ID])
    prompts = [render(item_messages(r[S.TITLE], r[S.YEAR], r[S.GENRES], domain)) for r in rows]
    n = len(rows)
    return pa.table([[r[S.ITEM_ID] for r in rows], [0] * n, [ITEM_SPLIT] * n, prompts, [0] * n], schema=REQUESTS)


def run_item_generate(cfg: RunConfig, *, make_engine: Callable[[], Engine] | None = None) -> Path:
    """The LLM's knowledge of every item (knowledge.item = llm): one greedy text per item, written to
    `<asset home>/cache/item-texts/<fingerprint>/` so every round and every later run with the same LLM, data and
    generation settings reuses it. Its generations.parquet has one row per item, the item id in user_id."""
    require_marker(cfg.layout.data, "data")
    greedy = dataclasses.replace(cfg.generate, num_samples=1, temperature=0.0, max_users=None)
    home = assets.asset_home(cfg.assets.home)
    model_path = assets.resolve(cfg.models.llm, home)
    requests = item_requests(read_table(cfg.layout.data, "items"), chat_renderer(model_path), greedy.domain)
    prompts = digest("\x1e".join(requests.column(S.PROMPT).to_pylist()), None)
    text = {
        "model": cfg.models.llm,
        "model_fingerprint": model_identity(model_path),
        "prompts": prompts,
        **{k: getattr(greedy, k) for k in ("engine", "max_new_tokens")},
        "dtype": fingerprint_dtype(greedy),
    }
    fingerprint = Fingerprint(
        "item texts",
        {},
        {"policy": text["model_fingerprint"]},
        {"text": text, "items": requests.num_rows},
        prefix=digest(text),
    )
    return generate_requests(
        greedy,
        requests,
        assets.cache_dir("item-texts", cfg.assets.home) / fingerprint.prefix,
        fingerprint=fingerprint,
        model=(cfg.models.llm, model_path),
        policy_version="items",
        config_dump=dump_config(cfg),
        make_engine=make_engine,
    )


def generation_stats(gens: pa.Table, errs: pa.Table) -> dict:
    flags = Counter(f for row in gens.column(S.FLAGS).to_pylist() for f in row)
    completion = gens.column(S.COMPLETION_TOKENS).to_pylist()
    stats = {
        "rows": gens.num_rows,
        "users": len(set(gens.column(S.USER_ID).to_pylist())),
        "errors": errs.num_rows,
        "completion_tokens_mean": round(sum(completion) / max(len(completion), 1), 1),
        "prompt_tokens_max": max(gens.column(S.PROMPT_TOKENS).to_pylist(), default=0),
    }
    stats.update({f"flag/{name}": flags.get(name, 0) for name in S.QUALITY_FLAGS})
    return stats


# --------------------------------------------------------------------------------------------------- the stage record


def _command(cfg: RunConfig, args: argparse.Namespace) -> list[Path]:
    return [run_generate(cfg, force=args.force)]


STAGE = Stage(
    "generate",
    "write N preference texts per user with the policy LLM (best-of-N), resumable",
    _command,
    (FORCE,),
    on_ray=lambda cfg, args: cfg.generate.engine == "vllm",
    upstream=("data",),
)
