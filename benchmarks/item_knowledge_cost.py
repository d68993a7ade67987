"""The cost of LLM item knowledge (knowledge.item: llm): one greedy text per item through the generation stage's
Ray Data + vLLM path, on two item counts, fitted as start-up + seconds per item, projected to every item.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/item_knowledge_cost.py [--sizes 24,96] [--config ...]

The baseline is the same run's smaller size (the engine start-up it pays once). The texts are those
`rlrf4rec encode` caches in `<asset home>/cache/item-texts/` for knowledge.item = llm (same prompts, same greedy
settings); here they go to a scratch directory, so no cache is written or reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import pyarrow.compute as pc
from common import RESULTS, append_section, load, machine

from rlrf4rec.core import assets
from rlrf4rec.core import engines as E
from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import Fingerprint, read_marker, read_parquet
from rlrf4rec.core.config import load_config
from rlrf4rec.stages import generate as G
from rlrf4rec.stages.data import run_data

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/ml100k-cpu.yaml"))
    parser.add_argument("--sizes", default="24,96", help="two item counts (the first items by id)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="item-cost-"))
    cfg = load_config(args.config, [f"--run_dir={scratch / 'run'}"])
    items = read_parquet(run_data(cfg) / "items.parquet", S.ITEMS)
    model_path = assets.resolve(cfg.models.llm, assets.asset_home(cfg.assets.home))
    greedy = dataclasses.replace(cfg.generate, num_samples=1, temperature=0.0, max_users=None)
    all_requests = G.item_requests(items, E.chat_renderer(model_path), greedy.domain)
    sizes = sorted(int(x) for x in args.sizes.split(","))
    load_before = load()

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    rows = []
    for n in sizes:
        requests = all_requests.slice(0, n)
        started = time.perf_counter()
        stage = G.generate_requests(
            greedy, requests, scratch / f"items-{n}",
            fingerprint=Fingerprint("item texts", extra={"items": n}, prefix=f"bench{n}"),
            model=(cfg.models.llm, model_path), policy_version="items", config_dump="",
        )  # fmt: skip
        seconds = time.perf_counter() - started
        gens = read_parquet(stage / "generations.parquet", S.GENERATIONS)
        tokens = pc.sum(gens.column(S.COMPLETION_TOKENS)).as_py()
        stats = read_marker(stage)["stats"]
        rows.append(
            {
                "items": n,
                "seconds": seconds,
                "tokens": tokens,
                "errors": stats["errors"],
                "prompt_tokens_mean": pc.mean(gens.column(S.PROMPT_TOKENS)).as_py(),
                "truncated": stats.get("flag/truncated", 0),
                "off_topic": stats.get("flag/off_topic", 0),
            }
        )
        print(rows[-1], flush=True)
    ray.shutdown()
    small, large = rows[0], rows[-1]
    per_item = (large["seconds"] - small["seconds"]) / (large["items"] - small["items"])
    startup = small["seconds"] - per_item * small["items"]
    total = items.num_rows
    lines = [
        f"- Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/item_knowledge_cost.py --sizes {args.sizes}` "
        f"({Path(args.config).name}: {greedy.dtype}, {greedy.max_new_tokens} new tokens, greedy, engine "
        f"{greedy.engine}, {greedy.concurrency} replica).",
        f"- Machine: {machine()}; load average before {load_before}, after {load()}.",
        "- Wall time of the generation stage (Ray Data + vLLM, engine start included), the first items by id.",
        "",
        "| items | seconds | completion tokens | tokens/s | prompt tokens (mean) | truncated | off topic | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['items']} | {r['seconds']:.0f} | {r['tokens']} | {r['tokens'] / r['seconds']:.1f} | "
            f"{r['prompt_tokens_mean']:.0f} | {r['truncated']} | {r['off_topic']} | {r['errors']} |"
        )
    lines += [
        "",
        f"Fit: {startup:.0f} s once (start-up) + {per_item:.2f} s per item, so all {total:,} items of the dataset "
        f"take about {(startup + per_item * total) / 60:.0f} min once, after which every round and run reuses the "
        f"cache ({large['seconds'] / small['seconds']:.2f}x the time for {large['items'] / small['items']:.0f}x "
        "the items).",
    ]
    append_section("LLM item knowledge: cost per item and projected (benchmarks/item_knowledge_cost.py)",
                   lines, args.results)  # fmt: skip


if __name__ == "__main__":
    main()
