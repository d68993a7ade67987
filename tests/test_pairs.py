import math

import pytest

from rlrf4rec.core import schema as S
from rlrf4rec.stages.pairs import (
    DROP_MARGIN,
    DROP_SINGLE,
    DROP_TIE,
    Candidate,
    Pair,
    pairs_table,
    select_pair,
    select_pairs,
)


def C(idx: int, reward: float) -> Candidate:
    return Candidate(idx, f"text {idx}", reward)


def test_best_and_worst_with_lower_index_on_ties():
    pair = select_pair("u", [C(2, 0.5), C(0, 0.9), C(1, 0.1), C(3, 0.9), C(4, 0.1)], min_margin=0.0)
    assert isinstance(pair, Pair)
    assert (pair.chosen.sample_idx, pair.rejected.sample_idx) == (0, 1)
    assert pair.margin == pytest.approx(0.8)


@pytest.mark.parametrize(
    ("candidates", "min_margin", "reason"),
    [
        ([C(0, 0.4)], 0.0, DROP_SINGLE),
        ([C(0, 0.4), C(1, 0.4), C(2, 0.4)], 0.0, DROP_TIE),
        ([C(0, 0.40), C(1, 0.42)], 0.05, DROP_MARGIN),
    ],
)
def test_dropped_users(candidates, min_margin, reason):
    assert select_pair("u", candidates, min_margin) == reason


def test_nan_reward_is_an_error_naming_user_and_sample():
    with pytest.raises(ValueError, match=r"reward of user 'u7' sample 1 is nan"):
        select_pair("u7", [C(0, 0.3), C(1, math.nan)], 0.0)


def test_stats_and_trl_table():
    candidates = {
        "b": [C(0, 0.2), C(1, 0.6)],
        "a": [C(0, 0.9), C(1, 0.3), C(2, 0.5)],
        "c": [C(0, 0.5), C(1, 0.5)],
        "d": [C(0, 0.1)],
    }
    pairs, stats = select_pairs(candidates, min_margin=0.01)
    assert [p.user_id for p in pairs] == ["a", "b"]
    assert stats == {
        "users": 4,
        "users_with_pairs": 2,
        "pairs": 2,
        f"dropped/{DROP_SINGLE}": 1,
        f"dropped/{DROP_TIE}": 1,
        f"dropped/{DROP_MARGIN}": 0,
        "margin/mean": pytest.approx(0.5),
        "margin/min": pytest.approx(0.4),
        "margin/p50": pytest.approx(0.5),
        "margin/max": pytest.approx(0.6),
    }
    prompt = [{"role": "system", "content": "s"}, {"role": "user", "content": "history"}]
    table = pairs_table(pairs, {"a": prompt, "b": prompt}, {"a": "train", "b": "valid"}, "base", 0)
    assert table.schema == S.PAIRS
    row = table.to_pylist()[0]
    assert row[S.PROMPT] == prompt
    assert row[S.CHOSEN] == [{"role": "assistant", "content": "text 0"}]
    assert row[S.REJECTED] == [{"role": "assistant", "content": "text 1"}]
    assert (row[S.CHOSEN_REWARD], row[S.REJECTED_REWARD], row[S.ROUND], row[S.SPLIT]) == (0.9, 0.3, 0, "train")


def test_all_strategy_keeps_every_pair_past_the_margin_in_sample_order():
    candidates = {
        # gaps: 0>1 0.5, 0>2 0.3, 2>1 0.2, 3>1 0.205, 0>3 0.295, 2 vs 3 0.005 (below the margin), 4 ties 2
        "a": [C(0, 0.9), C(1, 0.4), C(2, 0.6), C(3, 0.605), C(4, 0.6)],
        "b": [C(0, 0.5), C(1, 0.5)],  # all tied
        "c": [C(0, 0.5), C(1, 0.505)],  # the widest gap is below the margin
    }
    pairs, stats = select_pairs(candidates, min_margin=0.01, strategy="all")
    assert [(p.user_id, p.chosen.sample_idx, p.rejected.sample_idx) for p in pairs] == [
        ("a", 0, 1), ("a", 0, 2), ("a", 0, 3), ("a", 0, 4), ("a", 2, 1), ("a", 3, 1), ("a", 4, 1),
    ]
    assert all(p.margin >= 0.01 for p in pairs)
    dropped = (stats[f"dropped/{DROP_TIE}"], stats[f"dropped/{DROP_MARGIN}"])
    assert (stats["users_with_pairs"], stats["pairs"], *dropped) == (1, 7, 1, 1)
    # best_worst on the same rewards: one pair per user, the widest.
    best_worst, _ = select_pairs(candidates, min_margin=0.01)
    assert [(p.user_id, p.chosen.sample_idx, p.rejected.sample_idx) for p in best_worst] == [("a", 0, 1)]
