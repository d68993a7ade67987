"""Generation replicas: the same requests through `run_on_ray` with 1 and with 2 vLLM replicas (Ray Data actors).

    .venv/bin/python benchmarks/replica_scaling.py [--users 16] [--samples 4] [--max-new-tokens 64]
                                                   [--cluster local|two-nodes]

On a CPU box the replicas split its cores (1 replica x all cores vs 2 replicas x half each: what
`generate.concurrency` does with `generate.cpus_per_replica: null`). With `--cluster two-nodes` the same runs go to a
2-node local Ray cluster (ray.cluster_utils: a head and a worker node, 1 CPU each, on this machine): 1 replica gets
one node's CPU, 2 replicas get one node each, and the table says which nodes the engines ran on.
Reports rows/s and completion tokens/s end to end (engine start included) and inside the engines, the ratio of 2
replicas to 1, and whether the texts are the same (each row has its own seed, so they must be, in float32). Appends
a dated section to RESULTS.md with the projection for k GPU replicas and what bounds it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import tempfile
import time
from functools import partial
from pathlib import Path

import pyarrow as pa
from common import RESULTS, append_section, load, machine
from generation import TimedEngine, _summary, _texts, add_request_arguments, request_config, train_requests

from rlrf4rec.core import assets
from rlrf4rec.core import engines as E
from rlrf4rec.core.config import load_config
from rlrf4rec.stages import generate as G

log = logging.getLogger("benchmark")


class NodeTimedEngine(TimedEngine):
    """TimedEngine that also records the Ray node its replica runs on."""

    def __init__(self, make_engine, timings: str):
        super().__init__(make_engine, timings)
        import ray

        self._record({"node": ray.get_runtime_context().get_node_id()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_request_arguments(parser, users=16, max_new_tokens=64, batch_size=16)
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--cluster", choices=["local", "two-nodes"], default="local")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    run_cfg = load_config(args.config)
    model = assets.resolve(run_cfg.models.llm, assets.asset_home(run_cfg.assets.home))
    base = request_config(run_cfg.generate, args)
    requests = train_requests(run_cfg, base, model)
    scratch = Path(tempfile.mkdtemp(prefix="rlrf4rec-replicas-"))
    before = load()
    import ray

    rows, texts = [], {}
    for replicas in (1, 2):
        cfg = dataclasses.replace(base, concurrency=replicas)
        cluster = None
        if args.cluster == "two-nodes":
            from ray.cluster_utils import Cluster

            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
            cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False)
        else:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        timings = scratch / f"replicas-{replicas}.jsonl"
        started = time.perf_counter()
        out = pa.concat_tables(list(G.run_on_ray(requests, partial(NodeTimedEngine, partial(E.VLLMEngine, model, cfg),
                                                                   str(timings)), cfg)))  # fmt: skip
        wall = time.perf_counter() - started
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        summary = _summary(f"{replicas} replica(s)", timings, wall, out.num_rows)
        entries = [json.loads(line) for line in timings.read_text().splitlines()]
        summary["nodes"] = len({e["node"] for e in entries if "node" in e})
        # Engines run side by side: their generate seconds add up, so tokens/s inside them is per replica.
        summary["rows_per_s"] = round(out.num_rows / wall, 2)
        rows.append(summary)
        texts[replicas] = _texts(out)
        log.info("%s", summary)

    shared = sorted(set(texts[1]) & set(texts[2]))
    same = sum(texts[1][k] == texts[2][k] for k in shared)
    one, two = rows
    lines = [
        f"- Machine: {machine()}; load average before {before}, after {load()}.",
        f"- Work: {requests.num_rows} requests ({args.users} train users x {args.samples} samples, "
        f"{args.max_new_tokens} new tokens, {base.dtype}), `generate.batch_size` {args.batch_size}, "
        "`rlrf4rec.stages.generate.run_on_ray` with the config's vLLM-CPU settings; "
        + (
            f"replicas split the cores ({os.cpu_count()} here)."
            if args.cluster == "local"
            else "a 2-node local Ray cluster on this machine (head + worker node, 1 CPU each): a replica per node."
        )
        + " Wall time includes each replica's engine start.",
        "",
        "| replicas | nodes used | rows | wall s | rows/s end to end | engine load s (sum) "
        "| completion tokens/s per replica | completion tokens/s end to end | vs 1 replica, end to end |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["tokens_per_s_end_to_end"] / one["tokens_per_s_end_to_end"]
        lines.append(
            f"| {r['engine']} | {r['nodes']} | {r['rows']} | {r['wall_s']} | {r['rows_per_s']} | {r['load_s']} "
            f"| {r['tokens_per_s']} "
            f"| {r['tokens_per_s_end_to_end']} | {ratio:.2f}x |"
        )
    lines += [
        "",
        f"- Texts equal between the two runs: {same}/{len(shared)} (seeded rows, independent of which replica and "
        "batch they land in).",
        "- Projection for k GPU replicas (arithmetic, not measured here): each replica holds its own GPU and engine, "
        "and Ray Data hands batches to whichever is free, so rows/s scale with k until the users run out (the last "
        "batches leave replicas idle: with U users x N samples and batch B, at most U*N/B replicas are ever busy) or "
        "the driver's streaming executor and the Parquet writes become the limit; each replica's start (model load, "
        "CUDA graphs) is paid once per replica.",
    ]
    append_section(
        "generation replicas: 1 vs 2 vLLM replicas on Ray Data"
        + (", 2-node local cluster" if args.cluster == "two-nodes" else "")
        + " (benchmarks/replica_scaling.py)",
        lines,
        Path(args.results),
    )


if __name__ == "__main__":
    main()
