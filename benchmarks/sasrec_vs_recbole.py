"""SASRec: rlrf4rec's `train_sasrec_loo` against RecBole 1.2.1's SASRec on MovieLens-100k, same box, one run.

    .venv/bin/python benchmarks/sasrec_vs_recbole.py [--max-epochs N] [--skip-setup] [--threads T] ...

Protocol (both sides): leave-one-out by time per user (last item test, second-to-last valid, the rest train),
full-sort ranking over all items excluding the user's other interacted items (valid: train items; test: train +
valid items), HR@10 / NDCG@10, early stopping on valid NDCG@10, the best-valid model tested once.

- RecBole runs in its own venv (benchmarks/.recbole-venv, made by benchmarks/setup_recbole.sh when missing) in a
  subprocess: benchmarks/recbole_sasrec.py, which documents the RecBole settings and the two RecBole 1.2.1
  behaviours it corrects (import-time anomaly detection, float32 timestamp ties).
- Ours runs in this process on a fresh `data` stage (configs/ml100k-cpu.yaml, run_dir in a temp dir).
- Both read RecBole's own ml-100k atomic files (`embedded:ml-100k`); the script checks that both sides hold out
  the same valid and test item for every user.
- Both sides get the same threads and the same malloc settings: the script re-executes itself with
  MALLOC_MMAP_MAX_=0 / MALLOC_TRIM_THRESHOLD_ (glibc keeps freed memory instead of unmapping it). On this VM a
  fresh 100 MB tensor costs ~0.09 s in page faults, which made RecBole's SASRec steps ~1.6x slower. --plain-malloc
  turns this off.

Prints a side-by-side table and appends a dated section to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from common import append_section, load, machine

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TITLE = "SASRec: rlrf4rec vs RecBole 1.2.1 on ML-100k (leave-one-out, full sort)"
VENV_PY = HERE / ".recbole-venv" / "bin" / "python"
VENV_MARKER = HERE / ".recbole-venv" / ".installed"
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 36)}
METRICS = ["valid/ndcg@10", "valid/hr@10", "test/ndcg@10", "test/hr@10"]


def log(msg: str) -> None:
    print(f"[sasrec_vs_recbole {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--max-epochs", type=int, default=2,
        help="RecBole's epoch cap (2: ~6-7 min on a 2-core box, a smoke run; the reported comparison used 30 with "
        "--threads 2: ~75 min)",
    )
    p.add_argument(
        "--ours-max-epochs", type=int, default=200,
        help="our epoch cap; early stopping on valid usually ends it first (an epoch takes seconds here)",
    )
    p.add_argument("--patience", type=int, default=10, help="stop after this many epochs without improvement")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 1))
    p.add_argument("--config", default=str(ROOT / "configs" / "ml100k-cpu.yaml"), help="config for the data stage")
    p.add_argument("--skip-setup", action="store_true", help="never run setup_recbole.sh; fail if the venv is missing")
    p.add_argument("--skip-recbole", action="store_true")
    p.add_argument("--skip-ours", action="store_true")
    p.add_argument("--raw-timestamps", action="store_true", help="RecBole: keep its float32 timestamp ties")
    p.add_argument("--stock-anomaly-detection", action="store_true", help="RecBole: keep anomaly detection on")
    p.add_argument("--plain-malloc", action="store_true", help="do not re-execute with the malloc settings")
    p.add_argument("--results", type=Path, default=HERE / "RESULTS.md", help="markdown file to append to")
    p.add_argument("--no-results", action="store_true", help="print only; do not append to --results")
    p.add_argument("--json-out", type=Path, help="also write both sides' raw results here")
    args = p.parse_args(argv)
    if args.max_epochs < 1 or args.patience < 1 or args.threads < 1:
        p.error("--max-epochs, --patience and --threads must be >= 1")
    return args


def reexec_with_env(args: argparse.Namespace) -> None:
    """Re-run this script with the thread and malloc environment both sides share (before torch is imported)."""
    want = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if not args.plain_malloc:
        want.update(MALLOC_ENV)
    if all(os.environ.get(k) == v for k, v in want.items()):
        return
    if os.environ.get("SASREC_VS_RECBOLE_REEXEC"):  # never loop
        return
    env = {**os.environ, **want, "SASREC_VS_RECBOLE_REEXEC": "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]], env)


# ------------------------------------------------------------------------------------------------------------- sides


def ensure_recbole_venv(skip_setup: bool) -> float:
    """Run setup_recbole.sh when the venv is missing; returns the seconds it took (0 when already there)."""
    if VENV_MARKER.is_file() and VENV_PY.is_file():
        return 0.0
    if skip_setup:
        raise SystemExit(f"--skip-setup given but {VENV_MARKER} is missing; run bash benchmarks/setup_recbole.sh")
    log("creating the RecBole venv (benchmarks/setup_recbole.sh)")
    start = time.perf_counter()
    subprocess.run(["bash", str(HERE / "setup_recbole.sh")], check=True, stdout=sys.stderr)
    return time.perf_counter() - start


def run_recbole(args: argparse.Namespace, dataset_dir: Path, work: Path) -> dict:
    splits = work / "recbole_splits.json"
    cmd = [
        str(VENV_PY), str(HERE / "recbole_sasrec.py"),
        "--data-dir", str(dataset_dir),
        "--max-epochs", str(args.max_epochs),
        "--patience", str(args.patience),
        "--seed", str(args.seed),
        "--threads", str(args.threads),
        "--splits-out", str(splits),
    ]  # fmt: skip
    if args.raw_timestamps:
        cmd.append("--raw-timestamps")
    if args.stock_anomaly_detection:
        cmd.append("--stock-anomaly-detection")
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}
    env.pop("PYTHONPATH", None)
    stderr_log = work / "recbole_stderr.log"
    log(f"RecBole: {' '.join(cmd[1:])}")
    start = time.perf_counter()
    with open(stderr_log, "w") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=work)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = stderr_log.read_text()[-4000:]
        raise RuntimeError(f"recbole_sasrec.py exited {proc.returncode}; stderr tail:\n{tail}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"recbole_sasrec.py printed no JSON line; stdout:\n{proc.stdout[-2000:]}")
    out = json.loads(lines[-1])
    out["wall_seconds"] = wall
    out["splits"] = json.loads(splits.read_text())
    return out


def run_ours(args: argparse.Namespace, data_dir: Path) -> dict:
    import torch

    from rlrf4rec.core.artifacts import read_tables
    from rlrf4rec.core.recommender import train_sasrec_loo

    torch.set_num_threads(args.threads)
    log(f"ours: train_sasrec_loo({data_dir}, max_epochs={args.ours_max_epochs}, patience={args.patience}, "
        f"seed={args.seed})")
    start = time.perf_counter()
    tables = read_tables(data_dir)
    out = dict(train_sasrec_loo(tables, max_epochs=args.ours_max_epochs, patience=args.patience, seed=args.seed))
    out["wall_seconds"] = time.perf_counter() - start
    return out


def make_data_stage(config: str, run_dir: Path) -> tuple[Path, float]:
    from rlrf4rec.core.config import load_config
    from rlrf4rec.stages.data import run_data

    start = time.perf_counter()
    cfg = load_config(config, [f"run_dir={run_dir}"])
    return run_data(cfg), time.perf_counter() - start


def compare_splits(recbole_splits: dict, data_dir: Path) -> dict:
    """How many users hold out a different valid or test item on the two sides."""
    import pyarrow.parquet as pq

    loo = pq.read_table(data_dir / "leave_one_out.parquet").to_pylist()
    ours = {str(r["user_id"]): [str(r["valid_item_id"]), str(r["test_item_id"])] for r in loo}
    differ = sorted(u for u in ours.keys() | recbole_splits.keys() if ours.get(u) != recbole_splits.get(u))
    return {"users_ours": len(ours), "users_recbole": len(recbole_splits), "users_differ": len(differ),
            "examples": differ[:10]}  # fmt: skip


# ------------------------------------------------------------------------------------------------------------ report


def git_state() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        return sha + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _num(x, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _ratio(ours, theirs) -> str:
    if ours is None or theirs is None or not theirs:
        return "-"
    return f"{ours / theirs:.3f}"


def rows(recbole: dict | None, ours: dict | None) -> list[tuple[str, str, str, str]]:
    def get(side, key):
        return None if side is None else side.get(key)

    def total(side):
        return None if side is None else side["seconds_per_epoch"] * side["epochs_run"]

    def to_best(side):
        return None if side is None or side.get("best_epoch") is None else int(side["best_epoch"]) + 1

    table = []
    for label, key, digits, with_ratio in [
        ("train seconds per epoch (eval excluded)", "seconds_per_epoch", 2, True),
        ("valid eval seconds per epoch", "eval_seconds_per_epoch", 2, True),
    ]:
        a, b = get(recbole, key), get(ours, key)
        table.append((label, _num(a, digits), _num(b, digits), _ratio(b, a) if with_ratio else ""))
    table.append(("epochs run", _num(get(recbole, "epochs_run")), _num(get(ours, "epochs_run")), ""))
    table.append(("epochs to best valid", _num(to_best(recbole)), _num(to_best(ours)), ""))
    a, b = total(recbole), total(ours)
    table.append(("total train seconds (sum over epochs)", _num(a, 1), _num(b, 1), _ratio(b, a)))
    a, b = get(recbole, "wall_seconds"), get(ours, "wall_seconds")
    table.append(("wall seconds (load, train, eval, test)", _num(a, 1), _num(b, 1), _ratio(b, a)))
    for key in METRICS:
        a, b = get(recbole, key), get(ours, key)
        ratio = _ratio(b, a) if key.endswith("ndcg@10") else ""
        table.append((f"{key.replace('/', ' ').replace('ndcg', 'NDCG').replace('hr', 'HR')}", _num(a), _num(b), ratio))
    return table


def markdown_table(table) -> list[str]:
    out = ["| | RecBole 1.2.1 SASRec | rlrf4rec SASRec | ours / RecBole |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in table]
    return out


def _settings_line(settings: dict | None) -> str:
    if not settings:
        return "-"
    return ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in settings.items())


def _setup_text(args, setup_s: float) -> str:
    if args.skip_recbole:
        return "not used (--skip-recbole)"
    return f"created in {setup_s:.0f} s" if setup_s else "already present"


def report(args, facts, load_before, load_after, torch_version, setup_s, data_s, recbole, ours, notes) -> list[str]:
    rb_set = (recbole or {}).get("settings", {})
    lines = [
        f"- Machine: {facts}; load average before {load_before}, after {load_after}.",
        f"- torch: project venv {torch_version}, RecBole venv {rb_set.get('torch', '-')}; RecBole "
        f"{rb_set.get('recbole', '-')}, numpy {rb_set.get('numpy', '-')} there. rlrf4rec at {git_state()}.",
        f"- Run: `{' '.join(['benchmarks/sasrec_vs_recbole.py', *sys.argv[1:]])}`; threads {args.threads} "
        f"(OMP_NUM_THREADS, torch.set_num_threads) on both sides; malloc "
        f"{'default' if args.plain_malloc else ', '.join(f'{k}={v}' for k, v in MALLOC_ENV.items())} on both sides.",
        f"- Protocol: max epochs {args.max_epochs} (RecBole) / {args.ours_max_epochs} (ours), "
        f"stop after {args.patience} epochs without valid NDCG@10 "
        f"improvement, seed {args.seed}; leave-one-out by time, full-sort ranking excluding the user's other "
        "interacted items, HR@10 / NDCG@10, best-valid model tested once.",
        f"- Setup: RecBole venv {_setup_text(args, setup_s)}; data stage {_num(data_s, 1)} s.",
        "",
        *markdown_table(rows(recbole, ours)),
        "",
    ]
    if recbole:
        lines += [
            f"- RecBole, unmasked (its stock sequential full-sort: history items stay ranked) with the same best "
            f"model: valid NDCG@10 {_num(recbole.get('native/valid/ndcg@10'))} / HR@10 "
            f"{_num(recbole.get('native/valid/hr@10'))}, test NDCG@10 {_num(recbole.get('native/test/ndcg@10'))} "
            f"/ HR@10 {_num(recbole.get('native/test/hr@10'))}.",
            f"- RecBole per-epoch valid NDCG@10: {recbole.get('valid_ndcg@10_per_epoch')}; train seconds per epoch: "
            f"{recbole.get('train_seconds_per_epoch')}.",
            f"- RecBole settings: {_settings_line(rb_set)}.",
        ]
    if ours:
        lines.append(f"- rlrf4rec settings: {_settings_line(ours.get('settings'))}.")
    lines += [f"- Note: {n}" for n in notes]
    return lines


# -------------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reexec_with_env(args)
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    import torch

    from rlrf4rec.core import assets

    facts, load_before = machine(), load()
    notes: list[str] = []
    recbole = ours = None
    failed = False
    setup_s = 0.0 if args.skip_recbole else ensure_recbole_venv(args.skip_setup)
    dataset_dir = Path(assets.resolve("embedded:ml-100k", assets.asset_home()))
    log(f"dataset: {dataset_dir}")

    with tempfile.TemporaryDirectory(prefix="sasrec-vs-recbole-") as tmp:
        work = Path(tmp)
        data_dir, data_s = make_data_stage(args.config, work / "run")
        log(f"data stage: {data_dir} ({data_s:.1f} s)")

        if not args.skip_recbole:
            recbole = run_recbole(args, dataset_dir, work)
            log(f"RecBole done in {recbole['wall_seconds']:.0f} s")
            check = compare_splits(recbole.pop("splits"), data_dir)
            if check["users_differ"]:
                notes.append(
                    f"the two sides hold out different valid/test items for {check['users_differ']} of "
                    f"{check['users_ours']} users (e.g. {check['examples']}): metrics are not strictly comparable."
                )
            else:
                notes.append(f"both sides hold out the same valid and test item for all {check['users_ours']} users.")

        if args.skip_ours:
            notes.append("rlrf4rec side skipped (--skip-ours).")
        else:
            try:
                ours = run_ours(args, data_dir)
                log(f"ours done in {ours['wall_seconds']:.0f} s")
            except ImportError as exc:
                notes.append(f"rlrf4rec side not run: `from rlrf4rec.core.recommender import train_sasrec_loo` failed "
                             f"({exc}); RecBole's side alone.")  # fmt: skip
                log(notes[-1])
            except Exception as exc:  # the RecBole numbers are still worth recording
                failed = True
                traceback.print_exc()
                notes.append(f"rlrf4rec side failed: {type(exc).__name__}: {exc}")

    if recbole:
        notes.append(
            f"an epoch is not the same work on the two sides: RecBole trains on {rb_rows(recbole)} augmented prefix "
            "rows (one per target item, each a left-aligned sequence of up to 50 previous items, loss on the last "
            "position only); compare time per epoch with that in mind."
        )
    for name, side in [("RecBole", recbole), ("rlrf4rec", ours)]:
        if side and side.get("best_epoch") is not None and int(side["best_epoch"]) + 1 == side.get("epochs_run"):
            stopped = "at the epoch cap" if side.get("epochs_run") == args.max_epochs else "early"
            notes.append(f"{name}: the best valid epoch is the last one run (stopped {stopped}): not converged.")
    lines = report(args, facts, load_before, load(), torch.__version__, setup_s, data_s, recbole, ours, notes)
    if args.no_results:
        print("\n".join(lines))
    else:
        append_section(TITLE, lines, args.results)
        log(f"appended to {args.results}")
    if args.json_out:
        args.json_out.write_text(json.dumps({"recbole": recbole, "ours": ours, "notes": notes}, indent=1, default=str))
    return 1 if failed else 0


def rb_rows(recbole: dict) -> str:
    n = recbole.get("settings", {}).get("train_rows")
    return f"{n:,}" if isinstance(n, int) else "?"


if __name__ == "__main__":
    sys.exit(main())
