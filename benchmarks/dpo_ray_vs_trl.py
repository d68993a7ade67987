"""DPO seconds per step: TRL's DPOTrainer inside Ray Train workers vs plain TRL in this process, same settings.

    RLRF4REC_HOME=... OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dpo_ray_vs_trl.py [--pairs 16] [--steps 5]

Pairs are realistic in shape: the factorization prompts (rlrf4rec.core.prompts) of the first `--pairs` train users of
the config's dataset (its data stage rebuilt in a scratch folder), history capped at `--history-items` items so a
CPU step stays short, with two of the user's generated texts as chosen and rejected when the config's run has
generations (else two fixed texts). The same `dpo` settings (the config's, with `--steps` optimizer steps, batch
`--batch` and no held-out set) then run through rlrf4rec.stages.dpo.run_dpo:
1. plain TRL in this process (`on_ray=False`),
2. Ray Train with 1 worker: the same work per step, so the ratio is the cost of the Ray wrapper,
3. Ray Train with 2 workers (DDP over gloo): twice the pairs per step,
4. with `--zero2`, Ray Train with 2 workers under DeepSpeed ZeRO-2.
Seconds per step come from the step clock in each run's history (forward, backward and optimizer of one optimizer
step, the first step left out as warm-up); wall time covers everything from start to published model, Ray's
start-up included. Appends a dated section to benchmarks/RESULTS.md.
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
import pyarrow.compute as pc
from common import load, machine

from rlrf4rec.core import assets
from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import read_marker, read_parquet, write_parquet
from rlrf4rec.core.config import RunConfig, load_config
from rlrf4rec.core.prompts import history_texts, preference_messages
from rlrf4rec.stages.data import run_data

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmark")
FALLBACK = (
    "This user enjoys character-driven dramas and classic thrillers with tense plots, strong performances and "
    "morally complex leads; they rate light comedies and formulaic action films lower.",
    "Movies are good. The user likes movies and watches movies. Movies, movies, movies.",
)


def build_pairs(run_cfg: RunConfig, n: int, history_items: int, scratch: Path) -> tuple[pa.Table, str]:
    data = run_data(dataclasses.replace(run_cfg, run_dir=str(scratch / "data-run")))  # never touch the config's run
    seq = read_parquet(data / "sequences.parquet", S.SEQUENCES)
    # Keep the last `history_items` items of each window: shorter prompts, same template.
    start = pc.max_element_wise(seq.column(S.HISTORY_START), pc.subtract(seq.column(S.HISTORY_END), history_items))
    seq = seq.set_column(seq.schema.get_field_index(S.HISTORY_START), S.HISTORY_START, start.cast(pa.int32()))
    histories = history_texts(
        seq, read_parquet(data / "items.parquet", S.ITEMS), read_parquet(data / "users.parquet", S.USERS)
    )
    train_users = sorted(r[S.USER_ID] for r in seq.select([S.USER_ID, S.SPLIT]).to_pylist() if r[S.SPLIT] == "train")
    texts: dict[str, list[str]] = {}
    gens_path = run_cfg.run_path / "generate" / "generations.parquet"
    source = "fixed texts"
    if gens_path.is_file():
        for r in read_parquet(gens_path, S.GENERATIONS).select([S.USER_ID, S.PREFERENCE_TEXT]).to_pylist():
            texts.setdefault(r[S.USER_ID], []).append(r[S.PREFERENCE_TEXT])
        source = f"generated texts from {gens_path}"
    users = [u for u in train_users if len(texts.get(u, [])) >= 2] or train_users
    users = (users + train_users)[:n]
    rows = []
    for u in users:
        chosen, rejected = texts[u][:2] if len(texts.get(u, [])) >= 2 else FALLBACK
        rows.append({
            S.USER_ID: u, S.SPLIT: "train", S.PROMPT: preference_messages(histories[u], run_cfg.generate.domain),
            S.CHOSEN: [{"role": "assistant", "content": chosen}],
            S.REJECTED: [{"role": "assistant", "content": rejected}],
            S.CHOSEN_SAMPLE_IDX: 0, S.REJECTED_SAMPLE_IDX: 1, S.CHOSEN_REWARD: 1.0, S.REJECTED_REWARD: 0.0,
            S.REWARD_MARGIN: 1.0, S.POLICY_VERSION: "base", S.ROUND: 0,
        })
    return pa.Table.from_pylist(rows, schema=S.PAIRS), source


def token_lengths(pairs: pa.Table, model: str) -> tuple[float, float]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    prompts = [len(tok.apply_chat_template(m, add_generation_prompt=True, return_dict=False))
               for m in pairs.column(S.PROMPT).to_pylist()]
    completions = [len(tok(m[0]["content"])["input_ids"]) for side in (S.CHOSEN, S.REJECTED)
                   for m in pairs.column(side).to_pylist()]
    return statistics.mean(prompts), statistics.mean(completions)


def run_variant(label: str, name: str, cfg: RunConfig, pairs: Path, policy: Path, on_ray: bool) -> dict:
    from rlrf4rec.stages.dpo import run_dpo

    started = time.perf_counter()
    stage = run_dpo(cfg, pairs, policy, name, on_ray=on_ray, force=True)
    wall = time.perf_counter() - started
    history = json.loads((stage / "history.json").read_text())
    times = [h["train/step_time_s"] for h in history if "train/step_time_s" in h][1:]
    stats = read_marker(stage)["stats"]
    workers = cfg.dpo.num_workers if on_ray else 1
    s_per_step = statistics.mean(times)
    row = {
        "variant": label,
        "workers": workers,
        "pairs_per_step": workers * cfg.dpo.per_device_batch_size * cfg.dpo.grad_accum,
        "s_per_step": round(s_per_step, 2),
        "s_per_step_min": round(min(times), 2),
        "pairs_per_s": round(workers * cfg.dpo.per_device_batch_size * cfg.dpo.grad_accum / s_per_step, 3),
        "wall_s": round(wall, 1),
        "loss_first": round(stats["train/dpo_loss_first"], 4),
        "loss_last": round(stats["train/dpo_loss_last"], 4),
        "margin_last": round(stats["train/rewards/margins_last"], 4),
    }
    log.info("%s", row)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/ml100k-cpu.yaml"))
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per variant (the first is warm-up)")
    parser.add_argument("--batch", type=int, default=1, help="pairs per worker per step")
    parser.add_argument("--history-items", type=int, default=10)
    parser.add_argument("--zero2", action="store_true", help="add a 2-worker DeepSpeed ZeRO-2 run")
    parser.add_argument("--results", default=str(ROOT / "benchmarks/RESULTS.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for key, value in {
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        os.environ.setdefault(key, value)
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # plain TRL gets what each Ray worker gets

    run_cfg = load_config(args.config)
    policy = Path(assets.resolve(run_cfg.models.llm, assets.asset_home(run_cfg.assets.home)))
    scratch = Path(tempfile.mkdtemp(prefix="rlrf4rec-dpo-bench-"))
    pairs, source = build_pairs(run_cfg, args.pairs, args.history_items, scratch)
    pairs_path = scratch / "pairs.parquet"
    write_parquet(pairs, pairs_path, S.PAIRS)
    dpo = dataclasses.replace(
        run_cfg.dpo, max_steps=args.steps, save_steps=args.steps, eval_fraction=0.0, grad_accum=1,
        per_device_batch_size=args.batch, deepspeed=None,
    )
    cfg = dataclasses.replace(run_cfg, name="dpo-bench", run_dir=str(scratch / "run"), dpo=dpo)
    prompt_tokens, completion_tokens = token_lengths(pairs, str(policy))
    load_before = load()
    log.info("%d pairs (%s); prompts %.0f tokens, completions %.0f; load %s", pairs.num_rows, source,
             prompt_tokens, completion_tokens, load_before)

    rows = [run_variant("plain TRL, in process", "plain", cfg, pairs_path, policy, on_ray=False)]
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        one = dataclasses.replace(cfg, dpo=dataclasses.replace(dpo, num_workers=1))
        rows.append(run_variant("Ray Train, 1 worker", "ray1", one, pairs_path, policy, on_ray=True))
        two = dataclasses.replace(cfg, dpo=dataclasses.replace(dpo, num_workers=2))
        rows.append(run_variant("Ray Train, 2 workers (DDP)", "ray2", two, pairs_path, policy, on_ray=True))
        if args.zero2:
            z2 = dataclasses.replace(cfg, dpo=dataclasses.replace(dpo, num_workers=2, deepspeed="zero2"))
            rows.append(run_variant("Ray Train, 2 workers (ZeRO-2)", "ray2-zero2", z2, pairs_path, policy, on_ray=True))
    finally:
        ray.shutdown()
    _append(Path(args.results), args, dpo, rows, source, (prompt_tokens, completion_tokens), load_before)


def _append(path: Path, args, dpo, rows: list[dict], source: str, lengths: tuple[float, float], load_before: str):
    if not path.exists():
        path.write_text(
            "# Benchmark results\n\nAppended by the scripts in benchmarks/; each section names its machine and load. "
            "Numbers from a shared or busy machine are noisy: compare rows within one section.\n"
        )
    plain, ray_one = rows[0], rows[1]
    lora = f"LoRA r={dpo.lora_r} on {'/'.join(dpo.lora_target_modules)}" if dpo.lora else "full fine-tune"
    lines = [
        f"\n## {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} DPO: TRL under Ray Train vs plain TRL\n",
        f"- Machine: {machine()}; load average before {load_before}, after {load()}.",
        f"- Work: {args.pairs} ML-100k train users' factorization prompts (history capped at {args.history_items} "
        f"items, {lengths[0]:.0f} prompt tokens on average) with {source} ({lengths[1]:.0f} tokens on average); "
        f"SmolLM2-135M-Instruct float32, {lora}, beta {dpo.beta}, lr {dpo.lr}, batch {args.batch} pair per worker, "
        f"no gradient accumulation, gradient checkpointing {dpo.gradient_checkpointing}, {args.steps} steps per "
        "variant; one torch thread per process (OMP_NUM_THREADS=1; Ray gives each 1-CPU worker one thread).",
        "- s/step: mean optimizer-step time from the step clock (forward, backward, optimizer), steps 2.. of each "
        "run; wall: start to published model, Ray start-up, model load, checkpoint and LoRA merge included.",
        "",
        "| variant | workers | pairs/step | s/step | min s/step | pairs/s | wall s | loss step 1 -> last | margin |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['workers']} | {r['pairs_per_step']} | {r['s_per_step']} | {r['s_per_step_min']} | "
            f"{r['pairs_per_s']} | {r['wall_s']} | {r['loss_first']} -> {r['loss_last']} | {r['margin_last']} |"
        )
    lines += [
        "",
        f"Ray Train (1 worker) / plain TRL, s/step: {ray_one['s_per_step'] / plain['s_per_step']:.2f}x "
        "(target <= 1.15x).",
    ]
    if len(rows) > 2:
        lines.append(
            f"Ray Train 2 workers / 1 worker, pairs/s: {rows[2]['pairs_per_s'] / ray_one['pairs_per_s']:.2f}x "
            "(the two processes share the machine's cores with whatever else runs: see the load average)."
        )
    with open(path, "a") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
