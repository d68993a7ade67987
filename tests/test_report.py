import json

from rlrf4rec.artifacts import read_marker, stage_output, write_json
from rlrf4rec.report import METRICS, build_report


def test_report_orders_the_method_table_and_is_published_whole(tmp_path):
    run = tmp_path / "run"
    table = {
        name: {m: [0.5 + i / 100, 0.4, 0.6] for m in METRICS}
        for i, name in enumerate(["DPO round 1", "base LLM", "ID only", "history knowledge (no LLM)"])
    }
    with stage_output(run / "evaluate", "fp", "") as (tmp, _):
        write_json(table, tmp / "table.json")
    (run / "dpo" / "round0").mkdir(parents=True)
    (run / "dpo" / "round0" / "history.json").write_text(
        json.dumps(
            [{"step": 1, "train/dpo_loss": 0.6931}, {"step": 2, "train/dpo_loss": 0.62, "eval/rewards/accuracies": 0.5}]
        )
    )
    out = build_report(run)
    md = (out / "report.md").read_text()
    rows = [line.split(" | ")[0].lstrip("| ") for line in md.splitlines() if line.startswith("| ") and "[" in line]
    assert rows == ["ID only", "history knowledge (no LLM)", "base LLM", "DPO round 1"]
    assert "| ID only | 0.5200 [0.4000, 0.6000]" in md
    assert "DPO round0: loss 0.6931 → 0.6200 over 2 logged steps" in md
    page = (out / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "<svg" in page and "<script" not in page
    assert read_marker(out)["stats"]["sections"] >= 3
    assert sorted(f.name for f in out.iterdir()) == ["_COMPLETE.json", "report.html", "report.md"]  # no empty config
