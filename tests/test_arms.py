import dataclasses

import pytest

from rlrf4rec.core import schema as S
from rlrf4rec.core.config import load_config
from rlrf4rec.stages.arms import (
    Arm,
    arm_pairs,
    best_texts,
    dpo_steps,
    noise_for_spearman,
    parse_arms,
    table_markdown,
)
from rlrf4rec.stages.pairs import Candidate, Pair, pairs_table


def pairs(n: int):
    """n pairs of n users, chosen reward 1 + i/100 (sample 0) over rejected 0 (sample 1)."""
    made = [Pair(f"u{i:03d}", Candidate(0, f"good {i}", 1 + i / 100), Candidate(1, f"bad {i}", 0.0)) for i in range(n)]
    prompts = {p.user_id: [{"role": "user", "content": f"history of {p.user_id}"}] for p in made}
    return pairs_table(made, prompts, {p.user_id: "train" for p in made}, "start", 0)


def test_arm_takes_a_seeded_nested_subset_of_the_pairs():
    table = pairs(40)
    small, large = arm_pairs(table, Arm(10), seed=7), arm_pairs(table, Arm(25), seed=7)
    assert small.num_rows == 10 and large.num_rows == 25
    users_small = small.column(S.USER_ID).to_pylist()
    assert len(set(users_small)) == 10
    assert users_small == large.column(S.USER_ID).to_pylist()[:10]  # nested: the curve's points share their pairs
    assert users_small != table.column(S.USER_ID).to_pylist()[:10]  # shuffled, not the file's first rows
    assert arm_pairs(table, Arm(10), seed=8).column(S.USER_ID).to_pylist() != users_small
    assert small.column(S.CHOSEN_REWARD).to_pylist() > small.column(S.REJECTED_REWARD).to_pylist()  # none flipped
    with pytest.raises(ValueError, match="41 train pairs asked, 40 exist"):
        arm_pairs(table, Arm(41), seed=7)


def test_random_label_arm_swaps_exactly_a_seeded_half_and_keeps_each_pair_whole():
    table = pairs(30)
    clean = {r[S.USER_ID]: r for r in arm_pairs(table, Arm(30), seed=3).to_pylist()}
    noisy = arm_pairs(table, Arm(30, 0.5), seed=3).to_pylist()
    swapped = [r[S.USER_ID] for r in noisy if r[S.CHOSEN_REWARD] < r[S.REJECTED_REWARD]]
    assert len(swapped) == 15
    for r in noisy:
        c = clean[r[S.USER_ID]]
        if r[S.USER_ID] in swapped:  # messages, sample ids and rewards all swap; the margin turns negative
            assert r[S.CHOSEN] == c[S.REJECTED] and r[S.REJECTED] == c[S.CHOSEN]
            assert (r[S.CHOSEN_SAMPLE_IDX], r[S.REJECTED_SAMPLE_IDX]) == (1, 0)
            assert r[S.REWARD_MARGIN] == pytest.approx(-c[S.REWARD_MARGIN])
        else:
            assert r == c
        assert r[S.PROMPT] == c[S.PROMPT]
    # A smaller flip share swaps a subset of a larger one's pairs; another seed swaps another half.
    fewer = arm_pairs(table, Arm(30, 0.2), seed=3).to_pylist()
    swapped_fewer = {r[S.USER_ID] for r in fewer if r[S.CHOSEN_REWARD] < r[S.REJECTED_REWARD]}
    assert len(swapped_fewer) == 6 and swapped_fewer < set(swapped)
    other = arm_pairs(table, Arm(30, 0.5), seed=4).to_pylist()
    assert {r[S.USER_ID] for r in other if r[S.CHOSEN_REWARD] < r[S.REJECTED_REWARD]} != set(swapped)


def test_parse_arms_and_names():
    arms = parse_arms("50,250,700", "0.28,0.5", None)
    assert [a.name for a in arms] == ["n50-flip00", "n250-flip00", "n700-flip00", "n250-flip28", "n250-flip50"]
    assert arms[-1].flipped == 125
    assert [a.pairs for a in parse_arms("50", "0.5", 30)] == [50, 30]
    with pytest.raises(ValueError, match="comma-separated positive numbers, or all"):
        parse_arms("50,many", "", None)
    with pytest.raises(ValueError, match="flip=1.5"):
        parse_arms("50", "1.5", None)


def test_noise_for_spearman_matches_the_gaussian_copula():
    assert noise_for_spearman(1.0) == pytest.approx(0.0, abs=1e-6)
    assert noise_for_spearman(0.0) == pytest.approx(0.5)
    # Spearman 0.62 -> Pearson 0.638 -> Kendall 0.441 -> 28% of pairs flipped; 0.26 -> 41%
    assert noise_for_spearman(0.62) == pytest.approx(0.2798, abs=1e-4)
    assert noise_for_spearman(0.26) == pytest.approx(0.4125, abs=1e-4)


def test_dpo_steps_count_partial_batches(tmp_path):
    cfg = load_config("configs/ml100k-cpu.yaml")  # 2 workers x 1 pair x 2 accumulation = 4 pairs a step
    assert dpo_steps(cfg, 48) == 12
    assert dpo_steps(cfg, 50) == 13  # 25 micro-batches: 12 full accumulations and a partial one
    assert dpo_steps(dataclasses.replace(cfg, dpo=dataclasses.replace(cfg.dpo, epochs=2)), 50) == 26
    assert dpo_steps(dataclasses.replace(cfg, dpo=dataclasses.replace(cfg.dpo, max_steps=5)), 50) == 5


def test_table_reports_each_arm_against_the_start_policy():
    rows = [
        {"arm": "start", "train_pairs": 0, "flipped": 0, "off_topic": 0.1, "truncated": 0.5, "valid/before/mean": 0.2},
        {
            "arm": "n50-flip00",
            "train_pairs": 50,
            "flipped": 0,
            "off_topic": 0.05,
            "truncated": 0.4,
            "steps": 13,
            "train/dpo_loss_first": 0.6931,
            "train/dpo_loss_last": 0.61,
            "train/rewards/accuracies_last": 0.75,
            "pairs/eval": 120,
            "eval/rewards/accuracies": 0.64,
            "eval/rewards/margins": 0.05,
            "valid/after/mean": 0.25,
            "valid/gain/mean": 0.05,
            "valid/gain/ci_low": 0.01,
            "valid/gain/ci_high": 0.09,
            "valid/other_user/mean": 0.21,
            "train/fit_wall_s": 512.4,
        },
        {
            "arm": "n50-grpo",
            "train_pairs": 50,
            "flipped": 0,
            "off_topic": 0.02,
            "truncated": 0.9,
            "steps": 6,
            "prompts": 24,
            "num_generations": 4,
            **{f"train/reward_{k}": v for k, v in (("first", 0.01), ("last", 0.08), ("mean", 0.05))},
            **{f"train/frac_reward_zero_std_{k}": v for k, v in (("first", 0.5), ("last", 0.25), ("mean", 0.3))},
            "train/kl_last": 0.0123,
            "train/completions/mean_length_mean": 61.25,
            "train/step_time_s": 24.04,
            "train/fit_wall_s": 498.6,
            "valid/after/mean": 0.3,
            "valid/gain/mean": 0.1,
            "valid/gain/ci_low": 0.02,
            "valid/gain/ci_high": 0.18,
            **{f"vs_dpo/gain/{k}": v for k, v in (("mean", 0.05), ("ci_low", -0.01), ("ci_high", 0.11))},
        },
    ]
    md = table_markdown(rows, "synthetic-genres").splitlines()
    assert md[0].startswith("reward: synthetic-genres")
    assert md[4] == "| start | 0 | 0 | - | - | - | - | - | - | 0.2000 | - | - | 0.100 | 0.500 | - |"
    assert md[5] == (
        "| n50-flip00 | 50 | 0 | 13 | 0.6931 -> 0.6100 | 0.75 | 120 | 0.640 | +0.0500 | 0.2500 "
        "| +0.0500 [+0.0100, +0.0900] | 0.2100 | 0.050 | 0.400 | 512 |"
    )
    grpo = [line for line in md if line.startswith("| n50-grpo")]
    assert grpo[0] == (
        "| n50-grpo | 50 | 0 | 6 | - | - | - | - | - | 0.3000 | +0.1000 [+0.0200, +0.1800] | - | 0.020 | 0.900 | 499 |"
    )
    assert grpo[1] == (
        "| n50-grpo | 24 | 6 | 4 | 0.0100 -> 0.0800 (0.0500) | 0.50 -> 0.25 (0.30) | 0.0123 | 61.2 | - | 24.0 | 499 "
        "| +0.0500 [-0.0100, +0.1100] | - |"
    )


def test_sft_best_arms_distil_each_users_best_text():
    arms = parse_arms("50,250", "0.5", None, "250")
    assert [a.name for a in arms][-2:] == ["n250-flip50", "n250-sft-best"]
    with pytest.raises(ValueError, match="sft-best / grpo without flips"):
        Arm(10, 0.5, kind="sft-best")
    with pytest.raises(ValueError, match="kind='ppo'"):
        Arm(10, kind="ppo")
    candidates = {
        "a": [Candidate(0, "a0", 0.1), Candidate(1, "a1", 0.4), Candidate(2, "a2", 0.4)],
        "b": [Candidate(0, "b0", -0.2), Candidate(1, "b1", -0.5)],
        "c": [Candidate(0, "c0", 0.9)],
    }
    assert best_texts(candidates, {"a", "b"}) == {"a": "a1", "b": "b0"}  # a tie goes to the lower sample


def test_the_judge_is_the_reward_models_next_seeds_and_never_one_that_built_a_pair(tmp_path, monkeypatch):
    """reward.ensemble = 2 scores with seeds +0, +1; reward.judge_ensemble = 3 judges with +2, +3, +4, siblings named
    as the ensemble's; no judge with 0 or a synthetic reward (no recommender)."""
    from rlrf4rec.stages import reward, train

    trained = []

    def fake_train(cfg, variant, data_dir, knowledge, held_out=()):
        trained.append((cfg.seed, variant))
        return tmp_path / variant

    monkeypatch.setattr(train, "run_recommender", fake_train)
    monkeypatch.setattr(reward, "require_marker", lambda *a: {"stats": {"knowledge": ["user"], "held_out_users": 0}})
    cfg = load_config("configs/ml100k-cpu.yaml", [f"--run_dir={tmp_path}", "--reward.metric=pairwise"])
    cfg = dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, ensemble=2, judge_ensemble=3))
    base = cfg.layout.recommender("base")
    scorer = reward.reward_scorer(cfg, base)
    judge = reward.reward_judge(cfg, base)
    assert [p.name for p in scorer] == ["base", "base-seed1"]
    assert [p.name for p in judge] == ["base-seed2", "base-seed3", "base-seed4"]
    assert trained == [(cfg.seed + 1, "base-seed1"), (cfg.seed + 2, "base-seed2"), (cfg.seed + 3, "base-seed3"),
                       (cfg.seed + 4, "base-seed4")]  # fmt: skip
    assert (
        reward.reward_judge(dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, judge_ensemble=0)), base)
        == []
    )
    synthetic = dataclasses.replace(cfg.reward, metric="synthetic-genres")
    assert reward.reward_judge(dataclasses.replace(cfg, reward=synthetic), base) == []
    monkeypatch.setattr(reward, "require_marker", lambda *a: {"stats": {"knowledge": [], "held_out_users": 0}})
    with pytest.raises(ValueError, match="reward.judge_ensemble=3 trains seed siblings.*--reward.judge_ensemble=0"):
        reward.reward_judge(cfg, base)


def test_each_arm_is_compared_with_random_label_dpo_of_its_own_pair_count(monkeypatch):
    from rlrf4rec.stages import arms as A
    from rlrf4rec.stages import reward

    calls = []

    def fake_compare(before, after, num_samples, seed):
        calls.append((before, after))
        return {"gain/mean": 0.5}

    monkeypatch.setattr(reward, "compare_policies", fake_compare)
    arms = parse_arms("100,400", "0.5", 400, "400")  # n100, n400, n400-flip50, n400-sft-best
    judged = {a.name: f"judge/{a.name}" for a in arms}
    rows = [{"arm": "start"}] + [{"arm": a.name} for a in arms]
    cfg = load_config("configs/ml100k-cpu.yaml")
    A._against_random_labels(cfg, rows, arms, judged)
    assert calls == [("judge/n400-flip50", "judge/n400-flip00"), ("judge/n400-flip50", "judge/n400-sft-best")]
    assert [r.get("judge_vs_random/gain/mean") for r in rows] == [None, None, 0.5, None, 0.5]


def test_each_grpo_arm_is_compared_with_clean_dpo_on_the_same_pairs_users(monkeypatch):
    from rlrf4rec.stages import arms as A
    from rlrf4rec.stages import reward

    calls = []

    def fake_compare(before, after, num_samples, seed):
        calls.append((before, after))
        return {"gain/mean": 0.25}

    monkeypatch.setattr(reward, "compare_policies", fake_compare)
    arms = parse_arms("100,400", "0.5", 400, "", "400,200")  # n100, n400, n400-flip50, n400-grpo, n200-grpo
    rewarded = {a.name: f"reward/{a.name}" for a in arms}
    judged = {a.name: f"judge/{a.name}" for a in arms if a.name != "n400-flip00"}
    rows = [{"arm": "start"}] + [{"arm": a.name} for a in arms]
    A._on_policy_against_offline(load_config("configs/ml100k-cpu.yaml"), rows, arms, rewarded, judged)
    assert calls == [("reward/n400-flip00", "reward/n400-grpo")]  # no clean DPO arm at 200; no judged DPO arm
    assert [r.get("vs_dpo/gain/mean") for r in rows] == [None, None, None, None, 0.25, None]
    assert not any("judge_vs_dpo/gain/mean" in r for r in rows)


def test_grpo_arms_train_on_the_users_of_the_same_pairs():
    arms = parse_arms("50,250", "0.5", None, "250", "250")
    assert [a.name for a in arms][-3:] == ["n250-flip50", "n250-sft-best", "n250-grpo"]
    assert arms[-1].kind == "grpo" and arms[-1].flipped == 0
    with pytest.raises(ValueError, match="grpo without flips"):
        Arm(250, 0.5, kind="grpo")
    with pytest.raises(ValueError, match="--grpo 'x'"):
        parse_arms("50", "", None, "", "x")


def test_all_pairs_resolve_to_the_count_the_pairs_stage_kept():
    from rlrf4rec.stages.arms import resolve_all

    arms = resolve_all(parse_arms("all", "0.5", None, "all", "all"), 276)
    assert [a.name for a in arms] == ["n276-flip00", "n276-flip50", "n276-sft-best", "n276-grpo"]
    assert arms[1].flipped == 138
    with pytest.raises(ValueError, match="positive numbers, or all"):
        parse_arms("0", "", None)
