"""Tracking and comparing runs: a run directory mirrored into MLflow reads back with MLflow's own client, value for
value; a second export of the same content writes nothing; `compare` pairs two runs' test users."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from rlrf4rec.cli import main
from rlrf4rec.core.artifacts import stage_output, write_json, write_parquet
from rlrf4rec.core.config import RunConfig, from_dict
from rlrf4rec.core.layout import HISTORY, PER_USER_PARQUET, TABLE_JSON, RunLayout
from rlrf4rec.tracking import collect, compare_runs, export_mlflow, metric_key

mlflow = pytest.importorskip("mlflow")

DPO_LOG = [
    {"step": 1, "epoch": 0.5, "train/dpo_loss": 0.6931, "train/rewards/margins": 0.0},
    {"step": 2, "epoch": 1.0, "train/dpo_loss": 0.6012, "train/rewards/margins": 0.31, "eval/rewards/accuracies": 0.75},
]
EPOCHS = [{"epoch": 0, "train/loss": 0.9, "valid/ndcg@5": 0.55}, {"epoch": 1, "train/loss": 0.7, "valid/ndcg@5": 0.6}]


def fake_run(root: Path, users: list[str], shift: float = 0.0) -> RunLayout:
    """A run directory with what tracking reads: a DPO fit's log, a re-ranker's epochs, the rounds manifest, the
    test table and its per-user values (base LLM = popularity + shift + 0.01 per user index)."""
    layout = RunLayout(root)
    with stage_output(layout.dpo("round0"), "f", None) as (tmp, stats):
        write_json(DPO_LOG, tmp / HISTORY)
        stats.update({"steps": 2, "train/dpo_loss_last": 0.6012})
    with stage_output(layout.recommender("base"), "f", None) as (tmp, stats):
        write_json(EPOCHS, tmp / HISTORY)
        stats.update({"best_epoch": 1, "ndcg@5": 0.6})
    layout.rounds.mkdir(parents=True)
    layout.manifest.write_text(json.dumps({"rounds": [{"round": 0, "comparison": {"gain/mean": 0.002}}]}))
    pop = np.linspace(0.5, 0.7, len(users))
    llm = pop + shift + 0.01 * np.arange(len(users))
    with stage_output(layout.evaluate, "f", None) as (tmp, stats):
        table = {
            v: {"ndcg@5": [float(x.mean()), float(x.min()), float(x.max())]}
            for v, x in (("popularity", pop), ("base LLM", llm))
        }
        write_json(table, tmp / TABLE_JSON)
        per_user = {"variant": ["popularity"] * len(users) + ["base LLM"] * len(users), "user_id": users * 2}
        write_parquet(pa.table({**per_user, "ndcg@5": np.concatenate([pop, llm])}), tmp / PER_USER_PARQUET)
    return layout


def test_a_run_mirrored_into_mlflow_reads_back_value_for_value_and_once(tmp_path):
    fake_run(tmp_path / "run", [f"u{i}" for i in range(5)])
    names = [r.name for r in collect(tmp_path / "run")]
    assert names == ["dpo/round0", "recommender/base", "rounds", "evaluate"]
    config = from_dict(RunConfig, {"name": "tracked", "run_dir": str(tmp_path / "run")}).to_dict()
    uri, parent, written = export_mlflow(tmp_path / "run", config)
    assert written and uri == (tmp_path / "run" / "mlruns").resolve().as_uri()

    client = mlflow.MlflowClient(tracking_uri=uri)
    assert client.get_run(parent).data.params["dpo.beta"] == str(config["dpo"]["beta"])
    exp = client.get_experiment_by_name("tracked")
    children = {
        r.info.run_name: r for r in client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    }
    assert set(children) == set(names)
    loss = client.get_metric_history(children["dpo/round0"].info.run_id, "train/dpo_loss")
    assert sorted((m.step, m.value) for m in loss) == [(1, 0.6931), (2, 0.6012)]
    valid = client.get_metric_history(children["recommender/base"].info.run_id, metric_key("valid/ndcg@5"))
    assert sorted((m.step, m.value) for m in valid) == [(0, 0.55), (1, 0.6)]
    test = children["evaluate"].data.metrics
    assert test["test/base LLM/ndcg_at_5"] == pytest.approx(
        json.loads((tmp_path / "run/evaluate/table.json").read_text())["base LLM"]["ndcg@5"][0]
    )
    assert children["rounds"].data.metrics["comparison/gain/mean"] == 0.002

    again = export_mlflow(tmp_path / "run", config)
    assert again == (uri, parent, False)  # the same content: nothing written twice
    assert len(client.search_runs([exp.experiment_id])) == len(names) + 1


def test_compare_pairs_the_same_test_users_and_says_when_it_cannot(tmp_path, capsys):
    users = [f"u{i}" for i in range(6)]
    fake_run(tmp_path / "a", users)
    fake_run(tmp_path / "b", users, shift=0.02)
    fake_run(tmp_path / "c", users[:4], shift=0.02)
    lines = {
        line.split(" | ")[0].strip("| "): line for line in compare_runs(tmp_path / "a", tmp_path / "b").splitlines()
    }
    # Every user's base LLM value moved by exactly +0.02: a paired interval of zero width.
    assert "+0.0200 [+0.0200, +0.0200] | 6 users (paired)" in lines["base LLM"]
    assert "+0.0000 [+0.0000, +0.0000]" in lines["popularity"]
    assert "6 vs 4 users (unpaired)" in compare_runs(tmp_path / "a", tmp_path / "c")
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "6 users (paired)" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "nothing")]) == 2
