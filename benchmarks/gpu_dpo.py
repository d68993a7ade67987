"""The DPO stage on one CUDA GPU in one process (no Ray): DeepSpeed ZeRO-2 and ZeRO-3 against plain bf16 training.

    python benchmarks/gpu_dpo.py --pairs runs/demo/rounds/round0/pairs/pairs_train.parquet,... [--shapes 135m,1.7b]

Each variant runs `rlrf4rec.stages.dpo.run_dpo(on_ray=False)` (the stage itself: pairs split and length filter,
TRL's DPOTrainer with the shared-prompt collator and precomputed reference log-probs, export of the policy) with the
`dpo` section of configs/ml1m-gpu.yaml (full fine-tune, bf16, gradient checkpointing), in a fresh process per
variant so that no DeepSpeed state carries over. Sizes: `--steps` optimizer steps of per_device_batch_size x
grad_accum pairs, one GPU (world size 1).

The policies are SmolLM2's architecture at two sizes (the embedded 135M-Instruct's config and tokenizer, and the
1.7B's shape) with seeded random weights: the timings and memory are those of the real models, the losses only show
that the optimizer moves the policy (chosen log-ratio up, rejected down), not what a real policy learns.

Prints one table (s/pair and peak GPU memory, each variant against plain bf16 of the same shape in this run) and
appends it to --results as a dated section.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, append_section, load, machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GPU_CONFIG = ROOT / "configs" / "ml1m-gpu.yaml"
# SmolLM2-1.7B's published shape; the 135M shape is the embedded model's own config.json.
SHAPES = {
    "135m": {},
    "1.7b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": 64,
        "rope_parameters": {"rope_theta": 130000.0, "rope_type": "default"},
    },
}
POLICY_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def random_policy(tokenizer_dir: Path, shape: str, out: Path) -> int:
    """A HF model directory: the tokenizer and chat template of `tokenizer_dir`, SmolLM2's config resized to
    `shape`, seeded random bf16 weights. Returns the parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    for name in POLICY_FILES:
        shutil.copy(tokenizer_dir / name, out / name)
    config = AutoConfig.from_pretrained(tokenizer_dir)
    for key, value in SHAPES[shape].items():
        setattr(config, key, value)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def run_config(work: Path, variant: str, args: argparse.Namespace):
    import torch

    from rlrf4rec.core.config import RunConfig, from_dict

    raw = yaml.safe_load(GPU_CONFIG.read_text())
    raw.update(name=f"gpu-dpo-{variant}", run_dir=str(work / f"run-{variant}"))
    raw["assets"]["home"] = str(work / "assets")
    stage = variant.split(":")[1]
    raw["dpo"].update(
        deepspeed=None if stage == "plain" else stage,
        num_workers=1,
        max_steps=args.steps,
        save_steps=args.steps,
        per_device_batch_size=args.batch,
        grad_accum=args.grad_accum,
        use_gpu=torch.cuda.is_available(),  # a CPU box runs the same code (slowly): a check of the script itself
        bf16=torch.cuda.is_available(),
    )
    return from_dict(RunConfig, raw)


def one(variant: str, args: argparse.Namespace) -> dict:
    """Runs in its own process: the DPO stage for `variant` ("<shape>:<plain|zero2|zero3>")."""
    import pyarrow as pa
    import torch

    from rlrf4rec.core import schema as S
    from rlrf4rec.core.artifacts import read_parquet, write_parquet
    from rlrf4rec.stages.dpo import run_dpo

    # World size 1 without a launcher: DeepSpeed reads these instead of probing for MPI.
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    work = Path(args.work)
    cfg = run_config(work, variant, args)
    pairs = pa.concat_tables([read_parquet(Path(p), S.PAIRS) for p in args.pairs.split(",")])
    pairs_path = work / "pairs.parquet"
    if not pairs_path.is_file():
        write_parquet(pairs, pairs_path, S.PAIRS)
    policy = work / f"policy-{variant.split(':')[0]}"
    started = time.perf_counter()
    stage_dir = run_dpo(cfg, pairs_path, policy, "bench", force=True, on_ray=False)
    wall = time.perf_counter() - started
    stats = json.loads((stage_dir / "metrics.json").read_text())
    return {
        "variant": variant,
        "wall_s": wall,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0,
        **{k: v for k, v in stats.items() if isinstance(v, (int, float, bool))},
    }


def table(results: list[dict], params: dict, args: argparse.Namespace) -> list[str]:
    pairs_per_step = args.batch * args.grad_accum
    plain = {r["variant"].split(":")[0]: r for r in results if r["variant"].endswith(":plain") and "error" not in r}
    lines = [
        "| variant | parameters | s/step | s/pair | vs plain bf16 | ref pre-pass s | stage wall s | peak GPU GiB "
        "| train loss first -> last | chosen-rejected margin last | held-out loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        shape, stage = r["variant"].split(":")
        if "error" in r:
            lines.append(f"| {shape} {stage} | {params[shape] / 1e6:,.0f}M | failed: {r['error']} |" + " |" * 8)
            continue
        step = r.get("train/step_time_s", float("nan"))
        base = plain.get(shape, {}).get("train/step_time_s")
        ratio = f"{step / base:.2f}x" if base else "n/a"
        lines.append(
            f"| {shape} {stage} | {params[shape] / 1e6:,.0f}M | {step:.3f} | {step / pairs_per_step:.4f} | {ratio} "
            f"| {r.get('train/ref_precompute_s', float('nan')):.1f} | {r['wall_s']:.1f} | {r['peak_gib']:.1f} "
            f"| {r.get('train/dpo_loss_first', float('nan')):.4f} -> {r.get('train/dpo_loss_last', float('nan')):.4f} "
            f"| {r.get('train/rewards/margins_last', float('nan')):+.4f} | {r.get('eval/dpo_loss', float('nan')):.4f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", required=True, help="comma-separated pairs Parquet files (schema.PAIRS)")
    parser.add_argument("--tokenizer", default=str(Path.home() / ".cache/rlrf4rec/models/smollm2-135m-instruct"))
    parser.add_argument("--shapes", default="135m,1.7b")
    parser.add_argument("--stages", default="plain,zero2,zero3")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2, help="pairs per device per micro-step (the GPU config's)")
    parser.add_argument("--grad-accum", type=int, default=8)
    parser.add_argument("--work", default="/tmp/rlrf4rec-gpu-dpo")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--limit-s", type=int, default=300, help="each variant is killed after this many seconds")
    parser.add_argument("--jsonl", help="also append each variant's result to this file as it finishes")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=29500, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        Path(args.out).write_text(json.dumps(one(args.one, args)))
        return

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    before = load()
    params = {}
    for shape in args.shapes.split(","):
        started = time.perf_counter()
        params[shape] = random_policy(Path(args.tokenizer), shape, work / f"policy-{shape}")
        print(f"policy {shape}: {params[shape]:,} parameters, written in {time.perf_counter() - started:.1f} s")
    results = []
    for i, variant in enumerate(f"{s}:{t}" for s in args.shapes.split(",") for t in args.stages.split(",")):
        out = work / f"result-{i}.json"
        command = [sys.executable, __file__, *sys.argv[1:], "--one", variant, "--port", str(29500 + i)]
        command += ["--out", str(out)]
        print("running", variant, flush=True)
        try:
            done = subprocess.run(
                command,
                timeout=args.limit_s,
                env={
                    **os.environ,
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                },
            )
            failed = None if done.returncode == 0 else f"exit status {done.returncode}"
        except subprocess.TimeoutExpired:
            failed = f"killed after {args.limit_s} s"
        results.append(json.loads(out.read_text()) if failed is None else {"variant": variant, "error": failed})
        print(json.dumps(results[-1]), flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as fh:
                fh.write(json.dumps({**results[-1], "parameters": params[variant.split(":")[0]]}) + "\n")

    import torch

    versions = {}
    for name in ("torch", "transformers", "trl", "deepspeed", "peft", "accelerate"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "missing"
    lines = [
        f"- Machine: {machine()}; CUDA {torch.version.cuda}; "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f"; load average before {before}, after {load()}.",
        f"- Work: {sum(1 for _ in args.pairs.split(','))} pairs file(s) of the CPU demo's ML-100k pairs (SmolLM2 chat "
        f"prompts of 10 history entries), {args.steps} optimizer steps of {args.batch} x {args.grad_accum} pairs, "
        "one GPU, `run_dpo(on_ray=False)` with configs/ml1m-gpu.yaml's dpo section (full fine-tune, bf16, "
        "gradient checkpointing, shared prompt, precomputed reference). Seeded random weights in SmolLM2's "
        "architecture (losses show the optimizer at work, not learning of a real policy).",
        "- s/step: mean optimizer-step time after the first; s/pair = s/step / pairs per step.",
        "",
        *table(results, params, args),
    ]
    append_section(
        "DPO stage on one GPU: DeepSpeed ZeRO-2 / ZeRO-3 vs plain bf16 (benchmarks/gpu_dpo.py)",
        lines,
        Path(args.results),
    )
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
