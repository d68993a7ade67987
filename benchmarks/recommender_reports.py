"""What a re-ranker fit costs with a report to Ray Train every epoch vs every K epochs, on the same ML-100k data.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recommender_reports.py [--every 5] [--repeats 2]

The baseline is `recommender.checkpoint_every: 1` (a report with a checkpoint after every epoch), measured in the
same run, interleaved with the candidate. The variant trained is the ID + history re-ranker ("id": no knowledge, so
nothing but the data stage is needed); both settings must give the same per-epoch history, which is checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import RESULTS, append_section, load, machine

from rlrf4rec.core.artifacts import read_marker
from rlrf4rec.core.config import load_config
from rlrf4rec.stages.data import run_data
from rlrf4rec.stages.train import run_recommender

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/ml100k-cpu.yaml"))
    parser.add_argument("--every", type=int, default=5, help="the candidate's checkpoint_every")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="recommender-reports-"))
    cfg = load_config(args.config, [f"--run_dir={scratch / 'run'}"])
    data_dir = run_data(cfg)
    load_before = load()

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    seconds: dict[int, list[float]] = {1: [], args.every: []}
    histories: dict[int, list] = {}
    epochs: dict[int, int] = {}
    for repeat in range(args.repeats):
        for every in seconds:
            run = dataclasses.replace(cfg, recommender=dataclasses.replace(cfg.recommender, checkpoint_every=every))
            started = time.perf_counter()
            stage = run_recommender(run, "id", data_dir, None, force=True)
            seconds[every].append(time.perf_counter() - started)
            history = json.loads((stage / "history.json").read_text())
            histories.setdefault(every, [h["train/loss"] for h in history])
            epochs[every] = read_marker(stage)["stats"]["epochs_run"]
            print(f"repeat {repeat}: checkpoint_every={every}: {seconds[every][-1]:.1f} s, {epochs[every]} epochs")
    ray.shutdown()
    same = histories[1] == histories[args.every]
    base = statistics.median(seconds[1])
    rows = [
        f"| {every} | {epochs[every]} | {statistics.median(s):.1f} (runs: {', '.join(f'{x:.1f}' for x in s)}) "
        f"| {base / statistics.median(s):.2f}x |"
        for every, s in seconds.items()
    ]
    append_section(
        "re-ranker fits: a report to Ray Train every epoch vs every K epochs (benchmarks/recommender_reports.py)",
        [
            f"- Machine: {machine()}; load average before {load_before}, after {load()}.",
            f"- Work: the `id` re-ranker (ID + history) of {Path(args.config).name} on real ML-100k, "
            f"{cfg.recommender.num_workers} Ray Train workers, max {cfg.recommender.max_epochs} epochs, patience "
            f"{cfg.recommender.patience}; each fit from scratch (force), the settings interleaved, {args.repeats} "
            "repeats; wall time of `run_recommender` (Ray Train start, fit, final valid pass, stage output).",
            "",
            "| checkpoint_every | epochs | wall s, median | speed vs every epoch |",
            "|---|---|---|---|",
            *rows,
            "",
            f"- Per-epoch training losses identical between the two: {'yes' if same else 'NO'}.",
        ],
        args.results,
    )


if __name__ == "__main__":
    main()
