"""The run report: a self-contained HTML page and a markdown summary in `<run>/report/`.

Consumes what the stages left in the run directory (evaluate/table.json, rounds/manifest.json, rewards, pairs,
DPO histories, completion markers); produces the method's table (popularity and ID-only baselines vs base LLM vs each
DPO round: NDCG/MAP@{1,3,5,7} with bootstrap 95% intervals over test users), reward distributions per round, DPO
curves, example chosen/rejected texts, time per stage and lineage. Inline SVG, no scripts, no external assets.
Knows nothing about how any number was computed.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

import numpy as np

from rlrf4rec import schema as S
from rlrf4rec.artifacts import MARKER, read_parquet, stage_output

METRICS = [f"{m}@{k}" for m in ("ndcg", "map") for k in (1, 3, 5, 7)]


def _svg_histograms(series: dict[str, list[float]], bins: int = 20, width: int = 560, height: int = 180) -> str:
    """Overlaid step histograms of values in [0, 1], one colour per series."""
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    edges = np.linspace(0, 1, bins + 1)
    counts = {name: np.histogram(np.clip(v, 0, 1), bins=edges)[0] / max(len(v), 1) for name, v in series.items()}
    top = max((c.max() for c in counts.values()), default=1) or 1
    parts = [
        f'<svg width="{width}" height="{height + 30}" xmlns="http://www.w3.org/2000/svg">',
        f'<line x1="0" y1="{height}" x2="{width}" y2="{height}" stroke="#888"/>',
    ]
    for i, (name, c) in enumerate(counts.items()):
        pts = []
        for b, value in enumerate(c):
            x0, x1 = b * width / bins, (b + 1) * width / bins
            y = height - value / top * (height - 10)
            pts += [f"{x0:.1f},{y:.1f}", f"{x1:.1f},{y:.1f}"]
        colour = colours[i % len(colours)]
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{" ".join(pts)}"/>')
        parts.append(
            f'<text x="{8 + 150 * i}" y="{height + 22}" fill="{colour}" font-size="12">{html.escape(name)}</text>'
        )
    parts.append(f'<text x="{width - 60}" y="{height - 4}" font-size="10" fill="#666">reward 0..1</text></svg>')
    return "".join(parts)


def _svg_curve(values: list[float], label: str, width: int = 560, height: int = 160) -> str:
    if not values:
        return "<p>(no points logged)</p>"
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    step = width / max(len(values) - 1, 1)
    pts = " ".join(f"{i * step:.1f},{height - 10 - (v - lo) / span * (height - 20):.1f}" for i, v in enumerate(values))
    return (
        f'<svg width="{width}" height="{height + 20}" xmlns="http://www.w3.org/2000/svg">'
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{pts}"/>'
        f'<text x="4" y="{height + 14}" font-size="11">{html.escape(label)}: {values[0]:.4f} → {values[-1]:.4f}'
        f" (min {lo:.4f}, max {hi:.4f}, {len(values)} points)</text></svg>"
    )


def _stage_times(run: Path) -> list[tuple[str, float]]:
    """(stage, wall seconds since the previous stage finished), in finishing order: a stage computes before it
    publishes, so the gap between consecutive completions is its time when the run went stage after stage."""
    finished = []
    for marker in run.rglob(MARKER):
        m = json.loads(marker.read_text())
        if "finished" in m:
            finished.append((m["finished"], m.get("started", m["finished"]), str(marker.parent.relative_to(run))))
    finished.sort()
    rows, previous = [], None
    for end, start, name in finished:
        rows.append((name, end - (previous if previous is not None else start)))
        previous = end
    return rows


def _dpo_curves(run: Path) -> dict[str, dict[str, list[float]]]:
    curves = {}
    for path in sorted((run / "dpo").glob("*/history.json")):
        history = json.loads(path.read_text())
        keys = ("train/dpo_loss", "train/rewards/margins", "train/rewards/accuracies", "eval/rewards/accuracies")
        curves[path.parent.name] = {k: [h[k] for h in history if k in h] for k in keys}
    return curves


def build_report(run: Path) -> Path:
    """Write report.html and report.md into `<run>/report/` (published whole, with a marker); every section
    appears when its inputs exist. Re-run freely: it only reads."""
    md, body = ["# rlrf4rec run report", f"Run directory: `{run}`", ""], []

    table_path = run / "evaluate" / "table.json"
    if table_path.is_file():
        table = json.loads(table_path.read_text())
        head = "| variant | " + " | ".join(METRICS) + " |"
        md += [
            "## Re-ranking on test users (mean [95% bootstrap CI over users])",
            "",
            head,
            "|---|" + "---|" * len(METRICS),
        ]
        rows_html = []
        order = ["popularity", "KAR ID-only", "ID only", "history knowledge (no LLM)", "base LLM"]
        rank = {name: (order.index(name) if name in order else len(order), name) for name in table}
        for name, metrics in sorted(table.items(), key=lambda kv: rank[kv[0]]):
            cells = [f"{metrics[m][0]:.4f} [{metrics[m][1]:.4f}, {metrics[m][2]:.4f}]" for m in METRICS]
            md.append(f"| {name} | " + " | ".join(cells) + " |")
            rows_html.append(
                "<tr><th>"
                + html.escape(name)
                + "</th>"
                + "".join(
                    f"<td>{metrics[m][0]:.4f}<br><small>[{metrics[m][1]:.4f}, {metrics[m][2]:.4f}]</small></td>"
                    for m in METRICS
                )
                + "</tr>"
            )
        body.append(
            "<h2>Re-ranking on test users</h2><p>Mean over test users with bootstrap 95% intervals.</p>"
            "<table><tr><th>variant</th>"
            + "".join(f"<th>{m}</th>" for m in METRICS)
            + "</tr>"
            + "".join(rows_html)
            + "</table>"
        )
        md.append("")

    paired_path = run / "evaluate" / "paired.json"
    if paired_path.is_file():  # each row minus a baseline over the same test users, in words
        paired = json.loads(paired_path.read_text())
        lines = []
        for name, by_base in paired.items():
            for base, diffs in by_base.items():
                d, low, high, resolved = diffs["ndcg@5"]
                verdict = ("better than" if d > 0 else "worse than") if resolved else "not distinguishable from"
                lines.append(f"- {name} is {verdict} {base}: NDCG@5 {d:+.4f} [{low:+.4f}, {high:+.4f}]")
        md += ["## Paired differences on test users (NDCG@5, 95% bootstrap CI over the same users)", "", *lines, ""]
        body.append(
            "<h2>Paired differences on test users</h2><p>NDCG@5 of each row minus the baseline, per user; an "
            "interval that contains 0 is noise.</p><ul>"
            + "".join(f"<li>{html.escape(line[2:])}</li>" for line in lines)
            + "</ul>"
        )

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
            "<pre>" + html.escape("\n".join(lines)) + "</pre>"
        )

    # Written by `rlrf4rec controls`: valid users only, several seeds, paired intervals; one block per table (with
    # --backbones, one per backbone) and, when several backbones were measured, their table side by side.
    controls = sorted(p.parent for p in (run / "controls").glob("*/table.md") if (p.parent / "table.json").is_file())
    tables = {d.name: json.loads((d / "table.json").read_text()) for d in controls}
    for d in controls:
        text = (d / "table.md").read_text()
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
        from rlrf4rec.controls import backbone_table

        text = backbone_table([rows for rows in tables.values() if any("metrics" in r for r in rows)])
        md += ["## Re-ranker backbones side by side (valid users, mean of seeds)", "", text]
        body.append("<h2>Re-ranker backbones side by side</h2><pre>" + html.escape(text) + "</pre>")

    manifest_path = run / "rounds" / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        md += ["## Rounds", ""]
        body.append("<h2>Rounds</h2>")
        series = {}
        for r in manifest["rounds"]:
            rd = run / "rounds" / f"round{r['round']}"
            rewards = read_parquet(rd / "reward-train" / "rewards.parquet", S.REWARDS)
            series[f"round {r['round']} policy"] = rewards.column(S.REWARD).to_pylist()
            v = r["valid_reward"]
            line = (
                f"Round {r['round']}: {r['pairs'].get('train/pairs', 0)} train pairs; valid reward "
                f"{v['before/mean']:.4f} → {v['after/mean']:.4f}, gain {v['gain/mean']:+.4f} "
                f"(95% CI [{v['gain/ci_low']:+.4f}, {v['gain/ci_high']:+.4f}], {v['users']} users)"
            )
            md.append(f"- {line}")
            body.append(f"<p>{html.escape(line)}</p>")
            body.append(_examples(rd / "pairs" / "pairs_train.parquet", md))
        body.append("<h3>Reward distribution of sampled texts (train users)</h3>" + _svg_histograms(series))
        md += ["", "## Lineage", "", "```json", json.dumps(manifest, indent=1)[:4000], "```", ""]
        body.append("<h2>Lineage</h2><pre>" + html.escape(json.dumps(manifest, indent=1)) + "</pre>")

    for name, curve in _dpo_curves(run).items():
        body.append(f"<h3>DPO {html.escape(name)}</h3>" + "".join(_svg_curve(v, k) for k, v in curve.items()))
        loss = curve["train/dpo_loss"]
        if loss:
            md.append(f"- DPO {name}: loss {loss[0]:.4f} → {loss[-1]:.4f} over {len(loss)} logged steps")

    times = _stage_times(run)
    md += ["", "## Time per stage (wall seconds since the previous stage finished)", "", "| stage | seconds |",
           "|---|---|"]
    md += [f"| {name} | {seconds:.1f} |" for name, seconds in times]
    body.append(
        "<h2>Time per stage</h2><table>"
        + "".join(f"<tr><td>{html.escape(n)}</td><td>{s:.1f} s</td></tr>" for n, s in times)
        + "</table>"
    )

    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}pre{background:#f6f6f6;padding:8px;"
        "overflow:auto;font-size:11px}blockquote{border-left:3px solid #ccc;margin:4px 0;padding-left:8px}"
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>rlrf4rec report</title><style>{style}"
        f"</style></head><body><h1>rlrf4rec run report</h1><p><code>{html.escape(str(run))}</code></p>"
        + "".join(body)
        + "</body></html>"
    )
    out = run / "report"
    with stage_output(out, f"report-{time.time()}", None) as (tmp, stats):  # made from the run's artifacts only
        (tmp / "report.html").write_text(page)
        (tmp / "report.md").write_text("\n".join(md) + "\n")
        stats["sections"] = len(body)
    return out


def text_quality(run: Path) -> list[dict]:
    """Per complete generation stage under `run`: policy, rows and the share of each quality flag."""
    from rlrf4rec.artifacts import read_marker

    rows = []
    for path in sorted(run.rglob("generations.parquet")):
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
    parts = ["<h4>Example pairs (largest margins)</h4>"]
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
    return "".join(parts)
