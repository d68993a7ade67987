"""DPO seconds per pair before and after the speed-ups, on the same pairs, side by side in one run.

    RLRF4REC_HOME=... .venv/bin/python benchmarks/dpo_speed.py [--pairs 16] [--history-items 10]

Pairs are dpo_ray_vs_trl.py's (`build_pairs`): the factorization prompts of the first `--pairs` train users, history
capped at `--history-items` items (the CPU config's generate.prompt_history), two of each user's generated texts as
chosen and rejected. Every variant runs rlrf4rec.stages.dpo.run_dpo on Ray Train for exactly one epoch over the pairs,
4 pairs per optimizer step, so nothing is amortized over epochs:
1. before: the reference forward at every step, chosen and rejected as two rows that each carry the prompt, 2
   workers x 1 CPU (one torch thread each), grad_accum 2: the settings before dpo.precompute_ref_logps and
   dpo.share_prompt existed;
2. after: both on, 2 workers x 1 CPU, grad_accum 2;
3. after: both on, 1 worker x 2 CPUs (two torch threads), grad_accum 4;
4. after, bf16: as 2 with dpo.bf16 (bfloat16 autocast over float32 weights on CPU), whose losses are compared with
   2's step by step (the largest absolute difference is printed).
`--variants` picks some of them by name (before, after-2x1, after-1x2, after-2x1-bf16; default all).
Seconds per pair = mean optimizer-step time from the step clock (steps 2.., the first warms up) / pairs per step,
plus for the after variants the reference pre-pass (its wall time from the first step's log, the workers sharing
the pairs) / the pairs it covered. Appends a dated section to benchmarks/RESULTS.md (`--results` elsewhere for a
smoke run).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
from common import load, machine
from dpo_ray_vs_trl import build_pairs

from rlrf4rec.core import assets
from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import read_marker, write_parquet
from rlrf4rec.core.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmark")
PAIRS_PER_STEP = 4  # the CPU config's 2 workers x 1 pair x grad_accum 2


def pair_tokens(pairs: pa.Table, model: str) -> dict[str, float]:
    """Mean tokens per pair that one forward runs: TRL's two padded rows, or one shared-prompt row."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    rows = {"prompt": [], "two_rows": [], "two_rows_padding": [], "shared_row": []}
    for pair in pairs.select([S.PROMPT, S.CHOSEN, S.REJECTED]).to_pylist():
        p = len(tok.apply_chat_template(pair[S.PROMPT], add_generation_prompt=True, return_dict=False))
        c, r = (len(tok.apply_chat_template(pair[S.PROMPT] + pair[side], return_dict=False)) - p
                for side in (S.CHOSEN, S.REJECTED))
        rows["prompt"].append(p)
        rows["two_rows"].append(2 * (p + max(c, r)))
        rows["two_rows_padding"].append(abs(c - r))
        rows["shared_row"].append(p + c + r + 1)
    return {k: statistics.mean(v) for k, v in rows.items()}


def run_variant(label: str, name: str, cfg: RunConfig, pairs: Path, policy: Path, n_pairs: int) -> dict:
    from rlrf4rec.stages.dpo import run_dpo

    started = time.perf_counter()
    stage = run_dpo(cfg, pairs, policy, name, on_ray=True, force=True)
    wall = time.perf_counter() - started
    history = json.loads((stage / "history.json").read_text())
    times = [h["train/step_time_s"] for h in history if "train/step_time_s" in h][1:]
    stats = read_marker(stage)["stats"]
    dc = cfg.dpo
    per_step = dc.num_workers * dc.per_device_batch_size * dc.grad_accum
    assert per_step == PAIRS_PER_STEP and stats["steps"] * per_step == n_pairs, "one epoch, 4 pairs a step"
    precompute = stats.get("train/ref_precompute_s", 0.0)
    step_per_pair = statistics.mean(times) / per_step
    row = {
        "variant": label,
        "workers_x_threads": f"{dc.num_workers} x {dc.cpus_per_worker}",
        "s_per_step": statistics.mean(times),
        "step_s_per_pair": step_per_pair,
        "precompute_s": precompute,
        "precompute_s_per_pair": precompute / n_pairs,
        "s_per_pair": step_per_pair + precompute / n_pairs,
        "wall_s": wall,
        "loss": (stats["train/dpo_loss_first"], stats["train/dpo_loss_last"]),
        "losses": [h["train/dpo_loss"] for h in history if "train/dpo_loss" in h],
    }
    log.info("%s", row)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/ml100k-cpu.yaml"))
    parser.add_argument("--pairs", type=int, default=16, help="a multiple of 4: one epoch, 4 pairs per step")
    parser.add_argument("--history-items", type=int, default=10)
    parser.add_argument("--results", default=str(ROOT / "benchmarks/RESULTS.md"))
    parser.add_argument("--variants", help="comma-separated variant names (default: all)")
    args = parser.parse_args()
    if args.pairs % PAIRS_PER_STEP or args.pairs < 2 * PAIRS_PER_STEP:
        parser.error(f"--pairs must be a multiple of {PAIRS_PER_STEP}, at least {2 * PAIRS_PER_STEP} (step 1 warms up)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for key, value in {
        "OMP_NUM_THREADS": "1",  # the workers set their own torch threads (dpo.cpus_per_worker)
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        os.environ.setdefault(key, value)

    run_cfg = load_config(args.config)
    policy = Path(assets.resolve(run_cfg.models.llm, assets.asset_home(run_cfg.assets.home)))
    scratch = Path(tempfile.mkdtemp(prefix="rlrf4rec-dpo-speed-"))
    pairs, source = build_pairs(run_cfg, args.pairs, args.history_items, scratch)
    pairs_path = scratch / "pairs.parquet"
    write_parquet(pairs, pairs_path, S.PAIRS)
    tokens = pair_tokens(pairs, str(policy))
    steps = args.pairs // PAIRS_PER_STEP
    base = dataclasses.replace(
        run_cfg.dpo, max_steps=steps, save_steps=steps, eval_fraction=0.0, per_device_batch_size=1, deepspeed=None,
    )
    variants = [
        ("before: reference every step, two rows per pair", "before",
         dict(precompute_ref_logps=False, share_prompt=False, num_workers=2, cpus_per_worker=1, grad_accum=2)),
        ("after: precomputed reference, shared prompt", "after-2x1",
         dict(precompute_ref_logps=True, share_prompt=True, num_workers=2, cpus_per_worker=1, grad_accum=2)),
        ("after, one worker with two threads", "after-1x2",
         dict(precompute_ref_logps=True, share_prompt=True, num_workers=1, cpus_per_worker=2, grad_accum=4)),
        ("after, bf16 autocast", "after-2x1-bf16",
         dict(precompute_ref_logps=True, share_prompt=True, num_workers=2, cpus_per_worker=1, grad_accum=2, bf16=True)),
    ]
    if args.variants:
        wanted = args.variants.split(",")
        unknown = set(wanted) - {name for _, name, _ in variants}
        if unknown:
            parser.error(f"--variants: unknown {sorted(unknown)}")
        variants = [v for v in variants if v[1] in wanted]
    load_before = load()
    log.info("%d pairs (%s); tokens per pair %s; load %s", pairs.num_rows, source, tokens, load_before)
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for label, name, switches in variants:
            cfg = dataclasses.replace(
                run_cfg, name="dpo-speed", run_dir=str(scratch / "run"), dpo=dataclasses.replace(base, **switches)
            )
            rows.append(run_variant(label, name, cfg, pairs_path, policy, args.pairs))
    finally:
        ray.shutdown()
    _append(Path(args.results), args, base, rows, source, tokens, load_before)


def _append(path: Path, args, dpo, rows: list[dict], source: str, tokens: dict, load_before: str) -> None:
    before = rows[0]
    lora = f"LoRA r={dpo.lora_r} on {'/'.join(dpo.lora_target_modules)}" if dpo.lora else "full fine-tune"
    lines = [
        f"\n## {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} DPO seconds per pair: before vs after the "
        "speed-ups (benchmarks/dpo_speed.py)\n",
        f"- Machine: {machine()}; load average before {load_before}, after {load()}.",
        f"- Work: {args.pairs} ML-100k train users' factorization prompts (history capped at {args.history_items} "
        f"items, {tokens['prompt']:.0f} prompt tokens on average) with {source}; SmolLM2-135M-Instruct float32, "
        f"{lora}, beta {dpo.beta}; Ray Train, one epoch over the pairs, 4 pairs per optimizer step.",
        f"- Tokens per pair in one forward: two rows (TRL's layout) {tokens['two_rows']:.0f}, of which padding "
        f"{tokens['two_rows_padding']:.1f}; one shared-prompt row {tokens['shared_row']:.0f}.",
        "- s/pair = mean step time (steps 2..) / 4 + reference pre-pass wall time / pairs (each pair trained once).",
        "",
        "| variant | workers x threads | s/step | step s/pair | pre-pass s (s/pair) | s/pair | vs before | wall s "
        "| loss step 1 -> last |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['workers_x_threads']} | {r['s_per_step']:.2f} | {r['step_s_per_pair']:.2f} | "
            f"{r['precompute_s']:.1f} ({r['precompute_s_per_pair']:.2f}) | {r['s_per_pair']:.2f} | "
            f"{r['s_per_pair'] / before['s_per_pair']:.2f}x | {r['wall_s']:.0f} | "
            f"{r['loss'][0]:.4f} -> {r['loss'][1]:.4f} |"
        )
    if len(rows) > 1:
        best = min(rows[1:], key=lambda r: r["s_per_pair"])
        lines += ["", f"Fastest / first row, s/pair: {best['s_per_pair'] / before['s_per_pair']:.2f}x "
                  f"({best['variant']}, {best['workers_x_threads']})."]
    by_name = {r["variant"]: r for r in rows}
    fp32, bf16 = by_name.get("after: precomputed reference, shared prompt"), by_name.get("after, bf16 autocast")
    if fp32 and bf16:
        diff = max(abs(a - b) for a, b in zip(fp32["losses"], bf16["losses"]))
        lines += [f"bf16 autocast / float32, s/pair: {bf16['s_per_pair'] / fp32['s_per_pair']:.2f}x; largest "
                  f"per-step loss difference {diff:.4f} over {len(fp32['losses'])} steps."]
    if not path.exists():
        path.write_text("# Benchmark results\n")
    with open(path, "a") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
