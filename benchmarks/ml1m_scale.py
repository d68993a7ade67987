"""ML-1M scale on this box: the data stage and every re-ranker backbone, timed against ML-100k in the same run.

ML-1M cannot be fetched here, so the script writes a dataset with ML-1M's shape and format (6,040 users, 3,706
movies, 1,000,209 ratings in ratings.dat / movies.dat / users.dat, '::'-separated, latin-1; 20 to 2,314 ratings per
user, heavy-tailed activity and Zipf-like item popularity, ML-1M's rating distribution), seeded. Its ratings are
random, so its ranking metrics mean nothing; only time and memory are measured. The baseline is real ML-100k
(943 users), through the same code in the same run; each ratio is ML-1M-shaped / ML-100k.

Every stage runs in a fresh process (peak RSS is that process's own): the data stage, then for each backbone the
KAR ID-only and the ID + history re-ranker, `--epochs` epochs each, in process, one torch thread per process.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ml1m_scale.py [--epochs 2] [--backbones prm,setrank,dlcm,sasrec]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from common import RESULTS, append_section, load, machine

ML1M = {"users": 6040, "items": 3706, "ratings": 1_000_209, "max_item_id": 3952, "max_user_ratings": 2314}
GENRES = (
    "Action Adventure Animation Children's Comedy Crime Documentary Drama Fantasy Film-Noir Horror Musical Mystery "
    "Romance Sci-Fi Thriller War Western"
).split()


def write_ml1m_shaped(out: Path, seed: int = 2024) -> dict:
    """ratings.dat, movies.dat and users.dat with ML-1M's counts and format; returns the counts written."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    item_ids = np.sort(rng.choice(np.arange(1, ML1M["max_item_id"] + 1), ML1M["items"], replace=False))
    with open(out / "movies.dat", "w", encoding="latin-1") as fh:
        for i in item_ids:
            genres = "|".join(rng.choice(GENRES, size=rng.integers(1, 4), replace=False))
            fh.write(f"{i}::Movie {i} ({rng.integers(1919, 2001)})::{genres}\n")
    # Activity: 20 + a lognormal tail, scaled so the total is exactly ML-1M's 1,000,209 ratings.
    extra = rng.lognormal(mean=4.3, sigma=1.1, size=ML1M["users"])
    counts = 20 + np.floor(extra / extra.sum() * (ML1M["ratings"] - 20 * ML1M["users"])).astype(int)
    counts = np.minimum(counts, ML1M["max_user_ratings"])  # and nobody rates (nearly) every movie
    while (deficit := ML1M["ratings"] - counts.sum()) > 0:
        room = np.flatnonzero(counts < ML1M["max_user_ratings"])
        counts[rng.choice(room, size=min(deficit, len(room)), replace=False)] += 1
    popularity = 1.0 / np.arange(1, ML1M["items"] + 1) ** 0.9
    popularity = rng.permutation(popularity / popularity.sum())
    stars = np.array([1, 2, 3, 4, 5])
    star_p = np.array([0.056, 0.108, 0.261, 0.349, 0.226])
    written = 0
    with open(out / "ratings.dat", "w", encoding="latin-1") as fh:
        for u, n in enumerate(counts, start=1):
            items = rng.choice(item_ids, size=n, replace=False, p=popularity)
            ratings = rng.choice(stars, size=n, p=star_p / star_p.sum())
            times = 956_703_932 + np.sort(rng.integers(0, 90_000_000, size=n))
            fh.write("".join(f"{u}::{i}::{r}::{t}\n" for i, r, t in zip(items, ratings, times)))
            written += n
    with open(out / "users.dat", "w", encoding="latin-1") as fh:
        for u in range(1, ML1M["users"] + 1):
            age = rng.choice([1, 18, 25, 35, 45, 50, 56])
            fh.write(f"{u}::{rng.choice(['F', 'M'])}::{age}::{rng.integers(0, 21)}::{rng.integers(10000, 99999)}\n")
    return {"users": ML1M["users"], "items": ML1M["items"], "ratings": written}


def _config(dataset: str, data_path: str, run_dir: str, overrides: list[str]):
    from rlrf4rec.core.config import load_config

    root = Path(__file__).resolve().parents[1]
    base = [f"--run_dir={run_dir}", "--data.max_train_users=null", f"--data.path={data_path}"]
    if dataset == "ml1m":
        base.append("--data.format=ml-1m")
    return load_config(root / "configs" / "ml100k-cpu.yaml", [*base, *overrides])


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stage_data(dataset: str, data_path: str, run_dir: str) -> dict:
    from rlrf4rec.core.artifacts import read_marker
    from rlrf4rec.stages.data import run_data

    start = time.perf_counter()
    out = run_data(_config(dataset, data_path, run_dir, []))
    stats = read_marker(out)["stats"]
    return {"seconds": time.perf_counter() - start, "peak_mib": _peak_mib(), "stats": stats}


def stage_recommender(dataset: str, data_path: str, run_dir: str, backbone: str, history: bool, epochs: int) -> dict:
    import torch

    from rlrf4rec.core.artifacts import read_tables
    from rlrf4rec.core.recommender import RerankTask, fit, model_spec

    torch.set_num_threads(1)
    cfg = _config(dataset, data_path, run_dir, [f"--recommender.backbone={backbone}"])
    spec = model_spec(cfg.recommender)
    spec = dataclasses.replace(spec, use_history=history, max_epochs=epochs, patience=epochs)
    start = time.perf_counter()
    task = RerankTask(read_tables(Path(run_dir) / "data"), spec)
    build = time.perf_counter() - start
    torch.manual_seed(cfg.seed)
    model = task.build_model(None)
    state = fit(task, model, None, seed=cfg.seed)
    return {
        "build_seconds": build,
        "epoch_seconds": float(np.mean([h["train/seconds"] for h in state.history])),
        "valid_seconds": float(np.mean([h["valid/seconds"] for h in state.history])),
        "train_lists": len(task.splits["train"]),
        "parameters": sum(p.numel() for p in model.parameters()),
        "peak_mib": _peak_mib(),
    }


def in_fresh_process(fn, *args) -> dict:
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="training epochs per re-ranker (timing only)")
    parser.add_argument("--backbones", default="prm,setrank,dlcm,sasrec")
    parser.add_argument("--work", type=Path, default=None, help="where the generated data and runs go (default: tmp)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="ml1m-scale-"))
    load_before = load()
    start = time.perf_counter()
    counts = write_ml1m_shaped(work / "ml-1m-shaped")
    write_seconds = time.perf_counter() - start
    datasets = {"ml100k": ("embedded:ml-100k", str(work / "run-ml100k")),
                "ml1m": (str(work / "ml-1m-shaped"), str(work / "run-ml1m"))}  # fmt: skip
    data = {name: in_fresh_process(stage_data, name, *paths) for name, paths in datasets.items()}
    rows = []
    for backbone in args.backbones.split(","):
        for history in (False, True):
            if backbone == "sasrec" and not history:
                continue  # its user vector is read from the history window
            result = {
                name: in_fresh_process(stage_recommender, name, *paths, backbone, history, args.epochs)
                for name, paths in datasets.items()
            }
            rows.append({"backbone": backbone, "variant": "ID + history" if history else "KAR ID-only", **result})
            print(rows[-1], flush=True)
    report(args, counts, write_seconds, data, rows, load_before)


def report(args, counts: dict, write_seconds: float, data: dict, rows: list[dict], load_before: str) -> None:
    d1, d0 = data["ml1m"], data["ml100k"]
    users = {k: v["stats"] for k, v in data.items()}
    lines = [
        f"- Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ml1m_scale.py --epochs {args.epochs}`.",
        f"- Machine: {machine()}; load average before {load_before}, after {load()}.",
        f"- ML-1M-shaped data, generated (not ML-1M itself, which cannot be fetched here): {counts['users']:,} users, "
        f"{counts['items']:,} movies, {counts['ratings']:,} ratings, written in {write_seconds:.0f} s. Random "
        "ratings: timing and memory only. Baseline: real ML-100k through the same code in the same run.",
        "- Every stage in a fresh process, one torch thread; peak RSS is that process's own.",
        "",
        "| stage | ML-100k s | ML-1M-shaped s | ratio | ML-100k peak MiB | ML-1M-shaped peak MiB |",
        "|---|---|---|---|---|---|",
        f"| data stage (parse, split, lists) | {d0['seconds']:.1f} | {d1['seconds']:.1f} | "
        f"{d1['seconds'] / d0['seconds']:.1f}x | {d0['peak_mib']:.0f} | {d1['peak_mib']:.0f} |",
    ]
    for r in rows:
        a, b = r["ml100k"], r["ml1m"]
        lines.append(
            f"| {r['backbone']} {r['variant']}: one training epoch ({a['train_lists']:,} / {b['train_lists']:,} "
            f"lists) | {a['epoch_seconds']:.1f} | {b['epoch_seconds']:.1f} | "
            f"{b['epoch_seconds'] / a['epoch_seconds']:.1f}x | {a['peak_mib']:.0f} | {b['peak_mib']:.0f} |"
        )
        lines.append(
            f"| {r['backbone']} {r['variant']}: valid evaluation | {a['valid_seconds']:.1f} | {b['valid_seconds']:.1f} "
            f"| {b['valid_seconds'] / a['valid_seconds']:.1f}x | | |"
        )
    lines += ["", f"Data stage stats: ML-100k {_brief(users['ml100k'])}; ML-1M-shaped {_brief(users['ml1m'])}."]
    append_section("ML-1M scale: data stage and re-rankers, ML-1M-shaped vs ML-100k (benchmarks/ml1m_scale.py)",
                   lines, args.results)  # fmt: skip


def _brief(stats: dict) -> str:
    keys = [k for k in stats if k.endswith("users") or k.endswith("rerank_lists") or k == "interactions"]
    return ", ".join(f"{k} {stats[k]:,}" for k in keys if isinstance(stats[k], int))


if __name__ == "__main__":
    main()
