"""The run report: a self-contained HTML page and a markdown summary in `<run>/report/`.

Consumes what the stages left in the run directory (evaluate/table.json and paired.json, rounds/manifest.json,
rewards, pairs, DPO histories, completion markers); produces a short summary in words, the method's table
(popularity and ID-only baselines vs base LLM vs each DPO round: NDCG/MAP@{1,3,5,7} with bootstrap 95% intervals over
test users) drawn as forest plots with each variant's paired difference to the baselines, reward distributions before
and after each round, DPO curves, example chosen/rejected texts, time per stage, and the lineage folded under its
summary. Inline SVG (core/charts.py), no scripts, no external assets. Knows nothing about how any number was computed.
"""

from __future__ import annotations

import html
import json
import re
import time
from functools import partial
from pathlib import Path

from rlrf4rec.core import charts
from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import Fingerprint, publish, read_manifest, read_marker, read_parquet
from rlrf4rec.core.config import RunConfig
from rlrf4rec.core.layout import (
    CONFIG,
    EVAL_ROWS,
    FIXED,
    GENERATIONS,
    MARKER,
    PAIRED,
    REPORT_HTML,
    REPORT_MD,
    REWARDS,
    TABLE_JSON,
    TABLE_MD,
    RunLayout,
    pairs_file,
)
from rlrf4rec.core.lineage import Round
from rlrf4rec.core.metrics import RANKED_METRICS
from rlrf4rec.core.stage import Stage

FOREST_METRICS = ("ndcg@5", "map@5")
BASELINE_ORDER = ["popularity", "KAR ID-only", "ID only", "history knowledge (no LLM)", "base LLM", "SFT warm start"]
# Paired differences drawn against these rows, in this order (evaluate.PAIRED_BASELINES, most telling first).
PAIRED_ORDER = ["base LLM", "SFT warm start", "popularity", "ID only", "KAR ID-only"]


def _ordered(names) -> list[str]:
    """Baselines in the method's order, then the rest (DPO rounds) by name, round numbers compared as numbers."""

    def key(name: str):
        natural = [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
        return (BASELINE_ORDER.index(name) if name in BASELINE_ORDER else len(BASELINE_ORDER), natural)

    return sorted(names, key=key)


def _html_table(head: list[str], rows: list[list]) -> str:
    cells = lambda tag, row: "<tr>" + "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in row) + "</tr>"
    return "<table>" + cells("th", head) + "".join(cells("td", row) for row in rows) + "</table>"


def _details(summary: str, inner_html: str) -> str:
    return f"<details><summary>{html.escape(summary)}</summary>{inner_html}</details>"


def _verdict(diff: list) -> str:
    """'resolved (better)' / 'resolved (worse)' when the paired interval excludes 0, else 'within noise'."""
    d, _, _, resolved = diff
    return f"resolved ({'better' if d > 0 else 'worse'})" if resolved else "within noise"


def _stage_times(run: Path) -> list[tuple[str, float]]:
    """(stage, wall seconds since the previous stage finished), in finishing order: a stage computes before it
    publishes, so the gap between consecutive completions is its time when the run went stage after stage."""
    finished = []
    for marker in run.rglob(MARKER):
        name = str(marker.parent.relative_to(run))
        if marker.parent == RunLayout(run).report:  # a previous report, not part of the run
            continue
        m = json.loads(marker.read_text())
        if "finished" in m:
            finished.append((m["finished"], m.get("started", m["finished"]), name))
    finished.sort()
    rows, previous = [], None
    for end, start, name in finished:
        rows.append((name, end - (previous if previous is not None else start)))
        previous = end
    return rows


DPO_PANELS = {  # y axis label -> history keys drawn in that panel
    "DPO loss": ("train/dpo_loss", "eval/dpo_loss"),
    "reward accuracy": ("train/rewards/accuracies", "eval/rewards/accuracies"),
    "reward margin (chosen - rejected)": ("train/rewards/margins", "eval/rewards/margins"),
}


def _dpo_curves(run: Path) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """DPO stage name -> history key -> [(step, value)] for the keys in DPO_PANELS that were logged."""
    curves = {}
    for path in RunLayout(run).dpo_histories():
        history = json.loads(path.read_text())
        keys = [k for ks in DPO_PANELS.values() for k in ks]
        curves[path.parent.name] = {
            k: [(h.get("step", i + 1), h[k]) for i, h in enumerate(history) if k in h] for k in keys
        }
    return curves


def _versus_popularity(name: str, paired: dict) -> str:
    """Whether a learned row beats the item count on test NDCG@5 (resolved), ties it (within noise) or loses."""
    diff = paired.get(name, {}).get("popularity", {}).get("ndcg@5")
    if diff is None:
        return ""
    d, low, high, resolved = diff
    word = ("above" if d > 0 else "BELOW") if resolved else "not distinguishable from"
    return f"{word} popularity ({d:+.4f} [{low:+.4f}, {high:+.4f}])"


def _evaluation(table: dict, paired: dict, info: dict, md: list[str], body: list[str]) -> None:
    """The method's table as two forest plots (each variant's interval; its paired difference to each baseline),
    the full table and every paired difference folded beneath them. `info`: evaluate's rows.json (which texts and
    re-ranker each row scored, their off-topic share), shown beside the metrics where present."""
    names = _ordered(table)

    def described(name: str) -> list[str]:
        row = info.get(name, {})
        off = row.get("off_topic_share")
        return [row.get("texts") or "", row.get("re-ranker", ""), "" if off is None else f"{off:.0%}"]

    md += [
        "## Re-ranking on test users (mean [95% bootstrap CI over users])",
        "",
        "| variant | texts | re-ranker | off topic | " + " | ".join(RANKED_METRICS) + " | NDCG@5 vs popularity |",
        "|---|---|---|---|" + "---|" * (len(RANKED_METRICS) + 1),
    ]
    rows_html = []
    for name in names:
        metrics = table[name]
        md.append(
            f"| {name} | "
            + " | ".join(described(name))
            + " | "
            + " | ".join(f"{metrics[m][0]:.4f} [{metrics[m][1]:.4f}, {metrics[m][2]:.4f}]" for m in RANKED_METRICS)
            + f" | {_versus_popularity(name, paired)} |"
        )
        rows_html.append(
            f"<tr><th>{html.escape(name)}</th>"
            + "".join(f"<td>{html.escape(c)}</td>" for c in described(name))
            + "".join(
                f"<td>{metrics[m][0]:.4f}<br><small>[{metrics[m][1]:.4f}, {metrics[m][2]:.4f}]</small></td>"
                for m in RANKED_METRICS
            )
            + "</tr>"
        )
    md.append("")
    forest = charts.forest(
        "forest-metrics",
        "Re-ranking quality per variant (test users)",
        "Mean " + " and ".join(m.upper() for m in FOREST_METRICS) + " of each variant with its bootstrap 95% interval "
        "over test users: " + "; ".join(f"{n} {table[n]['ndcg@5'][0]:.4f}" for n in names if "ndcg@5" in table[n]),
        names,
        [(f"{m.upper()} (mean, 95% CI)", [table[n].get(m) for n in names]) for m in FOREST_METRICS],
    )
    body.append(
        "<h2>Re-ranking on test users</h2><p>Each point is a variant's mean over test users, the bar its bootstrap "
        "95% interval.</p>" + forest
    )
    if paired:
        labels, panels, lines = [], {m: [] for m in FOREST_METRICS}, []
        for base in [b for b in PAIRED_ORDER if any(b in by_base for by_base in paired.values())]:
            labels.append(f"minus {base}")
            for m in FOREST_METRICS:
                panels[m].append(None)
            for name in _ordered(n for n in paired if base in paired[n]):
                labels.append(name)
                for m in FOREST_METRICS:
                    panels[m].append(paired[name][base][m][:3] if m in paired[name][base] else None)
        body.append(
            "<p>Paired differences: each variant minus a baseline, per test user, with a bootstrap 95% interval over "
            "the same users. Green: better, resolved; red: worse, resolved; grey: the interval contains 0 (within "
            "noise).</p>"
            + charts.forest(
                "forest-paired",
                "Paired difference to each baseline (test users)",
                "Per-user difference of each variant to each baseline, mean and 95% interval; dashed line at 0.",
                labels,
                [(f"{m.upper()} difference (95% CI)", panels[m]) for m in FOREST_METRICS],
                zero_line=True,
            )
        )
        for name, by_base in paired.items():
            for base, diffs in by_base.items():
                d, low, high, resolved = diffs["ndcg@5"]
                verdict = ("better than" if d > 0 else "worse than") if resolved else "not distinguishable from"
                lines.append(f"- {name} is {verdict} {base}: NDCG@5 {d:+.4f} [{low:+.4f}, {high:+.4f}]")
        md += ["## Paired differences on test users (NDCG@5, 95% bootstrap CI over the same users)", "", *lines, ""]
        body.append(
            _details(
                f"Every paired difference in words ({len(lines)})",
                "<ul>" + "".join(f"<li>{html.escape(line[2:])}</li>" for line in lines) + "</ul>",
            )
        )
    body.append(
        _details(
            "All metrics as a table (NDCG and MAP at 1, 3, 5, 7)",
            "<table><tr><th>variant</th><th>texts</th><th>re-ranker</th><th>off topic</th>"
            + "".join(f"<th>{m}</th>" for m in RANKED_METRICS)
            + "</tr>"
            + "".join(rows_html)
            + "</table>",
        )
    )


def _summary(run: Path, table: dict, paired: dict, manifest: dict | None) -> list[str]:
    """A few sentences: what was run, which variants, which rounds, the headline differences in words."""
    sentences = []
    if manifest is not None:
        rounds = [Round.from_dict(r) for r in manifest["rounds"]]
        if all(r.algorithm == "dpo" for r in rounds):
            pairs = ", ".join(str(r.stats["pairs"].get("train/pairs", 0)) for r in rounds)
            sentences.append(f"{len(rounds)} round(s) of reward-guided DPO (train pairs per round: {pairs}).")
        else:
            prompts = ", ".join(str(r.stats.get("grpo", {}).get("prompts", "-")) for r in rounds)
            sentences.append(f"{len(rounds)} round(s) of on-policy GRPO (train prompts per round: {prompts}).")
    if table:
        users = (read_marker(RunLayout(run).evaluate) or {}).get("stats", {}).get("test_users")
        on = f" on {users} test users" if users else " on test users"
        sentences.append(f"Evaluated {len(table)} variants{on}: {', '.join(_ordered(table))}.")
    last = ([n for n in _ordered(paired) if n.startswith(("DPO", "GRPO")) and not n.endswith(FIXED)] or [None])[-1]
    start = "SFT warm start" if "SFT warm start" in paired else "base LLM"  # the policy the rounds started from
    if start != "base LLM":
        sentences.append("The rounds started from the SFT warm start (loop.init: sft), not from models.llm.")
    compared = [(last, start), (last + FIXED, start)] if last else []
    for name, base in compared + [(start, "ID only"), (start, "popularity")]:
        diff = paired.get(name, {}).get(base, {}).get("ndcg@5")
        if diff is not None:
            d, low, high, _ = diff
            sentences.append(
                f"NDCG@5 of {name} minus {base}: {d:+.4f} (95% CI [{low:+.4f}, {high:+.4f}]), {_verdict(diff)}."
            )
    below = [n for n in _ordered(paired) if "BELOW" in _versus_popularity(n, paired)]
    tied = [n for n in _ordered(paired) if _versus_popularity(n, paired).startswith("not")]
    if below:
        sentences.append(f"Below item popularity on test NDCG@5 (resolved): {', '.join(below)}.")
    if tied:
        sentences.append(f"Not distinguishable from item popularity on test NDCG@5: {', '.join(tied)}.")
    return sentences


def _rewards(path: Path) -> tuple[str, list[float]] | None:
    """(policy version, rewards) of a reward stage's rows, None when the stage has not finished."""
    if read_marker(path.parent) is None:
        return None
    table = read_parquet(path, S.REWARDS)
    versions = sorted(set(table.column(S.POLICY_VERSION).to_pylist()))
    return ", ".join(versions), table.column(S.REWARD).to_pylist()


def _rounds(run: Path, manifest: dict, md: list[str], body: list[str]) -> None:
    """Per round: pairs and valid reward gain in words, the valid rewards of the policy before and after the round
    (same users, same scoring recommender), example pairs folded; then the train rewards that made each round's
    pairs."""
    md += ["## Rounds", ""]
    body.append("<h2>Rounds</h2>")
    train = {}
    for r in (Round.from_dict(r) for r in manifest["rounds"]):
        t = r.index
        step = partial(RunLayout(run).round_step, t)
        v = r.stats["valid_reward"]
        if "pairs" in r.stats:
            update = f"{r.stats['pairs'].get('train/pairs', 0)} train pairs"
        else:
            g = r.stats["grpo"]
            update = (
                f"GRPO on {g.get('prompts', 0)} prompts, tied groups {g.get('train/frac_reward_zero_std_mean', 0):.0%}"
            )
        line = (
            f"Round {t}: {update}; valid reward "
            f"{v['before/mean']:.4f} → {v['after/mean']:.4f}, gain {v['gain/mean']:+.4f} "
            f"(95% CI [{v['gain/ci_low']:+.4f}, {v['gain/ci_high']:+.4f}], {v['users']} users)"
        )
        line += ": resolved" if v["gain/ci_low"] > 0 or v["gain/ci_high"] < 0 else ": within noise"
        shift = r.stats.get("shift")
        if shift:  # how far DPO moved the policy (stages/shift.py); 0 for each at step 0
            line += (
                f"; the tuned policy orders {shift['train/pair_accuracy']:.0%} of its train pairs as labelled, "
                f"KL to the reference {shift['valid/kl_per_token']:.4f} nats/token on its valid texts"
            )
        md.append(f"- {line}")
        body.append(f"<h3>Round {t}</h3><p>{html.escape(line.split(': ', 1)[1])}.</p>")
        series = {}
        for when, stage in (("before", "reward-valid"), ("after", "reward-valid-tuned")):
            found = _rewards(step(stage) / REWARDS)
            if found is not None:
                series[f"{when}: policy {found[0]}"] = found[1]
        if series:
            body.append(
                charts.histogram(
                    f"rewards-round{t}",
                    f"Round {t}: reward of sampled valid texts, before and after DPO",
                    f"Histogram of the rewards of the valid users' texts sampled from the policy before round {t} and "
                    "from the DPO-tuned policy after it, scored by the same recommender; dashed lines are the means.",
                    series,
                    "reward",
                )
            )
        found = _rewards(step("reward-train") / REWARDS)
        if found is not None:
            train[f"round {t}: policy {found[0]}"] = found[1]
        body.append(_examples(step("pairs") / pairs_file("train"), md))
    if train:
        body.append(
            "<h3>Rewards that made the pairs</h3><p>Train users' sampled texts per round, each round scored "
            "by its own cross-fitted recommenders.</p>"
            + charts.histogram(
                "rewards-train",
                "Reward of sampled train texts per round",
                "Histogram of the cross-fitted rewards of the train users' sampled texts, one series per "
                "round's policy; dashed lines are the means.",
                train,
                "reward",
            )
        )
    md.append("")


def _dpo(run: Path, md: list[str], body: list[str]) -> None:
    curves = _dpo_curves(run)
    if curves:
        body.append("<h2>DPO training</h2>")
    for name, curve in curves.items():
        panels = [
            (ylabel, {k.split("/")[0]: curve[k] for k in keys if curve[k]}) for ylabel, keys in DPO_PANELS.items()
        ]
        panels = [(ylabel, series) for ylabel, series in panels if series]
        if panels:
            body.append(
                charts.lines(
                    f"dpo-{name}",
                    f"DPO {name}",
                    f"DPO {name}: " + ", ".join(label for label, _ in panels) + " against the optimizer step, train "
                    "(per logged step) and eval (held-out pairs).",
                    panels,
                    "optimizer step",
                )
            )
        loss = curve["train/dpo_loss"]
        if loss:
            md.append(f"- DPO {name}: loss {loss[0][1]:.4f} → {loss[-1][1]:.4f} over {len(loss)} logged steps")


def _times(run: Path, md: list[str], body: list[str]) -> None:
    times = _stage_times(run)
    md += [
        "",
        "## Time per stage (wall seconds since the previous stage finished)",
        "",
        "| stage | seconds |",
        "|---|---|",
    ]
    md += [f"| {name} | {seconds:.1f} |" for name, seconds in times]
    if not times:
        return
    total = sum(s for _, s in times)
    body.append(
        f"<h2>Time per stage</h2><p>{len(times)} stages, {total / 60:.1f} minutes of wall time in all (each stage: "
        "the time since the previous one finished).</p>"
        + charts.bars(
            "stage-times",
            "Wall time per stage",
            f"Seconds per stage in finishing order, {total:.0f} s in all.",
            [(n, round(s, 1)) for n, s in times],
            "wall seconds",
            unit=" s",
        )
        + _details(
            "Time per stage as a table",
            _html_table(["stage", "wall seconds"], [[n, f"{s:.1f}"] for n, s in times]),
        )
    )


def _lineage(manifest: dict, md: list[str], body: list[str]) -> None:
    """Which policy and recommender each round read and wrote, in words, with the raw manifest folded beneath."""

    def seeds(r: Round) -> str:
        k = len(r.reward_models)
        return f", each reward the mean of {k} seeds." if k > 1 else "."

    words = [
        f"Round {r.index}: policy {r.policy_in} → {r.policy_out}; recommender {r.recommender_in} → "
        f"{r.recommender_out}; rewards cross-fitted over {len(r.reward_folds)} folds{seeds(r)}"
        for r in (Round.from_dict(r) for r in manifest["rounds"])
    ]
    head = {k: v for k, v in manifest.items() if k != "rounds"}
    raw = json.dumps(manifest, indent=1)
    md += ["", "## Lineage", "", "```json", raw[:4000], "```", ""]
    body.append(
        "<h2>Lineage</h2><p>"
        + html.escape(", ".join(f"{k} {v}" for k, v in head.items()))
        + "</p><ul>"
        + "".join(f"<li>{html.escape(w)}</li>" for w in words)
        + "</ul>"
        + _details(f"Rounds manifest (rounds/manifest.json, {len(raw)} characters)", f"<pre>{html.escape(raw)}</pre>")
    )


STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}pre{background:#f6f6f6;padding:8px;"
    "overflow:auto;font-size:11px}blockquote{border-left:3px solid #ccc;margin:4px 0;padding-left:8px}"
    "svg.chart{display:block;max-width:100%;height:auto;margin:8px 0}details{margin:6px 0}"
    "summary{cursor:pointer;color:#1f4e79}.summary{font-size:15px;background:#f3f7fb;padding:8px 12px}"
)


def build_report(run: Path) -> Path:
    """Write report.html and report.md into `<run>/report/` (published whole, with a marker); every section
    appears when its inputs exist. Re-run freely: it only reads."""
    md, body = ["# rlrf4rec run report", f"Run directory: `{run}`", ""], []
    layout = RunLayout(run)
    evaluate = layout.evaluate
    table = json.loads((evaluate / TABLE_JSON).read_text()) if (evaluate / TABLE_JSON).is_file() else {}
    paired = json.loads((evaluate / PAIRED).read_text()) if (evaluate / PAIRED).is_file() else {}
    info = json.loads((evaluate / EVAL_ROWS).read_text()) if (evaluate / EVAL_ROWS).is_file() else {}
    manifest = read_manifest(layout)

    summary = _summary(run, table, paired, manifest)
    if summary:
        md += ["## Summary", "", " ".join(summary), ""]
        body.append('<p class="summary">' + html.escape(" ".join(summary)) + "</p>")
    if table:
        _evaluation(table, paired, info, md, body)

    quality = text_quality(run)
    if quality:  # how much of what the policies wrote is usable text at all, per generation stage
        head = "| texts of | policy | rows | " + " | ".join(S.QUALITY_FLAGS) + " |"
        lines = [head, "|---|---|---|" + "---|" * len(S.QUALITY_FLAGS)]
        for r in quality:
            shares = " | ".join(f"{r[f]:.0%}" for f in S.QUALITY_FLAGS)
            lines.append(f"| {r['stage']} | {r['policy']} | {r['rows']} | {shares} |")
        md += ["## Text quality (share of texts flagged)", "", *lines, ""]
        body.append(
            "<h2>Text quality</h2><p>Share of generated texts flagged empty, truncated (hit the token limit), "
            "degenerate (under 5 words or mostly repeated 3-grams) or off topic (no factor or genre named).</p>"
            + _html_table(
                ["texts of", "policy", "rows", *S.QUALITY_FLAGS],
                [[r["stage"], r["policy"], r["rows"], *(f"{r[f]:.0%}" for f in S.QUALITY_FLAGS)] for r in quality],
            )
        )

    # Written by `rlrf4rec controls`: valid users only, several seeds, paired intervals; one block per table (with
    # --backbones, one per backbone) and, when several backbones were measured, their table side by side.
    controls = layout.control_tables()
    tables = {d.name: json.loads((d / TABLE_JSON).read_text()) for d in controls}
    for d in controls:
        text = (d / TABLE_MD).read_text()
        backbone = next((r["backbone"] for r in tables[d.name] if "backbone" in r), "prm")
        if not any("ndcg@5" in r for r in tables[d.name]):  # a reward-reliability table, reported elsewhere
            continue
        title = f"Knowledge controls: {d.name} (backbone {backbone})"
        md += [f"## {title} (valid users; list-mean NDCG@5, seeds, paired user-resampled 95% CI)", "", text]
        body.append(
            f"<h2>{html.escape(title)}</h2><p>Valid users only. Positive control: a user text that names the "
            "user's own positives (leaked on purpose); negative controls: another user's or the mean knowledge, and "
            "texts permuted across users.</p><pre>" + html.escape(text) + "</pre>"
        )
    backbones = {r.get("backbone") for rows in tables.values() for r in rows if "metrics" in r}
    if len(backbones) > 1:
        from rlrf4rec.stages.controls import backbone_table

        text = backbone_table([rows for rows in tables.values() if any("metrics" in r for r in rows)])
        md += ["## Re-ranker backbones side by side (valid users, mean of seeds)", "", text]
        body.append("<h2>Re-ranker backbones side by side</h2><pre>" + html.escape(text) + "</pre>")

    if manifest is not None:
        _rounds(run, manifest, md, body)
    _dpo(run, md, body)
    _times(run, md, body)
    if manifest is not None:
        _lineage(manifest, md, body)
    config = evaluate / CONFIG
    if config.is_file():
        body.append(
            _details("Resolved configuration (evaluate/config.yaml)", f"<pre>{html.escape(config.read_text())}</pre>")
        )

    page = (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>rlrf4rec report</title><style>{STYLE}"
        f"</style></head><body><h1>rlrf4rec run report</h1><p><code>{html.escape(str(run))}</code></p>"
        + "".join(body)
        + "</body></html>"
    )

    def write(tmp: Path, stats: dict) -> None:
        (tmp / REPORT_HTML).write_text(page)
        (tmp / REPORT_MD).write_text("\n".join(md) + "\n")
        stats["sections"] = len(body)
        stats["charts"] = page.count('<svg id="')

    # Made from the run's artifacts only, anew on every call (keyed by the time it was rendered).
    return publish(layout.report, Fingerprint("report", extra={"rendered": time.time()}), write, None, force=True)


def text_quality(run: Path) -> list[dict]:
    """Per complete generation stage under `run`: policy, rows and the share of each quality flag."""
    rows = []
    for path in sorted(run.rglob(GENERATIONS)):
        marker = read_marker(path.parent)
        if marker is None:
            continue
        table = read_parquet(path, S.GENERATIONS)
        flags = table.column(S.FLAGS).to_pylist()
        rows.append(
            {
                "stage": str(path.parent.relative_to(run)),
                "policy": marker["stats"].get("policy_version", "?"),
                "rows": len(flags),
                **{f: sum(f in row for row in flags) / max(len(flags), 1) for f in S.QUALITY_FLAGS},
            }
        )
    return rows


def _examples(pairs_path: Path, md: list[str], limit: int = 2) -> str:
    if not pairs_path.is_file():
        return ""
    rows = read_parquet(pairs_path, S.PAIRS).to_pylist()
    rows.sort(key=lambda r: -r[S.REWARD_MARGIN])
    parts = []
    for r in rows[:limit]:
        chosen, rejected = r[S.CHOSEN][0]["content"], r[S.REJECTED][0]["content"]
        parts.append(
            f"<p>user {html.escape(r[S.USER_ID])}: chosen reward {r[S.CHOSEN_REWARD]:.3f}, rejected "
            f"{r[S.REJECTED_REWARD]:.3f}</p><blockquote><b>chosen</b>: {html.escape(chosen)}</blockquote>"
            f"<blockquote><b>rejected</b>: {html.escape(rejected)}</blockquote>"
        )
        md.append(
            f"  - user {r[S.USER_ID]} (margin {r[S.REWARD_MARGIN]:.3f}) chosen: "
            f"{chosen[:200]!r} / rejected: {rejected[:200]!r}"
        )
    return _details(f"Example pairs (the {len(parts)} largest margins)", "".join(parts)) if parts else ""


# --------------------------------------------------------------------------------------------------- the stage record


def run_report(cfg: RunConfig) -> Path:
    return build_report(cfg.run_path)


STAGE = Stage(
    "report", "write report.html and report.md from the run directory", in_run=run_report, upstream=("evaluate",)
)
