"""The RLRF4Rec rounds (METHOD.md section 8): recommender feedback -> preference pairs -> DPO, `loop.rounds` times.

Round t, with policy_t (round 0: models.llm) and recommender_t (round 0: the base-knowledge re-ranker):
  1. generate N texts per user with policy_t for `loop.train_users` train users and the valid users,
  2. reward every text with recommender_t (frozen); train users' texts cross-fitted (reward.cross_fit_folds): by
     recommender_t retrained without their fold's lists, since a user's own lists were fitted with one of its texts,
  3. pairs: best vs worst per user (train pairs feed DPO, valid pairs measure reward accuracy),
  4. DPO from policy_t (also the reference) -> policy_{t+1},
  5. policy_{t+1} writes N texts for the same valid users, rewarded by the same recommender_t: the round's
     comparison (mean reward, paired bootstrap interval over users),
  6. policy_{t+1} writes one text per train and valid user, and the recommender retrains on them -> recommender_{t+1}
     (KAR's knowledge from the current policy for every user it trains on).
Every step is a stage directory with a completion marker, so a killed loop resumes at the first incomplete step.
`<run>/rounds/manifest.json` records each round's lineage (policy, recommender, encoder, data and config hashes)
and results. Knows nothing about engines or trainers beyond their stage functions.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rlrf4rec import assets
from rlrf4rec import schema as S
from rlrf4rec.artifacts import (
    is_complete,
    read_marker,
    read_parquet,
    require_marker,
    stage_output,
    write_json,
    write_parquet,
)
from rlrf4rec.config import RunConfig, dump_config
from rlrf4rec.data import prompt_history_texts, user_history_texts
from rlrf4rec.encode import (
    embedding_cache,
    generate_policy_texts,
    make_encoder,
    policy_knowledge_texts,
    user_knowledge_text,
    write_user_knowledge,
)
from rlrf4rec.metrics import bootstrap_ci
from rlrf4rec.pairs import Candidate, pairs_table, select_pairs
from rlrf4rec.prompts import preference_messages
from rlrf4rec.reward import RewardModel, rewards_table, score_on_ray

log = logging.getLogger(__name__)


def run_reward(
    cfg: RunConfig,
    generations_dir: Path,
    recommender_dir: Path,
    stage: str,
    folds: Sequence[tuple[Path, Sequence[str]]] = (),
) -> Path:
    """Reward every generation with the frozen recommender: `<run>/<stage>/rewards.parquet` (schema.REWARDS).
    `folds`: (recommender dir, users) whose texts that recommender rewards instead (cross-fitting, `reward_folds`)."""
    stage_dir = cfg.run_path / stage
    upstream = [
        require_marker(generations_dir, "generate")["fingerprint"],
        require_marker(recommender_dir, "train-recommender")["fingerprint"],
        *(require_marker(d, "train-recommender")["fingerprint"] for d, _ in folds),
    ]
    fingerprint = f"{cfg.section_hash('reward', 'encode', 'knowledge', 'models')}-{'-'.join(upstream)}"
    if is_complete(stage_dir, fingerprint):
        return stage_dir
    gens = read_parquet(generations_dir / "generations.parquet", S.GENERATIONS)
    reward_model = RewardModel.load(recommender_dir, cfg.run_path / "data", metric=cfg.reward.metric)
    has_lists = pc.is_in(gens.column(S.USER_ID), pa.array(sorted(reward_model.by_user)))
    unscorable = gens.num_rows - pc.sum(has_lists).as_py()
    if unscorable:  # a user whose sequence left no complete re-rank list cannot be rewarded
        log.warning("%s: %d texts of users without re-rank lists are not rewarded", stage, unscorable)
        gens = gens.filter(has_lists)
    histories = user_history_texts(cfg)
    users = gens.column(S.USER_ID).to_pylist()
    texts = [user_knowledge_text(histories[u], t) for u, t in zip(users, gens.column(S.PREFERENCE_TEXT).to_pylist())]
    scorer_of = {u: d for d, fold in folds for u in fold}
    scorers = {recommender_dir: reward_model} | {d: None for d, _ in folds}
    rewards = np.zeros(len(users))
    encoder = None
    for model_dir, loaded in scorers.items():
        rows = [i for i, u in enumerate(users) if scorer_of.get(u, recommender_dir) == model_dir]
        if not rows:
            continue
        if cfg.reward.engine == "ray":
            table = pa.table({S.USER_ID: [users[i] for i in rows], S.KNOWLEDGE_TEXT: [texts[i] for i in rows]})
            rewards[rows] = score_on_ray(
                table,
                partial(make_encoder, cfg),
                model_dir,
                cfg.run_path / "data",
                cfg.reward.metric,
                batch_size=cfg.reward.batch_size,
                concurrency=cfg.reward.concurrency,
            )
            continue
        model = loaded or RewardModel.load(model_dir, cfg.run_path / "data", metric=cfg.reward.metric)
        encoder = encoder or make_encoder(cfg)
        vectors = model.encode(encoder, [texts[i] for i in rows], embedding_cache(cfg))
        rewards[rows] = model.score([users[i] for i in rows], vectors)
    table = rewards_table(gens, rewards)
    with stage_output(stage_dir, fingerprint, dump_config(cfg)) as (tmp, stats):
        write_parquet(table, tmp / "rewards.parquet", S.REWARDS)
        spread = _within_user_spread(table)
        stats.update(
            {
                "rows": table.num_rows,
                "reward/mean": float(rewards.mean()),
                "reward/std": float(rewards.std()),
                "reward/within_user_range_mean": spread,
                "cross_fitted_rows": sum(u in scorer_of for u in users),
            }
        )
    log.info("%s: mean reward %.4f over %d texts", stage, rewards.mean(), len(rewards))
    return stage_dir


def reward_folds(cfg: RunConfig, recommender_dir: Path) -> list[tuple[Path, list[str]]]:
    """The cross-fitted reward models of `recommender_dir` (reward.cross_fit_folds): the train users whose texts the
    loop rewards (loop.train_users) split into folds by a seeded hash, and per fold the same recommender (its
    knowledge, `<run>/knowledge/<name>/`) trained without that fold's lists. [] when cross_fit_folds = 0."""
    from rlrf4rec.generate import select_users
    from rlrf4rec.protocol import stable_seed
    from rlrf4rec.train import run_recommender

    k = cfg.reward.cross_fit_folds
    if not k:
        return []
    data_dir = cfg.run_path / "data"
    sequences = read_parquet(data_dir / "sequences.parquet", S.SEQUENCES)
    train = select_users(sequences, ("train",), None).column(S.USER_ID).to_pylist()
    rewarded = train[: cfg.loop.train_users]  # the users the round's train generation picks (sorted by id)
    knowledge = cfg.run_path / "knowledge" / recommender_dir.name / "user_knowledge.parquet"
    out = []
    for f in range(k):
        fold = [u for u in rewarded if stable_seed(cfg.seed, "reward-fold", u) % k == f]
        if len(fold) > len(train) - 2:
            raise ValueError(
                f"reward.cross_fit_folds={k}: fold {f} holds out {len(fold)} of {len(train)} train users, leaving "
                "too few to train on; use more folds or fewer loop.train_users"
            )
        if fold:
            name = f"{recommender_dir.name}-fold{f}"
            out.append((run_recommender(cfg, name, data_dir, knowledge, held_out=fold), fold))
    return out


def _rewards_by_user(rewards: pa.Table) -> dict[str, list[float]]:
    by_user: dict[str, list[float]] = {}
    for u, r in zip(rewards.column(S.USER_ID).to_pylist(), rewards.column(S.REWARD).to_pylist()):
        by_user.setdefault(u, []).append(r)
    return by_user


def _within_user_spread(rewards: pa.Table) -> float:
    by_user = _rewards_by_user(rewards)
    return float(np.mean([max(v) - min(v) for v in by_user.values()])) if by_user else 0.0


def _candidates(generations_dir: Path, rewards_dir: Path) -> dict[str, list[Candidate]]:
    gens = read_parquet(generations_dir / "generations.parquet", S.GENERATIONS)
    rewards = read_parquet(rewards_dir / "rewards.parquet", S.REWARDS)
    reward_of = {
        (u, i): r
        for u, i, r in zip(
            rewards.column(S.USER_ID).to_pylist(),
            rewards.column(S.SAMPLE_IDX).to_pylist(),
            rewards.column(S.REWARD).to_pylist(),
        )
    }
    out: dict[str, list[Candidate]] = {}
    for row in gens.select([S.USER_ID, S.SAMPLE_IDX, S.PREFERENCE_TEXT, S.FLAGS]).to_pylist():
        if "empty" in row[S.FLAGS]:
            continue  # nothing to learn from an empty answer, as chosen or as rejected
        key = (row[S.USER_ID], row[S.SAMPLE_IDX])
        if key not in reward_of:
            continue  # not rewarded: its user has no re-rank list
        out.setdefault(key[0], []).append(Candidate(key[1], row[S.PREFERENCE_TEXT], reward_of[key]))
    return out


def run_pairs(
    cfg: RunConfig, sources: list[tuple[Path, Path]], stage: str, policy_version: str, round_idx: int
) -> Path:
    """Best/worst pairs of every user in `sources` [(generations dir, rewards dir)], one file per split."""
    stage_dir = cfg.run_path / stage
    upstream = [require_marker(d, "generate / reward")["fingerprint"] for pair in sources for d in pair]
    fingerprint = f"{cfg.section_hash('reward')}-{'-'.join(upstream)}"
    if is_complete(stage_dir, fingerprint):
        return stage_dir
    candidates: dict[str, list[Candidate]] = {}
    for gen_dir, rew_dir in sources:
        candidates.update(_candidates(gen_dir, rew_dir))
    seq = read_parquet(cfg.run_path / "data" / "sequences.parquet", S.SEQUENCES)
    splits = dict(zip(seq.column(S.USER_ID).to_pylist(), seq.column(S.SPLIT).to_pylist()))
    histories = prompt_history_texts(cfg)
    prompts = {u: preference_messages(histories[u], cfg.generate.domain) for u in candidates}
    with stage_output(stage_dir, fingerprint, dump_config(cfg)) as (tmp, stats):
        for split in ("train", "valid"):
            users = {u: c for u, c in candidates.items() if splits[u] == split}
            pairs, split_stats = select_pairs(users, cfg.reward.min_margin)
            write_parquet(
                pairs_table(pairs, prompts, splits, policy_version, round_idx), tmp / f"pairs_{split}.parquet", S.PAIRS
            )
            stats.update({f"{split}/{k}": v for k, v in split_stats.items()})
    log.info("%s: %s", stage, read_marker(stage_dir)["stats"])
    return stage_dir


def compare_policies(before: Path, after: Path, num_samples: int, seed: int) -> dict:
    """Per-user mean reward of two policies on the same users: means and a paired bootstrap CI of the gain."""

    def per_user(rewards_dir: Path) -> dict[str, float]:
        by_user = _rewards_by_user(read_parquet(rewards_dir / "rewards.parquet", S.REWARDS))
        return {u: float(np.mean(v)) for u, v in by_user.items()}

    a, b = per_user(before), per_user(after)
    users = sorted(set(a) & set(b))
    if not users:
        raise ValueError(f"{before} and {after} share no user; compare policies on the same users")
    x, y = np.array([a[u] for u in users]), np.array([b[u] for u in users])
    out = {"users": len(users)}
    for name, values in (("before", x), ("after", y), ("gain", y - x)):
        mean, low, high = bootstrap_ci(values, num_samples=num_samples, seed=seed)
        out.update({f"{name}/mean": mean, f"{name}/ci_low": low, f"{name}/ci_high": high})
    return out


def run_loop(cfg: RunConfig) -> Path:
    """All rounds; returns `<run>/rounds` holding one directory per round and the manifest."""
    from rlrf4rec.dpo import run_dpo
    from rlrf4rec.generate import run_generate
    from rlrf4rec.train import run_recommender

    if cfg.generate.num_samples < 2:
        raise ValueError(f"generate.num_samples={cfg.generate.num_samples}: best-of-N pairs need at least 2 samples")
    rounds_dir = cfg.run_path / "rounds"
    data_dir = cfg.run_path / "data"
    home = assets.asset_home(cfg.assets.home)
    policy, recommender_dir = cfg.models.llm, cfg.run_path / "recommender" / "base"
    manifest: dict = {
        "config_hash": cfg.section_hash(*cfg.to_dict()),
        "data": read_marker(data_dir)["fingerprint"],
        "encoder": cfg.models.encoder,
        "rounds": [],
    }

    def generate(split: str, max_users: int | None, model: str, version: str) -> Path:
        # Named by policy, not round: round t+1 finds policy_{t+1}'s valid texts already written in round t.
        g = dataclasses.replace(cfg.generate, splits=(split,), max_users=max_users)
        return run_generate(
            dataclasses.replace(cfg, generate=g),
            model=model,
            policy_version=version,
            stage=f"generations/{version}-{split}",
        )

    for t in range(cfg.loop.rounds):
        rd, version, next_version = f"rounds/round{t}", "base" if t == 0 else f"round{t}", f"round{t + 1}"
        policy_path = assets.resolve(policy, home)
        gen_train = generate("train", cfg.loop.train_users, policy_path, version)
        gen_valid = generate("valid", cfg.loop.eval_users, policy_path, version)
        folds = reward_folds(cfg, recommender_dir)
        rew_train = run_reward(cfg, gen_train, recommender_dir, f"{rd}/reward-train", folds)
        rew_valid = run_reward(cfg, gen_valid, recommender_dir, f"{rd}/reward-valid")
        pairs_dir = run_pairs(cfg, [(gen_train, rew_train), (gen_valid, rew_valid)], f"{rd}/pairs", version, t)
        if not read_marker(pairs_dir)["stats"].get("train/pairs"):
            raise ValueError(
                f"round {t}: no train pair survived ({pairs_dir}); raise loop.train_users or generate.num_samples, "
                "lower reward.min_margin, or raise generate.temperature so the N texts differ"
            )
        dpo_dir = run_dpo(
            cfg,
            pairs_dir / "pairs_train.parquet",
            Path(policy_path),
            f"round{t}",
            eval_pairs_path=pairs_dir / "pairs_valid.parquet",
        )
        new_policy = str(dpo_dir / "model")
        gen_tuned = generate("valid", cfg.loop.eval_users, new_policy, next_version)
        rew_tuned = run_reward(cfg, gen_tuned, recommender_dir, f"{rd}/reward-valid-tuned")
        comparison = compare_policies(rew_valid, rew_tuned, cfg.loop.bootstrap_samples, cfg.seed)
        log.info(
            "round %d: valid reward %.4f -> %.4f (gain %.4f, 95%% CI [%.4f, %.4f])",
            t,
            comparison["before/mean"],
            comparison["after/mean"],
            comparison["gain/mean"],
            comparison["gain/ci_low"],
            comparison["gain/ci_high"],
        )
        # Bidirectional gain: the recommender retrains on the new policy's knowledge, one text per train and valid
        # user (sample 0: no label read), like the base recommender on the base policy's.
        gen_knowledge = generate_policy_texts(cfg, new_policy, next_version)
        texts = policy_knowledge_texts(cfg, gen_knowledge)
        upstream = f"{read_marker(pairs_dir)['fingerprint']}-{read_marker(gen_knowledge)['fingerprint']}"
        knowledge_dir = write_user_knowledge(cfg, next_version, texts, upstream)
        new_recommender = run_recommender(cfg, next_version, data_dir, knowledge_dir / "user_knowledge.parquet")
        manifest["rounds"].append(
            {
                "round": t,
                "policy_in": policy,
                "policy_out": new_policy,
                "recommender_in": str(recommender_dir),
                "reward_folds": [str(d) for d, _ in folds],
                "recommender_out": str(new_recommender),
                "stages": {
                    name: str(d)
                    for name, d in [
                        ("generate_train", gen_train),
                        ("generate_valid", gen_valid),
                        ("pairs", pairs_dir),
                        ("dpo", dpo_dir),
                        ("generate_valid_tuned", gen_tuned),
                        ("generate_knowledge", gen_knowledge),
                    ]
                },
                "pairs": read_marker(pairs_dir)["stats"],
                "dpo": read_marker(dpo_dir)["stats"],
                "valid_reward": comparison,
                "recommender_metrics": read_marker(new_recommender)["stats"],
            }
        )
        rounds_dir.mkdir(parents=True, exist_ok=True)
        write_json(manifest, rounds_dir / "manifest.json")
        policy, recommender_dir = new_policy, new_recommender
    return rounds_dir
