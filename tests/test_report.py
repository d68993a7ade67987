import json
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser

import pyarrow as pa
import pytest

from rlrf4rec.core import charts
from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import read_marker, stage_output, write_json, write_parquet
from rlrf4rec.core.metrics import RANKED_METRICS as METRICS
from rlrf4rec.stages.report import build_report

CHARTS = ["forest-metrics", "forest-paired", "rewards-round0", "rewards-train", "dpo-round0", "stage-times"]
VOID = {"meta", "br", "hr", "img", "input", "link", "col", "area", "base", "embed", "source", "track", "wbr"}


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
    assert "| ID only |  |  |  | 0.5200 [0.4000, 0.6000]" in md  # written before evaluate said what each row read
    assert "DPO round0: loss 0.6931 → 0.6200 over 2 logged steps" in md
    page = (out / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "<svg" in page and "<script" not in page
    assert read_marker(out)["stats"]["sections"] >= 3
    assert sorted(f.name for f in out.iterdir()) == ["_COMPLETE.json", "report.html", "report.md"]  # no empty config


def _rewards(version: str, values: list[float]) -> pa.Table:
    n = len(values)
    return pa.table(
        {
            S.USER_ID: [f"u{i}" for i in range(n)],
            S.SAMPLE_IDX: pa.array([0] * n, pa.int32()),
            S.SPLIT: ["valid"] * n,
            S.POLICY_VERSION: [version] * n,
            S.REWARD: values,
        },
        schema=S.REWARDS,
    )


def _diff(mean: float, low: float, high: float) -> dict:
    return {m: [mean, low, high, bool(low > 0 or high < 0)] for m in METRICS}


@pytest.fixture
def small_run(tmp_path):
    """A finished one-round run written by hand: evaluate table and paired differences, rewards before and after
    the round and of the train texts, a DPO history, the manifest and a resolved config."""
    run = tmp_path / "run"
    table = {
        name: {m: [mean, mean - 0.05, mean + 0.05] for m in METRICS}
        for name, mean in [("popularity", 0.55), ("ID only", 0.5), ("base LLM", 0.6), ("DPO round 1", 0.61)]
    }
    paired = {
        "DPO round 1": {"base LLM": _diff(0.01, -0.02, 0.04), "ID only": _diff(0.11, 0.08, 0.14)},
        "base LLM": {"ID only": _diff(0.05, 0.02, 0.08)},
        "popularity": {"base LLM": _diff(-0.03, -0.05, -0.01), "ID only": _diff(0.05, -0.01, 0.1)},
        "ID only": {"base LLM": _diff(-0.05, -0.08, -0.02)},
    }
    with stage_output(run / "evaluate", "fp", "seed: 7\nloop:\n  rounds: 1\n") as (tmp, stats):
        write_json(table, tmp / "table.json")
        write_json(paired, tmp / "paired.json")
        stats["test_users"] = 9
    for stage, version, values in [
        ("reward-valid", "base", [0.1, 0.2, 0.2, 0.9]),
        ("reward-valid-tuned", "round1", [0.3, 0.8, 0.9, 0.9]),
        ("reward-train", "base", [0.0, 0.25, 0.5, 0.5, 0.5, 1.0]),
    ]:
        with stage_output(run / "rounds" / "round0" / stage, "fp", "") as (tmp, _):
            write_parquet(_rewards(version, values), tmp / "rewards.parquet")
    (run / "dpo" / "round0").mkdir(parents=True)
    history = [
        {"step": s, "train/dpo_loss": loss, "train/rewards/accuracies": acc, "train/rewards/margins": margin}
        for s, loss, acc, margin in [(1, 0.6931, 0.0, 0.0), (2, 0.65, 0.5, 0.04), (3, 0.6, 1.0, 0.12)]
    ] + [{"step": 3, "eval/dpo_loss": 0.68, "eval/rewards/accuracies": 0.6}]
    (run / "dpo" / "round0" / "history.json").write_text(json.dumps(history))
    manifest = {
        "config_hash": "abc123",
        "rounds": [
            {
                "round": 0,
                "policy_in": "embedded:tiny-policy",
                "policy_out": "run/dpo/round0/model",
                "recommender_in": "run/recommender/base",
                "recommender_out": "run/recommender/round1",
                "reward_folds": ["run/recommender/base-fold0", "run/recommender/base-fold1"],
                "pairs": {"train/pairs": 12},
                "valid_reward": {
                    "before/mean": 0.35,
                    "after/mean": 0.725,
                    "gain/mean": 0.375,
                    "gain/ci_low": 0.1,
                    "gain/ci_high": 0.6,
                    "users": 4,
                },
            }
        ],
    }
    (run / "rounds" / "manifest.json").write_text(json.dumps(manifest))
    return run


class _Page(HTMLParser):
    """Open elements checked against their closing tags; text inside and outside <details>; each SVG's texts."""

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.tags = [], [], []
        self.inside_details, self.outside_details = [], []
        self.svg_texts: dict[str, list[str]] = {}
        self.axis_labels: dict[str, list[str]] = {}
        self._svg, self._axis = None, False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "svg":
            self._svg = a.get("id")
            self.svg_texts[self._svg], self.axis_labels[self._svg] = [], []
        self._axis = tag == "text" and a.get("class") == "axis-label"
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()
        if tag == "svg":
            self._svg = None

    def handle_data(self, data):
        (self.inside_details if "details" in self.stack else self.outside_details).append(data)
        if self._svg is not None:
            self.svg_texts[self._svg].append(data)
            if self._axis:
                self.axis_labels[self._svg].append(data)


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    return parser


def test_report_draws_every_chart_with_titles_and_labelled_axes(small_run):
    page = (build_report(small_run) / "report.html").read_text()
    parsed = _parse(page)
    assert parsed.errors == [] and parsed.stack == []
    ids = [a["id"] for _, a in parsed.tags if "id" in a]
    assert len(ids) == len(set(ids))
    svgs = [a for tag, a in parsed.tags if tag == "svg"]
    assert [a["id"] for a in svgs] == CHARTS
    for a in svgs:
        assert a["class"] == "chart" and a["role"] == "img"
        assert a["aria-labelledby"] == f"{a['id']}-title {a['id']}-desc"
        assert f'<title id="{a["id"]}-title">' in page and f'<desc id="{a["id"]}-desc">' in page
    assert parsed.axis_labels["forest-metrics"] == ["NDCG@5 (mean, 95% CI)", "MAP@5 (mean, 95% CI)"]
    assert parsed.axis_labels["forest-paired"] == ["NDCG@5 difference (95% CI)", "MAP@5 difference (95% CI)"]
    assert parsed.axis_labels["rewards-round0"] == ["count", "reward"]
    assert parsed.axis_labels["rewards-train"] == ["count", "reward"]
    assert parsed.axis_labels["dpo-round0"] == [
        "DPO loss",
        "optimizer step",
        "reward accuracy",
        "optimizer step",
        "reward margin (chosen - rejected)",
        "optimizer step",
    ]
    assert parsed.axis_labels["stage-times"] == ["wall seconds"]
    # Tick values are drawn: the forest axes span the intervals, a histogram's count axis reaches its tallest bin.
    assert {"0.4", "0.5", "0.6", "0.7"} <= set(parsed.svg_texts["forest-metrics"])  # intervals 0.45..0.66
    assert "3" in parsed.svg_texts["rewards-train"]  # three train texts scored 0.5
    assert "0" in parsed.svg_texts["forest-paired"]


def test_report_charts_carry_the_numbers(small_run):
    page = (build_report(small_run) / "report.html").read_text()
    texts = _parse(page).svg_texts
    labels = texts["forest-metrics"][3:7]  # after the accessible title and description and the visible title
    assert labels == ["popularity", "ID only", "base LLM", "DPO round 1"]
    assert "before: policy base (n=4), mean 0.35" in texts["rewards-round0"]
    assert "after: policy round1 (n=4), mean 0.725" in texts["rewards-round0"]
    assert "round 0: policy base (n=6), mean 0.4583" in texts["rewards-train"]
    assert "train (3 points, last 0.6)" in texts["dpo-round0"] and "eval (1 points, last 0.68)" in texts["dpo-round0"]
    paired = page[page.index('<svg id="forest-paired"') :]
    paired = paired[: paired.index("</svg>")]
    intervals = re.findall(r'<g class="interval"><title>([^:]*):[^<]*</title><line [^>]*stroke="([^"]+)"', paired)
    # "minus base LLM" rows, then "minus ID only" rows: green above 0, red below, grey when the interval holds 0.
    assert intervals[:6] == [
        ("popularity", charts.WORSE),
        ("ID only", charts.WORSE),
        ("DPO round 1", charts.NOISE),
        ("popularity", charts.NOISE),
        ("base LLM", charts.BETTER),
        ("DPO round 1", charts.BETTER),
    ]
    assert intervals[6:] == intervals[:6]  # the MAP@5 panel, same differences
    assert "minus base LLM" in texts["forest-paired"] and "minus ID only" in texts["forest-paired"]


def test_report_summarizes_in_words_and_folds_the_lineage(small_run):
    parsed = _parse((build_report(small_run) / "report.html").read_text())
    outside, inside = "".join(parsed.outside_details), "".join(parsed.inside_details)
    assert "1 round(s) of reward-guided DPO (train pairs per round: 12)." in outside
    assert "Evaluated 4 variants on 9 test users: popularity, ID only, base LLM, DPO round 1." in outside
    assert "NDCG@5 of DPO round 1 minus base LLM: +0.0100 (95% CI [-0.0200, +0.0400]), within noise." in outside
    assert "NDCG@5 of base LLM minus ID only: +0.0500 (95% CI [+0.0200, +0.0800]), resolved (better)." in outside
    assert "gain +0.3750 (95% CI [+0.1000, +0.6000], 4 users): resolved" in outside
    assert "Round 0: policy embedded:tiny-policy → run/dpo/round0/model" in outside  # the lineage in words
    assert '"policy_out": "run/dpo/round0/model"' in inside and '"policy_out"' not in outside  # raw JSON folded
    assert "loop:\n  rounds: 1" in inside and "rounds: 1" not in outside  # the resolved config folded too


def test_report_is_one_file_without_scripts_or_external_assets(small_run):
    out = build_report(small_run)
    page = (out / "report.html").read_text()
    parsed = _parse(page)
    assert not any(tag in ("script", "link", "img", "iframe", "object", "embed") for tag, _ in parsed.tags)
    references = [v for _, a in parsed.tags for k, v in a.items() if k in ("src", "href", "xlink:href") and v]
    assert references == []
    assert "http://" not in page and "https://" not in page and "url(" not in page
    assert [p.name for p in out.iterdir() if p.suffix not in (".md", ".json")] == ["report.html"]


BROWSER = next(
    filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "chromium-headless-shell"))), None
)


@pytest.mark.skipif(
    BROWSER is None, reason="no headless Chromium on PATH (Debian: apt-get install chromium-headless-shell)"
)
def test_report_renders_in_headless_chromium(small_run, tmp_path):
    html_path = build_report(small_run) / "report.html"
    flags = [BROWSER, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(
        [*flags, "--dump-dom", html_path.as_uri()], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    body = dom[dom.index("<body>") :]
    for chart in CHARTS:  # parsed as SVG inside the body, with its accessible title
        assert re.search(rf'<svg id="{chart}" class="chart"[^>]*><title id="{chart}-title">', body), chart
    shot = tmp_path / "report.png"
    subprocess.run(
        [*flags, "--hide-scrollbars", "--window-size=1000,3000", f"--screenshot={shot}", html_path.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (1000, 3000)
    assert len(png) > 100_000  # the charts drawn: a page with one heading at this size is about 16 kB


def test_report_says_which_texts_and_re_ranker_each_row_read_and_marks_rows_below_popularity(tmp_path):
    run = tmp_path / "run"
    names = ["popularity", "ID only", "base LLM", "DPO round 1", "DPO round 1, fixed re-ranker"]
    table = {name: {m: [0.5 + i / 100, 0.4, 0.6] for m in METRICS} for i, name in enumerate(names)}
    rows = {
        "popularity": {"texts": None, "re-ranker": "none (train-user count)"},
        "ID only": {"texts": None, "re-ranker": "id"},
        "base LLM": {"texts": "sampled (base LLM)", "off_topic_share": 0.04, "re-ranker": "base"},
        "DPO round 1": {"texts": "sampled (DPO round 1)", "off_topic_share": 0.25, "re-ranker": "round1"},
        "DPO round 1, fixed re-ranker": {
            "texts": "sampled (DPO round 1)", "off_topic_share": 0.25, "re-ranker": "base (fixed)"
        },
    }  # fmt: skip
    diff = lambda d, lo, hi: {m: [d, lo, hi, lo > 0 or hi < 0] for m in METRICS}  # noqa: E731
    paired = {
        "ID only": {"popularity": diff(-0.02, -0.03, -0.01)},
        "base LLM": {"popularity": diff(0.01, -0.01, 0.03)},
        "DPO round 1": {"popularity": diff(0.03, 0.01, 0.05), "base LLM": diff(0.02, 0.0, 0.04)},
        "DPO round 1, fixed re-ranker": {"popularity": diff(0.0, -0.02, 0.02), "base LLM": diff(-0.01, -0.03, 0.01)},
    }
    with stage_output(run / "evaluate", "fp", "") as (tmp, _):
        write_json(table, tmp / "table.json")
        write_json(paired, tmp / "paired.json")
        write_json(rows, tmp / "rows.json")
    md = (build_report(run) / "report.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| DPO round 1, fixed re-ranker |"))
    assert line.startswith("| DPO round 1, fixed re-ranker | sampled (DPO round 1) | base (fixed) | 25% | 0.5400")
    assert line.endswith("| not distinguishable from popularity (+0.0000 [-0.0200, +0.0200]) |")
    assert "| ID only |  | id |  | 0.5100" in md and "BELOW popularity (-0.0200 [-0.0300, -0.0100])" in md
    assert "Below item popularity on test NDCG@5 (resolved): ID only." in md
    assert "NDCG@5 of DPO round 1, fixed re-ranker minus base LLM: -0.0100" in md
