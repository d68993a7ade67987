import re

import pytest

from rlrf4rec.core import charts


@pytest.mark.parametrize(
    "lo, hi, count, expected",
    [
        (0.0, 1.0, 5, [0.0, 0.25, 0.5, 0.75, 1.0]),
        (0.237, 0.88, 6, [0.2, 0.4, 0.6, 0.8, 1.0]),
        (-0.063, 0.071, 5, [-0.1, -0.05, 0.0, 0.05, 0.1]),
        (0.0, 536.4, 5, [0.0, 200.0, 400.0, 600.0]),
        (3.0, 3.0, 5, [2.5, 2.75, 3.0, 3.25, 3.5]),  # one value: widened around it
    ],
)
def test_ticks_are_round_and_cover_the_range(lo, hi, count, expected):
    assert charts.ticks(lo, hi, count) == pytest.approx(expected)


def test_fmt_is_short():
    assert [charts.fmt(v) for v in (0.0, -0.05, 0.6353421, 413.6679, 1234.5, 0.00012)] == [
        "0",
        "-0.05",
        "0.6353",
        "413.6679",
        "1234",
        "0.00012",
    ]


def test_histogram_counts_and_legend():
    svg = charts.histogram("h", "T", "D", {"a": [0.1, 0.1, 0.1, 0.9], "b": []}, "reward", bins=10)
    assert "a (n=4), mean 0.3" in svg and "b (n=0)" in svg
    y_ticks = re.findall(r'text-anchor="end">(\d+)</text>', svg)
    assert y_ticks == ["0", "1", "2", "3"]  # the count axis reaches the tallest bin, three values at 0.1
    assert svg.count('class="series"') == 2


def test_forest_colours_intervals_by_their_sign_against_zero():
    svg = charts.forest(
        "f",
        "T",
        "D",
        ["group", "up", "down", "noise"],
        [("diff", [None, (0.1, 0.05, 0.2), (-0.1, -0.2, -0.01), (0.0, -0.1, 0.1)])],
        zero_line=True,
    )
    strokes = re.findall(r'<g class="interval"><title>([^:]+):[^<]*</title><line [^>]*stroke="([^"]+)"', svg)
    assert strokes == [("up", charts.BETTER), ("down", charts.WORSE), ("noise", charts.NOISE)]
    assert 'class="zero-line"' in svg and 'font-weight="bold">group</text>' in svg


def test_bars_and_lines_label_their_axes():
    bars = charts.bars("b", "T", "D", [("data", 0.1), ("dpo", 283.8)], "wall seconds", unit=" s")
    assert "283.8 s" in bars and 'class="axis-label">wall seconds</text>' in bars
    lines = charts.lines("l", "T", "D", [("DPO loss", {"train": [(1, 0.69), (2, 0.6)]})], "optimizer step")
    assert re.findall(r'class="axis-label"[^>]*>([^<]+)</text>', lines) == ["DPO loss", "optimizer step"]
    assert "train (2 points, last 0.6)" in lines
