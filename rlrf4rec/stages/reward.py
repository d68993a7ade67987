"""Reward from recommender feedback (METHOD.md section 5): how well a preference text lets the frozen
knowledge-augmented re-ranker order its user's lists.

Consumes generations (user, sample, preference text), the user's history text, a trained knowledge-augmented
recommender stage and the frozen encoder; produces one reward per generation key: the mean NDCG@K (or MAP@K) over
the user's re-rank lists of their own split (train users: training lists) with the text's vector in place of the
user's knowledge. Deterministic: eval mode, no sampling, same model + text + lists -> same reward.
The scoring itself is core/scoring.py (also GRPO's, evaluation's and the controls'); this module runs it over a
generation table, locally or on Ray Data, and picks the reward models (ensemble seeds, cross-fitting folds).
Knows nothing about how the texts were generated or what the rewards are used for.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import Fingerprint, publish, read_parquet, read_table, require_marker, write_parquet
from rlrf4rec.core.cluster import map_rows_on_ray
from rlrf4rec.core.config import RunConfig, dump_config
from rlrf4rec.core.history import select_users
from rlrf4rec.core.knowledge import make_encoder
from rlrf4rec.core.layout import GENERATIONS, REWARDS
from rlrf4rec.core.metrics import (
    SYNTHETIC_METRICS,
    bootstrap_ci,
)
from rlrf4rec.core.scoring import RewardEnsemble, TextRewarder, check_fold, rewards_table
from rlrf4rec.core.stage import Option, Stage

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- Ray Data


class ScoreBatch:
    """Ray Data callable: the encoder and the frozen recommender(s) load once per actor, then each batch of
    (user_id, knowledge_text) rows gets its rewards. Rows of a user are scored independently, so any batching
    gives the same rewards."""

    def __init__(self, make_encoder: Callable[[], object], recommender_dirs: list[str], data_dir: str, metric: str):
        self.encoder = make_encoder()
        self.model = RewardEnsemble.load([Path(d) for d in recommender_dirs], Path(data_dir), metric=metric)

    def __call__(self, batch: pa.Table) -> pa.Table:
        vectors = self.model.encode(self.encoder, batch.column(S.KNOWLEDGE_TEXT).to_pylist())
        rewards = self.model.score(batch.column(S.USER_ID).to_pylist(), vectors)
        return batch.append_column(S.REWARD, pa.array(rewards, pa.float64()))


def score_on_ray(
    rows: pa.Table,
    make_encoder: Callable[[], object],
    recommender_dir: Path | Sequence[Path],
    data_dir: Path,
    metric: str,
    *,
    batch_size: int,
    concurrency: int,
) -> np.ndarray:
    """Rewards of `rows` (user_id, knowledge_text) on Ray Data, `concurrency` actors; returned in row order.
    `recommender_dir`: one recommender stage, or the members of a reward ensemble (their mean reward)."""
    members = [recommender_dir] if isinstance(recommender_dir, (str, Path)) else list(recommender_dir)
    out = map_rows_on_ray(
        rows,
        ScoreBatch,
        (make_encoder, [str(d) for d in members], str(data_dir), metric),
        batch_size=batch_size,
        concurrency=concurrency,
        num_cpus=1,
        what="reward.engine=ray",
    )
    return out.column(S.REWARD).to_numpy()


# --------------------------------------------------------------------------------------------------- the stage


def run_reward(
    cfg: RunConfig,
    generations_dir: Path,
    scorer: Sequence[Path],
    stage_dir: Path,
    folds: Sequence[tuple[Sequence[Path], Sequence[str]]] = (),
) -> Path:
    """The reward stage: every generation rewarded by the frozen recommender, `<stage_dir>/rewards.parquet`
    (schema.REWARDS). `scorer`: that recommender's stage directory, or several (`reward_scorer`: a reward ensemble,
    whose members' mean is the reward). `folds`: (recommender dirs, users) whose texts those reward instead
    (cross-fitting, `reward_folds`)."""
    stage = cfg.layout.relative(stage_dir)
    if cfg.reward.metric in SYNTHETIC_METRICS:
        return run_synthetic_reward(cfg, generations_dir, stage_dir)
    main = tuple(scorer)
    groups = list(dict.fromkeys([main, *(tuple(dirs) for dirs, _ in folds)]))
    upstream = {"generations": require_marker(generations_dir, "generate")["fingerprint"]}
    upstream.update(
        {
            cfg.layout.relative(d): require_marker(d, "train-recommender")["fingerprint"]
            for group in groups
            for d in group
        }
    )
    # reward.ensemble is the number of members above: one seed rewards as before the field existed
    sections = cfg.section_hashes("reward", "encode", "knowledge", "models", ignore=("reward.ensemble",))
    fingerprint = Fingerprint("reward", sections, upstream)

    def build(tmp: Path, stats: dict) -> None:
        gens = read_parquet(generations_dir / GENERATIONS, S.GENERATIONS)
        rewarder = TextRewarder(cfg, main, folds)
        has_lists = pc.is_in(gens.column(S.USER_ID), pa.array(sorted(rewarder.rewardable())))
        unscorable = gens.num_rows - pc.sum(has_lists).as_py()
        if unscorable:  # a user whose sequence left no complete re-rank list cannot be rewarded
            log.warning("%s: %d texts of users without re-rank lists are not rewarded", stage, unscorable)
            gens = gens.filter(has_lists)
        users = gens.column(S.USER_ID).to_pylist()
        preferences = gens.column(S.PREFERENCE_TEXT).to_pylist()
        if cfg.reward.engine == "ray":
            texts = rewarder.knowledge_texts(users, preferences)
            rewards = np.zeros(len(users))
            for group in rewarder.groups:
                rows = rewarder.rows_of(users, group)
                if not rows:
                    continue
                table = pa.table({S.USER_ID: [users[i] for i in rows], S.KNOWLEDGE_TEXT: [texts[i] for i in rows]})
                rewards[rows] = score_on_ray(
                    table,
                    partial(make_encoder, cfg),
                    group,
                    cfg.layout.data,
                    cfg.reward.metric,
                    batch_size=cfg.reward.batch_size,
                    concurrency=cfg.reward.concurrency,
                )
        else:
            rewards = rewarder(users, preferences)
        table = rewards_table(gens, rewards)
        write_parquet(table, tmp / REWARDS, S.REWARDS)
        stats.update(
            {
                "rows": table.num_rows,
                "reward/mean": float(rewards.mean()),
                "reward/std": float(rewards.std()),
                "reward/within_user_range_mean": within_user_spread(table),
                "cross_fitted_rows": sum(u in rewarder.scorer_of for u in users),
                "ensemble": len(main),
            }
        )
        log.info("%s: mean reward %.4f over %d texts", stage, rewards.mean(), len(rewards))

    return publish(stage_dir, fingerprint, build, dump_config(cfg))


def run_synthetic_reward(cfg: RunConfig, generations_dir: Path, stage_dir: Path) -> Path:
    """reward.metric = synthetic-genres, the RL loop's positive control: each text rewarded by
    core.metrics.synthetic_genre_reward against its user's list genres; synthetic-genres-contrast: less its mean
    against every other user of the same split (core.metrics.contrast_genre_reward). No recommender, no encoder."""
    upstream = {
        name: require_marker(d, name)["fingerprint"]
        for name, d in (("generate", generations_dir), ("data", cfg.layout.data))
    }
    fingerprint = Fingerprint("reward", cfg.section_hashes("reward"), upstream)

    def build(tmp: Path, stats: dict) -> None:
        gens = read_parquet(generations_dir / GENERATIONS, S.GENERATIONS)
        rewarder = TextRewarder(cfg)
        gens = gens.filter(pc.is_in(gens.column(S.USER_ID), pa.array(sorted(rewarder.rewardable()))))
        rewards = rewarder(gens.column(S.USER_ID).to_pylist(), gens.column(S.PREFERENCE_TEXT).to_pylist())
        table = rewards_table(gens, rewards)
        write_parquet(table, tmp / REWARDS, S.REWARDS)
        stats.update(
            {
                "rows": table.num_rows,
                "reward/mean": float(rewards.mean()) if len(rewards) else 0.0,
                "reward/std": float(rewards.std()) if len(rewards) else 0.0,
                "reward/within_user_range_mean": within_user_spread(table),
                "metric": cfg.reward.metric,
            }
        )
        log.info(
            "%s: mean synthetic reward %.4f over %d texts", cfg.layout.relative(stage_dir), rewards.mean(), len(rewards)
        )

    return publish(stage_dir, fingerprint, build, dump_config(cfg))


def reward_scorer(cfg: RunConfig, recommender_dir: Path) -> list[Path]:
    """The reward model made from a recommender stage: itself, and with reward.ensemble = K > 1 also K - 1 seed
    siblings `<name>-seed{i}` (the same variant, knowledge `<run>/knowledge/<name>/`, trained with seed + i;
    trained here when missing)."""
    if cfg.reward.metric in SYNTHETIC_METRICS:  # no recommender is read: nothing to train
        return [recommender_dir]
    if cfg.reward.ensemble > 1:  # siblings are retrained like it: it must be a full knowledge model of this run
        _require_full_model(cfg, recommender_dir, f"reward.ensemble={cfg.reward.ensemble}", "--reward.ensemble=1")
    return _seed_members(cfg, recommender_dir, cfg.layout.user_knowledge(recommender_dir.name))


def reward_judge(cfg: RunConfig, recommender_dir: Path) -> list[Path]:
    """The independent judge of `recommender_dir` (reward.judge_ensemble = J): its siblings `<name>-seed{i}` for the
    seeds after the reward ensemble's, i = K .. K + J - 1 (K = reward.ensemble), so no judge seed ever built a pair;
    each trained here when missing. [] with J = 0 or a synthetic reward."""
    k, j = cfg.reward.ensemble, cfg.reward.judge_ensemble
    if not j or cfg.reward.metric in SYNTHETIC_METRICS:
        return []
    _require_full_model(cfg, recommender_dir, f"reward.judge_ensemble={j}", "--reward.judge_ensemble=0")
    return _seed_members(cfg, recommender_dir, cfg.layout.user_knowledge(recommender_dir.name), seeds=range(k, k + j))


def _require_full_model(cfg: RunConfig, recommender_dir: Path, setting: str, fix: str) -> None:
    stats = require_marker(recommender_dir, "train-recommender")["stats"]
    ours = Path(recommender_dir).resolve() == cfg.layout.recommender(recommender_dir.name).resolve()
    if not ours or stats.get("held_out_users") or "user" not in stats.get("knowledge", []):
        raise ValueError(
            f"{setting} trains seed siblings of {recommender_dir}, which must be a user-knowledge recommender of "
            "this run trained on every train user (<run>/recommender/<name>, not a fold or ID-only model); pass one, "
            f"or {fix}"
        )


def _seed_members(
    cfg: RunConfig, first: Path, knowledge: Path, held_out: Sequence[str] = (), seeds: Sequence[int] | None = None
) -> list[Path]:
    """`first` (trained with cfg.seed) and its reward.ensemble - 1 siblings trained with seeds seed + 1, ...; with
    `seeds`, only the siblings of those seed offsets."""
    from rlrf4rec.stages.train import run_recommender

    siblings = [
        run_recommender(
            dataclasses.replace(cfg, seed=cfg.seed + i), f"{first.name}-seed{i}", cfg.layout.data, knowledge,
            held_out=held_out,
        )
        for i in (seeds if seeds is not None else range(1, cfg.reward.ensemble))
    ]  # fmt: skip
    return siblings if seeds is not None else [first, *siblings]


def reward_folds(cfg: RunConfig, recommender_dir: Path) -> list[tuple[list[Path], list[str]]]:
    """The cross-fitted reward models of `recommender_dir` (reward.cross_fit_folds): the train users whose texts the
    loop rewards (loop.train_users) split into folds by a seeded hash, and per fold the same recommender (its
    knowledge, `<run>/knowledge/<name>/`) trained without that fold's lists, with its reward.ensemble seeds.
    [] when cross_fit_folds = 0."""
    from rlrf4rec.core.protocol import stable_seed
    from rlrf4rec.stages.train import run_recommender

    k = cfg.reward.cross_fit_folds
    if not k or cfg.reward.metric in SYNTHETIC_METRICS:  # the synthetic reward reads no recommender
        return []
    data_dir = cfg.layout.data
    train = select_users(read_table(data_dir, "sequences"), ("train",), None).column(S.USER_ID).to_pylist()
    rewarded = rewarded_train_users(cfg)
    knowledge = cfg.layout.user_knowledge(recommender_dir.name)
    out = []
    for f in range(k):
        fold = [u for u in rewarded if stable_seed(cfg.seed, "reward-fold", u) % k == f]
        check_fold(k, f, len(fold), len(train), "use more folds or fewer loop.train_users")
        if fold:
            first = run_recommender(cfg, f"{recommender_dir.name}-fold{f}", data_dir, knowledge, held_out=fold)
            out.append((_seed_members(cfg, first, knowledge, fold), fold))
    return out


def rewarded_train_users(cfg: RunConfig) -> list[str]:
    """The train users a round rewards and updates the policy on: the first loop.train_users by id, as the round's
    train generation picks them."""
    sequences = read_table(cfg.layout.data, "sequences")
    return select_users(sequences, ("train",), cfg.loop.train_users).column(S.USER_ID).to_pylist()


def rewards_by_user(rewards: pa.Table) -> dict[str, list[float]]:
    by_user: dict[str, list[float]] = {}
    for u, r in zip(rewards.column(S.USER_ID).to_pylist(), rewards.column(S.REWARD).to_pylist()):
        by_user.setdefault(u, []).append(r)
    return by_user


def within_user_spread(rewards: pa.Table) -> float:
    by_user = rewards_by_user(rewards)
    return float(np.mean([max(v) - min(v) for v in by_user.values()])) if by_user else 0.0


def per_user_rewards(rewards_dir: Path) -> dict[str, float]:
    """user -> mean reward of its texts in a reward stage."""
    by_user = rewards_by_user(read_parquet(rewards_dir / REWARDS, S.REWARDS))
    return {u: float(np.mean(v)) for u, v in by_user.items()}


def compare_policies(before: Path, after: Path, num_samples: int, seed: int) -> dict:
    """Per-user mean reward of two policies on the same users: means and a paired bootstrap CI of the gain."""
    a, b = per_user_rewards(before), per_user_rewards(after)
    users = sorted(set(a) & set(b))
    if not users:
        raise ValueError(f"{before} and {after} share no user; compare policies on the same users")
    x, y = np.array([a[u] for u in users]), np.array([b[u] for u in users])
    out = {"users": len(users)}
    for name, values in (("before", x), ("after", y), ("gain", y - x)):
        mean, low, high = bootstrap_ci(values, num_samples=num_samples, seed=seed)
        out.update({f"{name}/mean": mean, f"{name}/ci_low": low, f"{name}/ci_high": high})
    return out


# --------------------------------------------------------------------------------------------------- the stage record


def _command(cfg: RunConfig, args: argparse.Namespace) -> list[Path]:
    layout = cfg.layout
    generations = args.generations or layout.generate
    recommender = args.recommender or layout.recommender("base")
    return [run_reward(cfg, generations, reward_scorer(cfg, recommender), layout.rewards(args.name))]


STAGE = Stage(
    "reward",
    "reward each generated text with a frozen knowledge-augmented recommender",
    _command,
    (
        Option(("--generations",), {"type": Path, "help": "a generate stage dir (default: <run>/generate)"}),
        Option(("--name",), {"default": "reward", "help": "output directory <run>/rewards/<name>/"}),
        Option(("--recommender",), {"type": Path, "help": "recommender stage dir (default: <run>/recommender/base)"}),
    ),
    on_ray=lambda cfg, args: cfg.reward.engine == "ray",
    upstream=("generate", "train-recommender"),
)
