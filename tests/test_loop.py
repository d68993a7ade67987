"""Round bookkeeping on hand-made stage outputs: the pairs stage's candidates per user, the reward stage's paired
policy comparison, and the rounds manifest as the loop's readers see it."""

import pyarrow as pa
import pytest
from synthetic import generations_table as _generations
from synthetic import stage_with as _stage

from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import read_manifest
from rlrf4rec.core.layout import GENERATIONS, REWARDS, RunLayout
from rlrf4rec.stages.pairs import rewarded_candidates
from rlrf4rec.stages.reward import compare_policies


def _rewards(rows):
    n = len(rows)
    return pa.table(
        {
            S.USER_ID: [r[0] for r in rows],
            S.SAMPLE_IDX: pa.array([r[1] for r in rows], pa.int32()),
            S.SPLIT: ["train"] * n,
            S.POLICY_VERSION: ["base"] * n,
            S.REWARD: [r[2] for r in rows],
        },
        schema=S.REWARDS,
    )


def test_candidates_skip_empty_texts_and_keep_rewards(tmp_path):
    gens = _stage(
        tmp_path / "g",
        GENERATIONS,
        _generations(
            [
                ("a", 0, "a0", []),
                ("a", 1, "", ["empty"]),
                ("a", 2, "a2", []),
                ("b", 0, "b0", []),
                ("b", 1, "b1", []),
            ]
        ),
        S.GENERATIONS,
    )
    rews = _stage(
        tmp_path / "r",
        REWARDS,
        _rewards(
            [
                ("a", 0, 0.2),
                ("a", 1, 0.9),
                ("a", 2, 0.5),
                ("b", 0, 0.4),
                ("b", 1, 0.4),
            ]
        ),
        S.REWARDS,
    )
    got = {u: [(c.sample_idx, c.text, c.reward) for c in cs] for u, cs in rewarded_candidates(gens, rews).items()}
    assert got == {"a": [(0, "a0", 0.2), (2, "a2", 0.5)], "b": [(0, "b0", 0.4), (1, "b1", 0.4)]}  # empty's 0.9 out


def test_compare_policies_pairs_users_and_bootstraps_the_gain(tmp_path):
    before = _stage(
        tmp_path / "before", REWARDS, _rewards([(u, i, 0.5) for u in "abcd" for i in range(2)]), S.REWARDS
    )
    after = _stage(
        tmp_path / "after",
        REWARDS,
        _rewards([(u, i, 0.5 + 0.1 * (i + 1)) for u in "abce" for i in range(2)]),
        S.REWARDS,
    )
    out = compare_policies(before, after, num_samples=200, seed=0)
    assert out["users"] == 3  # d and e are not in both
    assert out["before/mean"] == pytest.approx(0.5) and out["after/mean"] == pytest.approx(0.65)
    assert out["gain/mean"] == pytest.approx(0.15) and out["gain/ci_low"] == pytest.approx(0.15)
    with pytest.raises(ValueError, match="share no user"):
        compare_policies(
            before,
            _stage(tmp_path / "x", REWARDS, _rewards([("z", 0, 0.1)]), S.REWARDS),
            num_samples=200,
            seed=0,
        )


def test_read_manifest_none_before_a_round_and_refuses_an_unfinished_loop(tmp_path):
    layout = RunLayout(tmp_path)
    assert read_manifest(layout) is None
    with pytest.raises(FileNotFoundError, match="rlrf4rec loop"):
        read_manifest(layout, rounds=2)
    layout.rounds.mkdir(parents=True)
    layout.manifest.write_text('{"rounds": [{"round": 0}]}')
    assert read_manifest(layout)["rounds"] == [{"round": 0}]
    assert read_manifest(layout, rounds=1)["rounds"][0]["round"] == 0
    with pytest.raises(ValueError, match="1 of loop.rounds=2 rounds are complete"):
        read_manifest(layout, rounds=2)
