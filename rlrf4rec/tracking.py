"""Experiment tracking: a run directory mirrored into MLflow (`rlrf4rec track`, `rlrf4rec run --tracking=mlflow`),
and two runs' tables side by side (`rlrf4rec compare`).

The run directory stays the record: every number here is read back from its stage directories (markers, histories,
tables), so a run tracked after the fact, or tracked twice, shows the same values. `collect` is pure (it reads files
and returns records); `export_mlflow` writes them with MLflow's client, one parent run per export and one nested run
per record: each DPO and SFT fit (its per-step log: loss, reward margins and accuracies, held-out values), each
re-ranker fit (its per-epoch train loss and valid metrics), the rounds (per-round values of the manifest), every arms
table and the test table (per-variant means and 95% intervals), with the report and tables as artifacts. An export
whose content is already in the experiment is not written again. Works with any MLflow tracking URI the client
speaks (a team's tracking server, `http(s)://...`); without one, a local store `<run>/mlruns` (MLflow's file store,
which MLflow 3 keeps in maintenance: `mlflow server --backend-store-uri <run>/mlruns` reads it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from rlrf4rec.core.artifacts import read_marker
from rlrf4rec.core.layout import (
    EVAL_ROWS,
    HISTORY,
    PAIRED,
    PER_USER_PARQUET,
    REPORT_HTML,
    REPORT_MD,
    TABLE_JSON,
    TABLE_MD,
    RunLayout,
)
from rlrf4rec.core.metrics import bootstrap_ci

log = logging.getLogger(__name__)

PARENT_TAG, CONTENT_TAG = "mlflow.parentRunId", "rlrf4rec.content"


@dataclass(frozen=True)
class Record:
    """One MLflow run's worth of a stage: per-step series, end values, files."""

    name: str  # e.g. dpo/round0, recommender/base, evaluate
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> [(step, value)]
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: tuple[Path, ...] = ()


def metric_key(name: str) -> str:
    """An MLflow metric or param key: `ndcg@5` -> `ndcg_at_5`; characters MLflow refuses become `_`."""
    return re.sub(r"[^\w./\- :]", "_", name.replace("@", "_at_"))


def _numbers(d: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict, keys joined with `/` (booleans and non-finite values left out)."""
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_numbers(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[metric_key(key)] = float(v)
    return out


def _history(path: Path, step_key: str) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for i, entry in enumerate(json.loads(path.read_text())):
        step = int(entry.get(step_key, i))
        for k, v in _numbers({k: v for k, v in entry.items() if k not in ("step", "epoch")}).items():
            series.setdefault(k, []).append((step, v))
    return series


def _stats(stage_dir: Path) -> dict[str, float]:
    marker = read_marker(stage_dir)
    return _numbers(marker.get("stats", {})) if marker else {}


def collect(run_dir: Path) -> list[Record]:
    """Every tracked record of a run directory, in a fixed order; only complete stages (those with a marker)."""
    layout = RunLayout(Path(run_dir))
    records: list[Record] = []
    for h in layout.dpo_histories():
        if read_marker(h.parent):
            records.append(Record(f"dpo/{h.parent.name}", _history(h, "step"), _stats(h.parent), (h,)))
    sft_history = layout.sft / HISTORY
    if sft_history.is_file() and read_marker(layout.sft):
        records.append(Record("sft", _history(sft_history, "step"), _stats(layout.sft), (sft_history,)))
    for h in layout.recommender_histories():
        if read_marker(h.parent):
            records.append(Record(f"recommender/{h.parent.name}", _history(h, "epoch"), _stats(h.parent)))
    if layout.manifest.is_file():
        rounds = json.loads(layout.manifest.read_text()).get("rounds", [])
        series: dict[str, list[tuple[int, float]]] = {}
        for r in rounds:
            for k, v in _numbers({k: v for k, v in r.items() if k != "round"}).items():
                series.setdefault(k, []).append((int(r["round"]), v))
        records.append(Record("rounds", series, {}, (layout.manifest,)))
    for arms_dir in layout.arms_tables():
        rows = json.loads((arms_dir / TABLE_JSON).read_text())
        metrics = {metric_key(f"{row['arm']}/{k}"): v for row in rows for k, v in _numbers(row).items()}
        records.append(Record(f"arms/{arms_dir.name}", {}, metrics, (arms_dir / TABLE_MD, arms_dir / TABLE_JSON)))
    table = layout.evaluate / TABLE_JSON
    if table.is_file() and read_marker(layout.evaluate):
        metrics = {}
        for variant, by_metric in json.loads(table.read_text()).items():
            for m, (mean, low, high) in by_metric.items():
                for suffix, v in (
                    ("", mean),
                    ("_ci_low", low),
                    ("_ci_high", high),
                ):  # "x" and "x/.." clash in a file store
                    metrics[metric_key(f"test/{variant}/{m}{suffix}")] = float(v)
        files = tuple(p for f in (TABLE_JSON, PAIRED, EVAL_ROWS) if (p := layout.evaluate / f).is_file())
        records.append(Record("evaluate", {}, metrics, files))
    return records


def flat_params(config: dict) -> dict[str, str]:
    """A config dict as MLflow params: `section.field` -> its value as text."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in flat_params(v).items()})
        else:
            out[k] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return out


def content_digest(records: list[Record], params: dict[str, str]) -> str:
    body = [params] + [[r.name, r.series, r.metrics, [str(p) for p in r.artifacts]] for r in records]
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def local_store_uri(run_dir: Path) -> str:
    return RunLayout(Path(run_dir)).tracking_store.resolve().as_uri()


def export_mlflow(
    run_dir: Path, config: dict, tracking_uri: str | None = None, experiment: str | None = None
) -> tuple[str, str, bool]:
    """Write the run's records to MLflow: (tracking URI, parent run id, whether anything was written)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    run_dir = Path(run_dir).resolve()
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or local_store_uri(run_dir)
    if uri.startswith("file:") or "://" not in uri:  # the file store: MLflow 3 refuses it unless opted in
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=uri)
    name = experiment or config["name"]
    found = client.get_experiment_by_name(name)
    experiment_id = found.experiment_id if found else client.create_experiment(name)
    records, params = collect(run_dir), flat_params(config)
    digest = content_digest(records, params)
    same = client.search_runs([experiment_id], filter_string=f"tags.`{CONTENT_TAG}` = '{digest}'", max_results=1)
    if same:
        log.info("track: this content is already run %s of experiment %s", same[0].info.run_id, name)
        return uri, same[0].info.run_id, False
    now = int(time.time() * 1000)
    parent = client.create_run(
        experiment_id, run_name=config["name"], tags={CONTENT_TAG: digest, "rlrf4rec.run_dir": str(run_dir)}
    ).info.run_id
    _log(client, parent, [Param(metric_key(k), v[:6000]) for k, v in params.items()], [], [])
    layout = RunLayout(run_dir)
    for f in (layout.report / REPORT_MD, layout.report / REPORT_HTML):
        if f.is_file():
            client.log_artifact(parent, str(f))
    for r in records:
        child = client.create_run(experiment_id, run_name=r.name, tags={PARENT_TAG: parent}).info.run_id
        points = [Metric(k, v, now, step) for k, pts in r.series.items() for step, v in pts]
        points += [Metric(k, v, now, 0) for k, v in r.metrics.items()]
        _log(client, child, [], points, [RunTag("rlrf4rec.stage", r.name)])
        for f in r.artifacts:
            client.log_artifact(child, str(f))
        client.set_terminated(child)
    client.set_terminated(parent)
    log.info("track: %d records of %s -> %s, experiment %s, run %s", len(records), run_dir, uri, name, parent)
    return uri, parent, True


def _log(client, run_id: str, params: list, metrics: list, tags: list) -> None:
    """log_batch within MLflow's per-call limits (100 params, 1000 metrics)."""
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    if tags:
        client.log_batch(run_id, tags=tags)


# --------------------------------------------------------------------------------------------------- compare


def compare_runs(run_a: Path, run_b: Path, metric: str = "ndcg@5", num_samples: int = 1000, seed: int = 0) -> str:
    """Two runs' test tables side by side (markdown): each variant's mean [95% CI] in A and in B, and B - A, paired
    over test users where both runs scored the same users (same data split), else unpaired."""
    tables, per_user = [], []
    for run in (run_a, run_b):
        layout = RunLayout(Path(run))
        path = layout.evaluate / TABLE_JSON
        if not path.is_file():
            raise FileNotFoundError(f"{run}: no test table ({path}); run `rlrf4rec run` (or its evaluate stage) first")
        tables.append(json.loads(path.read_text()))
        rows = pq.read_table(layout.evaluate / PER_USER_PARQUET, columns=["variant", "user_id", metric]).to_pylist()
        by: dict[str, dict[str, float]] = {}
        for r in rows:
            by.setdefault(r["variant"], {})[r["user_id"]] = r[metric]
        per_user.append(by)
    variants = list(tables[0]) + [v for v in tables[1] if v not in tables[0]]
    lines = [
        f"{metric} on test users: A = {run_a}, B = {run_b}",
        "",
        f"| variant | A {metric} [95% CI] | B {metric} [95% CI] | B - A [95% CI] | paired over |",
        "|---|---|---|---|---|",
    ]

    def cell(t: dict, v: str) -> str:
        if v not in t or metric not in t[v]:
            return "-"
        mean, low, high = t[v][metric]
        return f"{mean:.4f} [{low:.4f}, {high:.4f}]"

    for v in variants:
        a, b = per_user[0].get(v, {}), per_user[1].get(v, {})
        diff, over = "-", "-"
        if a and b:
            if set(a) == set(b):
                users = sorted(a)
                mean, low, high = bootstrap_ci(np.array([b[u] - a[u] for u in users]), num_samples, seed=seed)
                over = f"{len(users)} users (paired)"
            else:
                mean, low, high = _unpaired_ci(
                    np.array(list(a.values())), np.array(list(b.values())), num_samples, seed
                )
                over = f"{len(a)} vs {len(b)} users (unpaired)"
            diff = f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]"
        lines.append(f"| {v} | {cell(tables[0], v)} | {cell(tables[1], v)} | {diff} | {over} |")
    return "\n".join(lines) + "\n"


def _unpaired_ci(a: np.ndarray, b: np.ndarray, num_samples: int, seed: int) -> tuple[float, float, float]:
    """Mean of b minus mean of a, with a 95% interval from resampling each side's users on its own."""
    rng = np.random.default_rng(seed)
    boots = [rng.choice(b, len(b)).mean() - rng.choice(a, len(a)).mean() for _ in range(num_samples)]
    low, high = np.percentile(boots, [2.5, 97.5])
    return float(b.mean() - a.mean()), float(low), float(high)
