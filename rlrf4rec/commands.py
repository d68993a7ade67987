"""The commands that are not stages: `run` (every stage of pipeline.RUN in order), `verify`, `track`, `compare` and
`serve`. Each reads or drives a run directory; none writes a stage of its own.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rlrf4rec.core.config import ConfigError, RunConfig
from rlrf4rec.core.stage import Option, Stage, on_ray


def _run(cfg: RunConfig, args: argparse.Namespace) -> list[Path]:
    from rlrf4rec.pipeline import run_all

    for name, path in run_all(cfg).items():
        print(f"{name:24s} {path}")
    if args.tracking == "mlflow":
        _track(cfg, args)
    return []


def _track(cfg: RunConfig, args: argparse.Namespace) -> list[Path]:
    """Mirror the run directory's fits, rounds and tables into MLflow (rlrf4rec/tracking.py)."""
    from rlrf4rec.tracking import export_mlflow

    root = cfg.run_path
    if not root.is_dir():
        raise FileNotFoundError(f"{root.resolve()} does not exist; run_dir names no run")
    uri, run_id, written = export_mlflow(root, cfg.to_dict(), args.tracking_uri, args.experiment)
    print(f"mlflow: {'tracked as' if written else 'already tracked as'} run {run_id} in {uri}")
    return []


def _compare(cfg: RunConfig, args: argparse.Namespace) -> list[Path]:
    from rlrf4rec.tracking import compare_runs

    if len(args.runs) != 2:
        raise ConfigError(f"compare takes two run directories, got {len(args.runs)}: rlrf4rec compare RUN_A RUN_B")
    print(compare_runs(args.runs[0], args.runs[1], args.metric), end="")
    return []


def _verify(cfg: RunConfig, args: argparse.Namespace) -> list[Path]:
    """Hash every file of every complete stage of the run against its marker; name each damaged file, exit 2."""
    from rlrf4rec.core.artifacts import damaged_stages

    root = cfg.run_path
    if not root.is_dir():
        raise FileNotFoundError(f"{root.resolve()} does not exist; run_dir names no run")
    stages = damaged_stages(root)
    damaged = [line for lines in stages.values() for line in lines]
    for name, lines in stages.items():
        print(f"{'DAMAGED' if lines else 'ok':7s}  {name}")
        for line in lines:
            print(f"         {line}")
    if damaged:
        raise ValueError(
            f"{len(damaged)} damaged file(s) in {sum(map(bool, stages.values()))} of {len(stages)} stages of "
            f"{root.resolve()}; `rlrf4rec run --config {args.config}` rebuilds them (a stage command, its own)"
        )
    print(f"{len(stages)} stages verified, every file as published")
    return []


def _serve(cfg: RunConfig, args: argparse.Namespace) -> list[Path]:
    from rlrf4rec.serving.launch import serve_run

    serve_run(cfg, args)
    return []


TRACKING_OPTIONS = (
    Option(
        ("--tracking-uri",),
        {"help": "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else a file store <run>/mlruns)"},
    ),
    Option(("--experiment",), {"help": "MLflow experiment (default: the run name)"}),
)

VERIFY = Stage(
    "verify",
    "hash every file of the run's complete stages against their markers; exit 2 naming each damaged file",
    _verify,
)

RUN = Stage(
    "run",
    "run every stage in order",
    _run,
    (
        Option(
            ("--tracking",),
            {"choices": ["none", "mlflow"], "default": "none", "help": "mirror the run into MLflow at the end"},
        ),
        *TRACKING_OPTIONS,
    ),
    on_ray=on_ray,
)

TRACK = Stage(
    "track",
    "mirror a run directory into MLflow: DPO / SFT / re-ranker curves, rounds, arms and test tables, the report",
    _track,
    TRACKING_OPTIONS,
)

COMPARE = Stage(
    "compare",
    "two runs' test tables side by side, with B - A per variant (paired over users when the splits match)",
    _compare,
    (
        Option(("runs",), {"nargs": "*", "type": Path, "metavar": "RUN_DIR", "help": "run directories A and B"}),
        Option(("--metric",), {"default": "ndcg@5", "help": "ndcg@K or map@K, K in 1, 3, 5, 7"}),
    ),
    needs_config=False,
)

SERVE = Stage(
    "serve",
    "serve the run's re-ranker over HTTP on Ray Serve (knowledge path + ID-only fallback)",
    _serve,
    (
        Option(("--version",), {"default": "latest", "help": "'latest', 'base' or 'round<t>'"}),
        Option(
            ("--host",),
            {
                "default": "127.0.0.1",
                "help": "HTTP address, also of the ingress replicas' and HAProxy's ports (0.0.0.0: beyond this "
                "machine); the local cluster stays on 127.0.0.1, but for one gRPC port per Serve replica that "
                "Ray binds to all interfaces",
            },
        ),
        Option(("--port",), {"type": int, "default": 8000}),
        Option(
            ("--ingress",),
            {
                "choices": ["proxy", "haproxy"],
                "default": "proxy",
                "help": "HTTP front of the local cluster: Serve's Python proxy, or HAProxy straight to the ingress "
                "replicas (lower latency; each ingress replica also listens on a port of its own, 30000-31000, "
                "and HAProxy on 8404 and 9101 for its stats and metrics, all on --host)",
            },
        ),
        Option(("--generation",), {"action": "store_true", "help": "generate knowledge for users without it"}),
        Option(
            ("--reranker-gpus",), {"type": float, "default": 0.0, "help": "GPU share per re-ranker replica (0: CPU)"}
        ),
        Option(
            ("--reranker-replicas",),
            {"type": int, "default": 2, "help": "re-ranker replicas (two: one may die without a failed request)"},
        ),
        Option(
            ("--return-text",),
            {
                "action": "store_true",
                "help": "answer with the user's preference text (it repeats the user's profile to the caller); "
                "the bearer token comes from $RLRF4REC_SERVE_TOKEN or the file $RLRF4REC_SERVE_TOKEN_FILE",
            },
        ),
        Option(
            ("--generation-deadline-ms",),
            {"type": float, "default": 2000.0, "help": "how long a request waits for a new text"},
        ),
    ),
)
