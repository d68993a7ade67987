"""The RLRF4Rec rounds (METHOD.md section 8): recommender feedback -> preference pairs -> DPO, `loop.rounds` times.

Round t, with policy_t (round 0: models.llm, or its SFT warm start with loop.init = sft) and recommender_t (round 0:
the base-knowledge re-ranker):
  1. generate N texts per user with policy_t for `loop.train_users` train users and the valid users,
  2. reward every text with recommender_t (frozen); train users' texts cross-fitted (reward.cross_fit_folds): by
     recommender_t retrained without their fold's lists, since a user's own lists were fitted with one of its texts;
     each reward model the mean of reward.ensemble seeds of it,
  3. pairs: best vs worst per user (train pairs feed DPO, valid pairs measure reward accuracy),
  4. DPO from policy_t (also the reference) -> policy_{t+1},
  5. policy_{t+1} writes N texts for the same valid users, rewarded by the same recommender_t: the round's
     comparison (mean reward, paired bootstrap interval over users),
     and how far DPO moved it (stages/shift.py: train pair accuracy of the tuned policy, per-token KL to policy_t
     on those valid texts),
  6. policy_{t+1} writes one text per train and valid user, and the recommender retrains on them -> recommender_{t+1}
     (KAR's knowledge from the current policy for every user it trains on).
Every step is a stage directory with a completion marker, so a killed loop resumes at the first incomplete step.
`<run>/rounds/manifest.json` records each round's lineage (policy, recommender, encoder, data and config hashes)
and results; artifacts.read_manifest is how other stages read it. This module only sequences the rounds: each step is
another stage module's function (generate, reward, pairs, dpo, encode, train). Knows nothing about engines or
trainers.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rlrf4rec.core import assets
from rlrf4rec.core.artifacts import read_marker, write_json
from rlrf4rec.core.config import RunConfig
from rlrf4rec.core.layout import pairs_file
from rlrf4rec.core.lineage import Round, start_policy
from rlrf4rec.core.stage import Stage, on_ray
from rlrf4rec.stages.encode import write_policy_knowledge
from rlrf4rec.stages.pairs import run_pairs
from rlrf4rec.stages.reward import compare_policies, reward_folds, reward_scorer, run_reward

log = logging.getLogger(__name__)


def run_loop(cfg: RunConfig) -> Path:
    """All rounds; returns `<run>/rounds` holding one directory per round and the manifest."""
    from rlrf4rec.stages.generate import policy_generations
    from rlrf4rec.stages.shift import run_shift
    from rlrf4rec.stages.train import run_recommender

    if cfg.generate.num_samples < 2:
        raise ValueError(f"generate.num_samples={cfg.generate.num_samples}: best-of-N pairs need at least 2 samples")
    layout = cfg.layout
    data_dir = layout.data
    cfg.check_against_data(read_marker(data_dir)["stats"])  # more train or eval users than the splits hold
    home = assets.asset_home(cfg.assets.home)
    policy, recommender_dir = start_policy(cfg), layout.recommender("base")
    manifest: dict = {
        "config_hash": cfg.section_hash(*cfg.to_dict()),
        "data": read_marker(data_dir)["fingerprint"],
        "encoder": cfg.models.encoder,
        "rounds": [],
    }

    def generate(split: str, max_users: int | None, model: str, version: str) -> Path:
        return policy_generations(cfg, split, max_users, model, version)

    for t in range(cfg.loop.rounds):
        version, next_version = "base" if t == 0 else f"round{t}", f"round{t + 1}"
        policy_path = assets.resolve(policy, home)
        gen_valid = generate("valid", cfg.loop.eval_users, policy_path, version)
        scorer, folds = reward_scorer(cfg, recommender_dir), reward_folds(cfg, recommender_dir)
        rew_valid = run_reward(cfg, gen_valid, scorer, layout.round_step(t, "reward-valid"))
        if cfg.loop.algorithm == "grpo":
            update = _grpo_update(cfg, t, policy_path, scorer, folds)
        else:
            update = _dpo_update(cfg, t, version, policy_path, (gen_valid, rew_valid), scorer, folds)
        fit_dir, new_policy = update["fit_dir"], update["policy"]
        gen_tuned = generate("valid", cfg.loop.eval_users, new_policy, next_version)
        rew_tuned = run_reward(cfg, gen_tuned, scorer, layout.round_step(t, "reward-valid-tuned"))
        record = dict(update["record"])
        if cfg.loop.algorithm == "dpo":  # how far DPO moved the policy (GRPO logs its KL every step)
            shift_dir = run_shift(cfg, fit_dir, policy_path, update["pairs"], gen_tuned, layout.round_step(t, "shift"))
            record["shift"] = read_marker(shift_dir)["stats"]
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
        upstream = {"pairs" if cfg.loop.algorithm == "dpo" else "grpo": read_marker(update["upstream"])["fingerprint"]}
        gen_knowledge, knowledge_dir = write_policy_knowledge(cfg, new_policy, next_version, upstream)
        new_recommender = run_recommender(cfg, next_version, data_dir, layout.user_knowledge(knowledge_dir.name))
        stages = {"generate_valid": gen_valid, **update["stages"]}
        stages.update(generate_valid_tuned=gen_tuned, generate_knowledge=gen_knowledge)
        done = Round(
            index=t,
            algorithm=cfg.loop.algorithm,
            policy_in=policy,
            policy_out=new_policy,
            recommender_in=str(recommender_dir),
            recommender_out=str(new_recommender),
            reward_models=[str(d) for d in scorer],  # the reward ensemble (one without reward.ensemble)
            reward_folds=[[str(d) for d in dirs] for dirs, _ in folds],
            stages={name: str(d) for name, d in stages.items()},
            stats={
                **record,
                "valid_reward": comparison,
                "recommender_metrics": read_marker(new_recommender)["stats"],
            },
        )
        manifest["rounds"].append(done.to_dict())
        layout.rounds.mkdir(parents=True, exist_ok=True)
        write_json(manifest, layout.manifest)
        policy, recommender_dir = new_policy, new_recommender
    return layout.rounds


def _dpo_update(
    cfg: RunConfig, t: int, version: str, policy_path: str, valid: tuple[Path, Path], scorer: list, folds: list
) -> dict:
    """The method's update: N texts per train user, rewarded (cross-fitted), best vs worst pairs, DPO."""
    from rlrf4rec.stages.dpo import run_dpo
    from rlrf4rec.stages.generate import policy_generations

    layout = cfg.layout
    gen_train = policy_generations(cfg, "train", cfg.loop.train_users, policy_path, version)
    rew_train = run_reward(cfg, gen_train, scorer, layout.round_step(t, "reward-train"), folds)
    pairs_dir = run_pairs(cfg, [(gen_train, rew_train), valid], layout.round_step(t, "pairs"), version, t)
    if not read_marker(pairs_dir)["stats"].get("train/pairs"):
        raise ValueError(
            f"round {t}: no train pair survived ({pairs_dir}); raise loop.train_users or generate.num_samples, "
            "lower reward.min_margin, or raise generate.temperature so the N texts differ"
        )
    train_pairs = pairs_dir / pairs_file("train")
    dpo_dir = run_dpo(cfg, train_pairs, Path(policy_path), f"round{t}", eval_pairs_path=pairs_dir / pairs_file("valid"))
    return {
        "fit_dir": dpo_dir,
        "policy": str(layout.policy(dpo_dir.name)),
        "pairs": train_pairs,
        "upstream": pairs_dir,
        "stages": {"generate_train": gen_train, "pairs": pairs_dir, "dpo": dpo_dir},
        "record": {"pairs": read_marker(pairs_dir)["stats"], "dpo": read_marker(dpo_dir)["stats"]},
    }


def _grpo_update(cfg: RunConfig, t: int, policy_path: str, scorer: list, folds: list) -> dict:
    """On-policy update (loop.algorithm: grpo): GRPO on the rewarded train users' prompts, each completion scored by
    the round's reward model (a cross-fitted user's by its fold's)."""
    from rlrf4rec.core.layout import POLICY_MODEL
    from rlrf4rec.stages.grpo import run_grpo
    from rlrf4rec.stages.reward import rewarded_train_users

    grpo_dir = run_grpo(cfg, rewarded_train_users(cfg), Path(policy_path), f"round{t}", scorer, folds)
    return {
        "fit_dir": grpo_dir,
        "policy": str(grpo_dir / POLICY_MODEL),
        "upstream": grpo_dir,
        "stages": {"grpo": grpo_dir},
        "record": {"grpo": read_marker(grpo_dir)["stats"]},
    }


# --------------------------------------------------------------------------------------------------- the stage record


STAGE = Stage(
    "loop",
    "the RL rounds: generate -> reward -> pairs -> DPO -> retrain the recommender",
    on_ray=on_ray,
    in_run=run_loop,
    upstream=("data", "sft", "train-recommender"),
)
