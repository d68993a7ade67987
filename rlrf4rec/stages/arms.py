"""DPO arms on one policy's pairs: does this DPO stage learn what the reward asks, from how many pairs, through how much
label noise? (`rlrf4rec arms`)

One start policy (models.llm, or its warm start with loop.init = sft) writes N texts for `loop.train_users` train users
and `loop.eval_users` valid users; the configured reward (`reward.metric`; `synthetic-genres` is the RL loop's
positive control, learnable by construction and needing no recommender) scores them; the pairs stage turns them into
train and held-out (valid) pairs. Each arm then trains DPO from the start policy on a slice of the train pairs:
- `pairs`: the first n of one seeded order of the train pairs, so every smaller arm's pairs are in every larger one
  (a learning curve over the pair count),
- `flip`: exactly round(flip * n) of those, a seeded subset, with chosen and rejected swapped (label noise; flip 0.5
  is random-label DPO, the update's null), the subsets nested as flip grows.
Per arm: held-out pair accuracy on the valid pairs (true labels, never trained on), the DPO log's train values, and the
arm's policy's N texts for the same valid users, scored by the same reward: mean reward gain over the start policy
with a paired bootstrap interval over users, and the share of its texts flagged off topic or cut at the token cap.
Everything is a stage directory (generations, rewards, pairs, one DPO per arm), so a killed run resumes at the first
incomplete arm; `<run>/arms/<name>/table.json` and `table.md` hold the table. Sequences other stages' functions only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import read_marker, read_parquet, require_marker, write_json, write_parquet
from rlrf4rec.core.config import ConfigError, RunConfig
from rlrf4rec.core.layout import ARM_PAIRS, GENERATIONS, POLICY_MODEL, TABLE_JSON, TABLE_MD, pairs_file
from rlrf4rec.core.metrics import SYNTHETIC_METRICS
from rlrf4rec.core.policy_fit import FIT_WALL
from rlrf4rec.core.protocol import stable_seed
from rlrf4rec.core.stage import Option, Stage, on_ray

log = logging.getLogger(__name__)

START = "start"  # the start policy's generations are `<run>/generations/start-{train,valid}/`


DPO, SFT_BEST, GRPO = "dpo", "sft-best", "grpo"


ALL = 0  # an arm's pair count "all": every train pair the pairs stage kept (resolved once they exist)


@dataclass(frozen=True)
class Arm:
    pairs: int  # train pairs: the first `pairs` of one seeded order of the train pairs (ALL: every one)
    flip: float = 0.0  # share of them with chosen and rejected swapped (exactly round(flip * pairs), seeded)
    # dpo: DPO on those pairs; sft-best: SFT on the best of N texts of the same pairs' users (best-of-N distillation);
    # grpo: on-policy GRPO on the same pairs' users' prompts, every completion rewarded by the same reward model
    kind: str = DPO

    def __post_init__(self) -> None:
        if self.pairs < 0:
            raise ValueError(f"arm pairs={self.pairs}: use a positive number of train pairs, or all")
        if not 0 <= self.flip <= 1:
            raise ValueError(f"arm flip={self.flip}: use a share of flipped pairs in [0, 1]")
        if self.kind not in (DPO, SFT_BEST, GRPO) or (self.kind != DPO and self.flip):
            raise ValueError(f"arm kind={self.kind!r}, flip={self.flip}: use dpo, or sft-best / grpo without flips")

    @property
    def flipped(self) -> int:
        return round(self.flip * self.pairs)

    @property
    def name(self) -> str:
        if self.kind != DPO:
            return f"n{self.pairs}-{self.kind}"
        return f"n{self.pairs}-flip{round(self.flip * 100):02d}"


def parse_arms(pair_counts: str, flips: str, flip_pairs: int | None, sft_best: str = "", grpo: str = "") -> list[Arm]:
    """`--pairs 50,250,700 --flips 0.28,0.5 --flip-pairs 250 --sft-best 250 --grpo 250` -> clean DPO arms at every
    count, the flip arms at `flip_pairs` (default: the middle count), then SFT-on-best and GRPO arms on the users of
    those counts."""

    def count(c: str) -> int:
        if c.strip() == "all":
            return ALL
        if (n := int(c)) == ALL:
            raise ValueError("0 pairs")
        return n

    try:
        counts = [count(c) for c in pair_counts.split(",") if c.strip()]
        shares = [float(f) for f in flips.split(",") if f.strip()]
        sft = [count(c) for c in sft_best.split(",") if c.strip()]
        on_policy = [count(c) for c in grpo.split(",") if c.strip()]
    except ValueError as e:
        raise ValueError(
            f"--pairs {pair_counts!r} / --flips {flips!r} / --sft-best {sft_best!r} / --grpo {grpo!r}: use "
            f"comma-separated positive numbers, or all ({e})"
        ) from None
    if not counts:
        raise ValueError("--pairs: name at least one train pair count, e.g. 50,250,700")
    at = flip_pairs if flip_pairs is not None else sorted(counts)[len(counts) // 2]
    extra = [Arm(n, kind=SFT_BEST) for n in sft] + [Arm(n, kind=GRPO) for n in on_policy]
    return [Arm(n) for n in counts] + [Arm(at, f) for f in shares if f > 0] + extra


def resolve_all(arms: Sequence[Arm], pairs: int) -> list[Arm]:
    """Arms asking for all train pairs get the count the pairs stage kept (a flip arm its exact share of them)."""
    return [dataclasses.replace(a, pairs=pairs) if a.pairs == ALL else a for a in arms]


def noise_for_spearman(rho_s: float) -> float:
    """The pair flip probability of a reward whose agreement with the true one is Spearman `rho_s`, under a Gaussian
    copula: Pearson r = 2 sin(pi rho_s / 6), Kendall tau = 2 arcsin(r) / pi, P(flip) = (1 - tau) / 2."""
    r = 2 * math.sin(math.pi * rho_s / 6)
    return (1 - 2 * math.asin(r) / math.pi) / 2


# --------------------------------------------------------------------------------------------------- pairs (pure)


def swap_labels(pairs: pa.Table, flip: np.ndarray) -> pa.Table:
    """`pairs` (schema.PAIRS) with chosen and rejected (messages, sample ids, rewards) swapped where `flip`; the margin
    is chosen minus rejected reward as always, so a swapped pair's is negative."""
    mask = pa.array(flip, pa.bool_())
    columns = {name: pairs.column(name) for name in pairs.column_names}
    for a, b in (
        (S.CHOSEN, S.REJECTED),
        (S.CHOSEN_SAMPLE_IDX, S.REJECTED_SAMPLE_IDX),
        (S.CHOSEN_REWARD, S.REJECTED_REWARD),
    ):
        columns[a], columns[b] = (
            pc.if_else(mask, pairs.column(b), pairs.column(a)),
            pc.if_else(mask, pairs.column(a), pairs.column(b)),
        )
    columns[S.REWARD_MARGIN] = pc.subtract(columns[S.CHOSEN_REWARD], columns[S.REJECTED_REWARD])
    return pa.table(columns, schema=pairs.schema)


def arm_pairs(pairs: pa.Table, arm: Arm, seed: int) -> pa.Table:
    """The arm's train pairs: the first `arm.pairs` rows of a seeded permutation of `pairs` (nested across counts),
    exactly `arm.flipped` of them swapped (the first of a second seeded permutation: nested across flip shares)."""
    if arm.pairs > pairs.num_rows:
        raise ValueError(
            f"arm {arm.name}: {arm.pairs} train pairs asked, {pairs.num_rows} exist; lower the count or raise "
            "loop.train_users / generate.num_samples (or use pairs.strategy: all)"
        )
    order = np.random.default_rng(stable_seed(seed, "arm-order")).permutation(pairs.num_rows)[: arm.pairs]
    subset = pairs.take(pa.array(order))
    flip = np.zeros(arm.pairs, dtype=bool)
    flip[np.random.default_rng(stable_seed(seed, "arm-flip", arm.pairs)).permutation(arm.pairs)[: arm.flipped]] = True
    return swap_labels(subset, flip)


def best_texts(candidates: dict[str, list], users: set[str]) -> dict[str, str]:
    """user -> the text with the highest reward among its N (pairs.Candidate lists; the lowest sample on ties)."""
    return {
        u: max(cands, key=lambda c: (c.reward, -c.sample_idx)).text for u, cands in candidates.items() if u in users
    }


def dpo_steps(cfg: RunConfig, pairs: int) -> int:
    """Optimizer steps of DPO over `pairs` train pairs: dpo.max_steps, or dpo.epochs passes (a last partial batch and
    a last partial accumulation each still make a step)."""
    dc = cfg.dpo
    micro_batches = math.ceil(pairs / (dc.num_workers * dc.per_device_batch_size))
    return dc.max_steps or math.ceil(micro_batches / dc.grad_accum) * dc.epochs


# --------------------------------------------------------------------------------------------------- the table


def _share(stats: dict, flag: str) -> float:
    return stats.get(f"flag/{flag}", 0) / max(stats.get("rows", 0), 1)


GRPO_COUNTS = ("steps", "prompts", "num_generations")  # fit stats (besides train/ eval/ pairs/) that a row keeps


def arm_row(arm: Arm | None, dpo: dict | None, comparison: dict | None, gen_stats: dict) -> dict:
    """One table row: the arm (None: the start policy), its DPO stats, its valid reward and texts."""
    row: dict = {
        "arm": arm.name if arm else START,
        "train_pairs": arm.pairs if arm else 0,
        "flipped": arm.flipped if arm else 0,
        "off_topic": _share(gen_stats, "off_topic"),
        "truncated": _share(gen_stats, "truncated"),
        "completion_tokens_mean": gen_stats.get("completion_tokens_mean"),
    }
    if dpo is not None:
        row.update({k: dpo[k] for k in sorted(dpo) if k.startswith(("train/", "eval/", "pairs/")) or k in GRPO_COUNTS})
    if comparison is not None:
        row.update({f"valid/{k}": v for k, v in comparison.items()})
    return row


def _num(x, fmt: str = "{:+.4f}") -> str:
    return "-" if x is None else fmt.format(x)


def table_markdown(rows: Sequence[dict], metric: str) -> str:
    lines = [
        f"reward: {metric}; held-out pairs: the valid users' (true labels, never trained on)",
        "",
        "| arm | train pairs | flipped | DPO steps | train loss first -> last | train pair acc. last | held-out pairs "
        "| held-out pair acc. | held-out margin | valid reward | gain over start [95% CI] | with another user's lists "
        "| off topic | cut at cap | fit wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "train_pairs" not in r:  # the popularity row of the test column only
            continue
        lines.append(
            "| "
            + " | ".join(
                [
                    r["arm"],
                    str(r["train_pairs"]),
                    str(r["flipped"]),
                    str(r.get("steps", "-")),
                    (
                        f"{r['train/dpo_loss_first']:.4f} -> {r['train/dpo_loss_last']:.4f}"
                        if "train/dpo_loss_first" in r
                        else "-"
                    ),
                    _num(r.get("train/rewards/accuracies_last"), "{:.2f}"),
                    str(r.get("pairs/eval", "-")),
                    _num(r.get("eval/rewards/accuracies"), "{:.3f}"),
                    _num(r.get("eval/rewards/margins")),
                    _num(r.get("valid/after/mean", r.get("valid/before/mean")), "{:.4f}"),
                    _ci(r, "valid/gain"),
                    _num(r.get("valid/other_user/mean"), "{:.4f}"),
                    f"{r['off_topic']:.3f}",
                    f"{r['truncated']:.3f}",
                    _num(r.get(FIT_WALL), "{:.0f}"),
                ]
            )
            + " |"
        )
    if any("train/reward_first" in r for r in rows):
        lines += ["", *grpo_markdown(rows)]
    if any("judge/before/mean" in r for r in rows):
        lines += ["", *judged_markdown(rows)]
    return "\n".join(lines) + "\n"


def grpo_markdown(rows: Sequence[dict]) -> list[str]:
    """The on-policy arms' own log: the reward of the completions they trained on, first and last step, and how many
    groups carried no gradient (every completion of a prompt rewarded the same)."""
    lines = [
        "GRPO arms: each step samples generate.num_samples completions per prompt from the current policy and rewards "
        "every one; tied groups (all rewards equal) carry no gradient",
        "",
        "| arm | users' prompts | steps | completions per prompt | train reward first -> last (mean) "
        "| tied groups first -> last (mean) | KL last | completion tokens (mean) | off topic first -> last | s / step "
        "| fit wall s | valid reward vs DPO, same pairs' users [95% CI] | judge vs DPO [95% CI] |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def trio(r: dict, key: str, fmt: str) -> str:
        if f"train/{key}_first" not in r:
            return "-"
        first, last, mean = (fmt.format(r[f"train/{key}_{x}"]) for x in ("first", "last", "mean"))
        return f"{first} -> {last} ({mean})"

    for r in rows:
        if "train/reward_first" not in r:
            continue
        lines.append(
            "| "
            + " | ".join(
                [
                    r["arm"],
                    str(r.get("prompts", "-")),
                    str(r.get("steps", "-")),
                    str(r.get("num_generations", "-")),
                    trio(r, "reward", "{:.4f}"),
                    trio(r, "frac_reward_zero_std", "{:.2f}"),
                    _num(r.get("train/kl_last"), "{:.4f}"),
                    _num(r.get("train/completions/mean_length_mean"), "{:.1f}"),
                    trio(r, "off_topic", "{:.2f}"),
                    _num(r.get("train/step_time_s"), "{:.1f}"),
                    _num(r.get(FIT_WALL), "{:.0f}"),
                    _ci(r, "vs_dpo/gain"),
                    _ci(r, "judge_vs_dpo/gain"),
                ]
            )
            + " |"
        )
    return lines


def _ci(r: dict, key: str) -> str:
    if f"{key}/mean" in r:
        return f"{r[f'{key}/mean']:+.4f} [{r[f'{key}/ci_low']:+.4f}, {r[f'{key}/ci_high']:+.4f}]"
    return "-"


def _interval(x: list | None, fmt: str = "{:+.4f}") -> str:
    return "-" if x is None else f"{fmt.format(x[0])} [{fmt.format(x[1])}, {fmt.format(x[2])}]"


def judged_markdown(rows: Sequence[dict]) -> list[str]:
    """The arms under the independent judge (seeds that built no pair) on valid users, how far each moved from the
    start policy, and test NDCG@5 of its texts under the fixed base re-ranker."""
    lines = [
        "valid: the judge's reward (reward-model seeds never used to build pairs), paired over valid users; KL: per "
        "token to the start policy on one of its texts per valid user; test: one text per test user under the fixed "
        "base re-ranker, paired over test users",
        "",
        "| arm | judge reward | gain over start [95% CI] | gain over random labels [95% CI] | KL / token "
        "| pair acc. (first train pairs) | off topic | test NDCG@5 [95% CI] | vs start [95% CI] |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        judge = r.get("judge/after/mean", r.get("judge/before/mean"))
        lines.append(
            "| "
            + " | ".join(
                [
                    r["arm"],
                    _num(judge, "{:.4f}"),
                    _ci(r, "judge/gain"),
                    _ci(r, "judge_vs_random/gain"),
                    _num(r.get("shift/valid/kl_per_token"), "{:.4f}"),
                    _num(r.get("shift/train/pair_accuracy"), "{:.3f}"),
                    _num(r.get("off_topic"), "{:.3f}"),
                    _interval(r.get("test/ndcg@5"), "{:.4f}"),
                    "-" if r["arm"] in (START, "popularity") else _interval(r.get("test/vs_first")),
                ]
            )
            + " |"
        )
    return lines


# --------------------------------------------------------------------------------------------------- the stage


def run_arms(cfg: RunConfig, arms: Sequence[Arm], name: str = "main") -> Path:
    """Every arm in order (each a resumable stage); writes and prints `<run>/arms/<name>/table.{json,md}`.

    With a recommender reward, the base knowledge and the base re-ranker are built first when missing (the encode
    and train stages of `rlrf4rec run`); with reward.judge_ensemble > 0, each arm's valid texts are also scored by
    the independent judge, compared with the start policy's and with random-label DPO's (the flip-0.5 arm of the
    same pair count), and after the last arm every policy writes one text per test user, scored by the fixed base
    re-ranker (test NDCG@5, paired with the start policy's)."""
    from rlrf4rec.core.lineage import start_policy
    from rlrf4rec.stages.dpo import run_dpo
    from rlrf4rec.stages.generate import policy_generations
    from rlrf4rec.stages.grpo import run_grpo
    from rlrf4rec.stages.pairs import run_pairs
    from rlrf4rec.stages.reward import (
        compare_policies,
        per_user_rewards,
        reward_folds,
        reward_judge,
        reward_scorer,
        run_reward,
    )
    from rlrf4rec.stages.shift import run_shift

    if cfg.generate.num_samples < 2:
        raise ValueError(f"generate.num_samples={cfg.generate.num_samples}: pairs need at least 2 texts per user")
    names = [a.name for a in arms]
    if not arms or len(set(names)) != len(names):
        raise ValueError(f"arms {names}: name at least one arm, each once")
    layout, out = cfg.layout, cfg.layout.arms(name)
    cfg.check_against_data(require_marker(layout.data, "data")["stats"])
    recommender_dir = layout.recommender("base")
    if cfg.reward.metric not in SYNTHETIC_METRICS:
        _base_reranker(cfg)
    policy = start_policy(cfg)
    gen_train = policy_generations(cfg, "train", cfg.loop.train_users, policy, START)
    gen_valid = policy_generations(cfg, "valid", cfg.loop.eval_users, policy, START)
    scorer, folds = reward_scorer(cfg, recommender_dir), reward_folds(cfg, recommender_dir)
    judge = reward_judge(cfg, recommender_dir)
    rew_train = run_reward(cfg, gen_train, scorer, layout.arms_step(name, "reward-train"), folds)
    rew_valid = run_reward(cfg, gen_valid, scorer, layout.arms_step(name, "reward-valid"))
    judged = {START: run_reward(cfg, gen_valid, judge, layout.arms_step(name, "judge-valid"))} if judge else {}
    sources = [(gen_train, rew_train), (gen_valid, rew_valid)]
    pairs_dir = run_pairs(cfg, sources, layout.arms_step(name, "pairs"), START, 0)
    train_pairs = read_parquet(pairs_dir / pairs_file("train"), S.PAIRS)
    log.info("arms/%s: %s", name, json.dumps(read_marker(pairs_dir)["stats"]))
    arms = resolve_all(arms, train_pairs.num_rows)
    rows = [arm_row(None, None, None, require_marker(gen_valid, "generate")["stats"])]
    rows[0]["valid/before/mean"] = float(np.mean(list(per_user_rewards(rew_valid).values())))
    rows[0]["valid/other_user/mean"] = other_user_reward(cfg, gen_valid)
    if judge:
        rows[0]["judge/before/mean"] = float(np.mean(list(per_user_rewards(judged[START]).values())))
    policies, rewarded = {START: policy}, {START: rew_valid}
    for arm in arms:
        arm_dir, version = layout.arms_step(name, arm.name), f"arms-{name}-{arm.name}"
        pairs_path = arm_dir / ARM_PAIRS
        arm_dir.mkdir(parents=True, exist_ok=True)
        write_parquet(arm_pairs(train_pairs, arm, cfg.seed), pairs_path, S.PAIRS)  # deterministic: same bytes
        if arm.kind == SFT_BEST:
            fit_dir = _sft_best(cfg, pairs_path, (gen_train, rew_train), (gen_valid, rew_valid), policy, arm_dir)
            tuned = fit_dir / POLICY_MODEL
        elif arm.kind == GRPO:  # the same users' prompts, on-policy, every completion rewarded like the pairs' texts
            users = sorted(set(read_parquet(pairs_path, S.PAIRS).column(S.USER_ID).to_pylist()))
            fit_dir = run_grpo(cfg, users, Path(policy), version, scorer, folds)
            tuned = fit_dir / POLICY_MODEL
        else:
            # One held-out evaluation, after the last step: an arm is a point of the curve, not a trajectory.
            steps = dpo_steps(cfg, arm.pairs)
            acfg = dataclasses.replace(cfg, dpo=dataclasses.replace(cfg.dpo, save_steps=max(steps, 1)))
            valid_pairs = pairs_dir / pairs_file("valid")
            fit_dir = run_dpo(acfg, pairs_path, Path(policy), version, eval_pairs_path=valid_pairs)
            tuned = layout.policy(fit_dir.name)
        policies[arm.name] = str(tuned)
        gen = policy_generations(cfg, "valid", cfg.loop.eval_users, str(tuned), version)
        rew = rewarded[arm.name] = run_reward(cfg, gen, scorer, arm_dir / "reward-valid")
        comparison = compare_policies(rew_valid, rew, cfg.loop.bootstrap_samples, cfg.seed)
        rows.append(arm_row(arm, read_marker(fit_dir)["stats"], comparison, read_marker(gen)["stats"]))
        rows[-1]["valid/other_user/mean"] = other_user_reward(cfg, gen)
        if judge:
            judged[arm.name] = run_reward(cfg, gen, judge, arm_dir / "judge-valid")
            for k, v in compare_policies(judged[START], judged[arm.name], cfg.loop.bootstrap_samples, cfg.seed).items():
                rows[-1][f"judge/{k}"] = v
            # How far the update moved the policy: per-token KL to the start policy on one of its texts per valid
            # user, and its order of the first SHIFT_PAIRS of its train pairs.
            shift = run_shift(
                cfg, fit_dir, policy, pairs_path, gen, arm_dir / "shift", max_pairs=SHIFT_PAIRS, texts_per_user=1
            )
            rows[-1].update({f"shift/{k}": v for k, v in read_marker(shift)["stats"].items()})
        _write_table(rows, out, cfg.reward.metric)
        log.info("arms/%s/%s: %s", name, arm.name, json.dumps(rows[-1]))
    _on_policy_against_offline(cfg, rows, arms, rewarded, judged)
    if judge:
        _against_random_labels(cfg, rows, arms, judged)
        test = fixed_test_rows(cfg, name, policies)
        for row in rows:
            row.update({f"test/{k}": v for k, v in test[row["arm"]].items()})
        rows.append({"arm": "popularity", **{f"test/{k}": v for k, v in test["popularity"].items()}})
    _write_table(rows, out, cfg.reward.metric)
    print((out / TABLE_MD).read_text())
    return out


SHIFT_PAIRS = 32  # train pairs per arm whose order by the tuned policy is measured (with judge_ensemble > 0)


def _base_reranker(cfg: RunConfig) -> Path:
    """The base knowledge (the start policy's text per user) and the base-knowledge re-ranker, when missing."""
    from rlrf4rec.stages.encode import run_encode
    from rlrf4rec.stages.train import run_recommender

    run_encode(cfg)
    return run_recommender(cfg, "base", cfg.layout.data, cfg.layout.user_knowledge("base"))


def _against_random_labels(cfg: RunConfig, rows: list[dict], arms: Sequence[Arm], judged: dict[str, Path]) -> None:
    """Each arm's judge reward paired against random-label DPO's (the flip-0.5 arm of the same pair count), if run."""
    from rlrf4rec.stages.reward import compare_policies

    null = {a.pairs: a.name for a in arms if a.kind == DPO and a.flipped * 2 == a.pairs}
    for row, arm in zip(rows[1:], arms):
        other = null.get(arm.pairs)
        if other is not None and other != arm.name:
            vs = compare_policies(judged[other], judged[arm.name], cfg.loop.bootstrap_samples, cfg.seed)
            row.update({f"judge_vs_random/{k}": v for k, v in vs.items()})


def _on_policy_against_offline(
    cfg: RunConfig, rows: list[dict], arms: Sequence[Arm], rewarded: dict[str, Path], judged: dict[str, Path]
) -> None:
    """Each GRPO arm's valid reward paired against the clean DPO arm's of the same pair count (the offline update on
    the same users' texts), under the pair-building reward and, when there is one, the judge."""
    from rlrf4rec.stages.reward import compare_policies

    offline = {a.pairs: a.name for a in arms if a.kind == DPO and not a.flipped}
    for row, arm in zip(rows[1:], arms):
        other = offline.get(arm.pairs)
        if arm.kind != GRPO or other is None:
            continue
        for key, dirs in (("vs_dpo", rewarded), ("judge_vs_dpo", judged)):
            if other in dirs and arm.name in dirs:
                vs = compare_policies(dirs[other], dirs[arm.name], cfg.loop.bootstrap_samples, cfg.seed)
                row.update({f"{key}/{k}": v for k, v in vs.items()})


def fixed_test_rows(cfg: RunConfig, name: str, policies: dict[str, str]) -> dict[str, dict]:
    """Test NDCG@5 of each arm's policy (one text per test user) under the fixed base re-ranker, and popularity."""
    from rlrf4rec.stages.evaluate import fixed_reranker_test

    rows = fixed_reranker_test(cfg, [(f"arms-{name}-{arm}", p) for arm, p in policies.items()])
    return {arm: rows[f"arms-{name}-{arm}"] for arm in policies} | {"popularity": rows["popularity"]}


def _sft_best(
    cfg: RunConfig,
    pairs_path: Path,
    train: tuple[Path, Path],
    valid: tuple[Path, Path],
    policy: str,
    arm_dir: Path,
) -> Path:
    """SFT of the start policy on the best of N texts of the users of the arm's pairs (valid users' best held out)."""
    from rlrf4rec.core.artifacts import Fingerprint, digest, read_tables
    from rlrf4rec.core.policy_fit import policy_fingerprint
    from rlrf4rec.stages.pairs import rewarded_candidates
    from rlrf4rec.stages.sft import fit_sft, sft_examples

    users = set(read_parquet(pairs_path, S.PAIRS).column(S.USER_ID).to_pylist())
    targets = best_texts(rewarded_candidates(*train), users)
    valid_candidates = rewarded_candidates(*valid)
    targets.update(best_texts(valid_candidates, set(valid_candidates)))
    g = cfg.generate
    tables = read_tables(cfg.layout.data, ("sequences", "items", "users"))
    examples = partial(sft_examples, tables, targets, g.domain, g.prompt_history, None, cfg.seed + cfg.sft.seed_offset)
    fingerprint = Fingerprint(
        "sft",
        cfg.section_hashes("sft", "seed"),
        {"policy": policy_fingerprint(Path(policy))},
        {"domain": g.domain, "prompt_history": g.prompt_history, "targets": digest(sorted(targets.items()))},
    )
    sc = cfg.sft  # one held-out loss after the last step (and the untrained one), as the DPO arms
    steps = sc.max_steps or math.ceil(len(users) / (sc.num_workers * sc.per_device_batch_size * sc.grad_accum))
    scfg = dataclasses.replace(cfg, sft=dataclasses.replace(sc, save_steps=max(steps * sc.epochs, 1)))
    return fit_sft(scfg, examples, Path(policy), arm_dir / "sft", fingerprint, "best of N (own texts)")


def other_user_reward(cfg: RunConfig, generations_dir: Path) -> float | None:
    """synthetic-genres only: the texts' mean reward (over users) against another user's lists (each user's texts
    scored with the genres of the next user in id order): what a policy earns by naming genres that pay anywhere.
    A gain that is about the user shows as own reward above this one."""
    from rlrf4rec.core.artifacts import read_tables
    from rlrf4rec.core.metrics import SYNTHETIC_GENRES, synthetic_genre_reward
    from rlrf4rec.core.scoring import list_genres

    if cfg.reward.metric != SYNTHETIC_GENRES:
        return None
    by_user = list_genres(read_tables(cfg.layout.data, ("items", "rerank_lists")))
    gens = read_parquet(generations_dir / GENERATIONS, S.GENERATIONS)
    texts: dict[str, list[str]] = {}
    for u, t in zip(gens.column(S.USER_ID).to_pylist(), gens.column(S.PREFERENCE_TEXT).to_pylist()):
        if u in by_user:
            texts.setdefault(u, []).append(t)
    users = sorted(texts)
    other = dict(zip(users, users[1:] + users[:1]))
    return float(np.mean([np.mean([synthetic_genre_reward(t, *by_user[other[u]]) for t in texts[u]]) for u in users]))


def _write_table(rows: list[dict], out: Path, metric: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(rows, out / TABLE_JSON)
    tmp = out / f".{TABLE_MD}.tmp"
    tmp.write_text(table_markdown(rows, metric))
    tmp.replace(out / TABLE_MD)


# --------------------------------------------------------------------------------------------------- the stage record


def _command(cfg: RunConfig, args: argparse.Namespace) -> list[Path]:
    try:
        arms = parse_arms(args.pairs, args.flips, args.flip_pairs, args.sft_best, args.grpo)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return [run_arms(cfg, arms, name=args.name)]


STAGE = Stage(
    "arms",
    "DPO arms on the start policy's pairs: a learning curve over train pair counts and label-noise arms (flip 0.5: "
    "random-label DPO), each judged by held-out pair accuracy and valid reward gain; reward.metric "
    "synthetic-genres makes it the RL loop's positive control",
    _command,
    (
        Option(("--pairs",), {"default": "50,250,700", "help": "train pair counts of the clean arms (nested)"}),
        Option(
            ("--flips",),
            {
                "default": "",
                "help": "label-flip shares of the noise arms, e.g. 0.28,0.41,0.5 (0.5: random-label DPO); "
                "arms.noise_for_spearman maps a reward's measured agreement to one",
            },
        ),
        Option(("--flip-pairs",), {"type": int, "help": "train pairs of the noise arms (default: middle count)"}),
        Option(
            ("--sft-best",),
            {
                "default": "",
                "help": "train pair counts whose users' best of N texts an SFT arm distils (the update's "
                "supervised baseline), e.g. 250",
            },
        ),
        Option(
            ("--grpo",),
            {
                "default": "",
                "help": "train pair counts whose users' prompts a GRPO arm trains on (on-policy, every completion "
                "rewarded by the same reward model; grpo section), e.g. 250",
            },
        ),
        Option(("--name",), {"default": "main", "help": "output directory <run>/arms/<name>/"}),
    ),
    on_ray=on_ray,
    upstream=("data", "sft"),
)
