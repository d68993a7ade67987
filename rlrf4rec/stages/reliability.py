"""Reward reliability (`rlrf4rec controls --reliability GEN_DIR`): how far the recommender reward can be trusted on
a generate stage's texts. Per user: how often its N texts tie, how well two reward-model seeds agree on their order
(Spearman, with a users-resampled interval), and how often the text the model was trained with wins; for each
reward metric and for in-sample against cross-fitted scoring. Writes `<run>/controls/reliability-<name>/`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import Fingerprint, publish, read_parquet, read_tables, require_marker, write_json
from rlrf4rec.core.audit import spearman
from rlrf4rec.core.config import RunConfig, dump_config
from rlrf4rec.core.layout import GENERATIONS, ITEM_KNOWLEDGE, RELIABILITY
from rlrf4rec.core.metrics import bootstrap_ci
from rlrf4rec.core.prompts import user_knowledge_text
from rlrf4rec.core.recommender import RerankTask, model_spec, train_model
from rlrf4rec.core.scoring import check_fold, item_knowledge_matrix
from rlrf4rec.core.stage import Stage
from rlrf4rec.stages.controls import base_llm_knowledge_texts

log = logging.getLogger(__name__)


def _order_stats(rewards: list[np.ndarray], by_user: dict[str, list[int]], first: np.ndarray) -> dict:
    """Ties, seed agreement and how often the text the model was trained with (sample 0) wins, over users."""
    tied = [np.ptp(rewards[0][rows]) < 1e-12 for rows in by_user.values()]
    tops = [rewards[0][rows] for rows in by_user.values()]
    wins = [float(np.mean(first[rows][r == r.max()])) for rows, r in zip(by_user.values(), tops) if np.ptp(r)]
    rhos = [spearman(rewards[0][rows], rewards[1][rows]) for rows in by_user.values()] if len(rewards) > 1 else []
    defined = [r for r in rhos if r is not None]
    ci = None
    if len(defined) > 1:  # users resampled: the mean's 95% percentile interval
        ci = list(bootstrap_ci(defined, 1000, seed=0)[1:])
    return {
        "tied_share": float(np.mean(tied)),
        "spearman_mean": float(np.mean(defined)) if defined else None,
        "spearman_ci": ci,
        "spearman_per_user": [None if r is None else round(r, 4) for r in rhos],
        "spearman_defined_users": len(defined),
        "within_user_range_mean": float(np.mean([np.ptp(rewards[0][rows]) for rows in by_user.values()])),
        # Sample 0 is each user's knowledge text in training (knowledge.user = llm): a fitted user's lists make it
        # win more often than 1/N. Texts tied at the top share the win.
        "first_sample_best_share": float(np.mean(wins)) if wins else None,
    }


def base_knowledge(cfg: RunConfig, task: RerankTask, encoder, cache: Path | None) -> dict[str, torch.Tensor]:
    """The knowledge the run's base recommender (the round-0 reward model) trains with, in `task`'s user order:
    the base policy's text (+ history text, knowledge.history_text) with knowledge.user = llm, else the history
    text; and the run's item knowledge unless knowledge.item is none."""
    from rlrf4rec.core.history import user_history_texts
    from rlrf4rec.core.knowledge import encode_user_texts
    from rlrf4rec.stages.encode import write_item_knowledge

    trained_on = base_llm_knowledge_texts(cfg) if cfg.knowledge.user == "llm" else user_history_texts(cfg)
    user_texts = [trained_on[u] for u in task.users]
    knowledge = {"user": torch.from_numpy(encode_user_texts(encoder, user_texts, cfg.knowledge.user_segments, cache))}
    if cfg.knowledge.item != "none":
        knowledge["item"] = item_knowledge_matrix(write_item_knowledge(cfg) / ITEM_KNOWLEDGE, task)
    return knowledge


def reward_reliability(cfg: RunConfig, generations_dir: Path, seeds: int = 2, folds: int = 2) -> dict:
    """How trustworthy the reward is on the texts it will rank: reward models trained like the base one (the
    pipeline's base user and item knowledge, the run's architecture), `seeds` of them, score every generated text
    of train users.

    Two ways, side by side: in-sample (models trained on every train user, as the base recommender is), and
    cross-fitted (users split into `folds`; each user's texts scored by a model trained without that user's lists).
    Each reports the share of users whose N rewards all tie (no pair can be formed), the mean Spearman agreement
    between two seeds on the order of each user's texts (the order is what the pairs use), and how often sample 0
    (the text the in-sample model was trained with) is the best."""
    from rlrf4rec.core.history import user_history_texts
    from rlrf4rec.core.knowledge import embedding_cache, encode_user_texts, make_encoder
    from rlrf4rec.core.protocol import stable_seed
    from rlrf4rec.core.scoring import RewardModel
    from rlrf4rec.stages.data import require_data

    require_data(cfg, "controls --reliability")
    data_dir = cfg.layout.data
    gens = read_parquet(generations_dir / GENERATIONS, S.GENERATIONS)
    spec = model_spec(cfg.recommender)
    histories = user_history_texts(cfg)
    encoder = make_encoder(cfg)
    cache = embedding_cache(cfg)
    task = RerankTask(read_tables(data_dir), spec)
    users_gen = gens.column(S.USER_ID).to_pylist()
    train_users = set(task.list_users["train"])
    keep = [i for i, u in enumerate(users_gen) if u in train_users]
    users = [users_gen[i] for i in keep]
    texts = [
        user_knowledge_text(histories[u], gens.column(S.PREFERENCE_TEXT)[i].as_py(), cfg.knowledge.history_text)
        for i, u in zip(keep, users)
    ]
    first = np.array([gens.column(S.SAMPLE_IDX)[i].as_py() == 0 for i in keep])
    knowledge = base_knowledge(cfg, task, encoder, cache)
    vectors = encode_user_texts(encoder, texts, cfg.knowledge.user_segments, cache)
    by_user: dict[str, list[int]] = {}
    for row, u in enumerate(users):
        by_user.setdefault(u, []).append(row)
    fold_of = {u: stable_seed(cfg.seed, "reliability-fold", u) % folds for u in by_user}
    for f in range(folds):  # the scored users are train users
        check_fold(folds, f, sum(k == f for k in fold_of.values()), len(train_users), "use 2 or more folds")

    metrics = [cfg.reward.metric, *(["pairwise"] if cfg.reward.metric != "pairwise" else [])]

    def score(model: torch.nn.Module, rows: list[int]) -> dict[str, np.ndarray]:
        """metric -> rewards of `rows`: the same model's scores read as each reward definition."""
        out = {}
        for metric in metrics:
            rm = RewardModel(
                task, model, metric, item_knowledge=knowledge.get("item"), user_segments=cfg.knowledge.user_segments
            )
            out[metric] = rm.score([users[r] for r in rows], vectors[rows])
        return out

    in_sample: dict[str, list[np.ndarray]] = {m: [] for m in metrics}  # metric -> per seed, rewards of every text
    cross_fit: dict[str, list[np.ndarray]] = {m: [] for m in metrics}
    for i in range(seeds):
        seed = cfg.seed + i
        for m, r in score(train_model(task, knowledge, seed)[0], list(range(len(users)))).items():
            in_sample[m].append(r)
        out = {m: np.zeros(len(users)) for m in metrics}
        for f in range(folds):
            held = {u for u, k in fold_of.items() if k == f}
            rows = [r for r, u in enumerate(users) if u in held]
            for m, r in score(train_model(task.without_train_users(held), knowledge, seed)[0], rows).items():
                out[m][rows] = r
        for m in metrics:
            cross_fit[m].append(out[m])

    def ways(m: str) -> dict:
        result = {"in_sample": _order_stats(in_sample[m], by_user, first)}
        result["cross_fit"] = {**_order_stats(cross_fit[m], by_user, first), "folds": folds}
        # Ensembles of k = 2 .. seeds // 2 models (seeds 0..k-1 against k..2k-1): does averaging seeds make the
        # order reproducible, and as much as Spearman-Brown predicts from one pair of seeds (independent noise)?
        for way, per_seed in (("in_sample", in_sample[m]), ("cross_fit", cross_fit[m])):
            single = result[way]["spearman_mean"]
            for k in range(2, seeds // 2 + 1):
                pair = [np.mean(per_seed[:k], axis=0), np.mean(per_seed[k : 2 * k], axis=0)]
                # defined for r > -1/(k-1) (at most -1 apart, k noisy copies cannot agree less than that)
                defined = single is not None and 1 + (k - 1) * single > 0
                predicted = k * single / (1 + (k - 1) * single) if defined else None
                result[f"{way}_ensemble{k}"] = {**_order_stats(pair, by_user, first), "spearman_brown": predicted}
        return result

    by_metric = {m: ways(m) for m in metrics}
    return {
        "train_users": len(by_user),
        "texts": len(users),
        **by_metric[cfg.reward.metric],
        "metrics": by_metric,
        "settings": {
            "trained_on": cfg.knowledge.user,
            "interaction": spec.interaction,
            "item": cfg.knowledge.item,
            "user_segments": cfg.knowledge.user_segments,
            "loss": spec.loss,
        },
    }


def run_reward_reliability(cfg: RunConfig, generations_dir: Path, *, seeds: int = 2, name: str = "main") -> Path:
    """`reward_reliability` written to `<run>/controls/reliability-<name>/` (stats in the marker)."""
    gen_marker = require_marker(generations_dir, "generate")
    result = reward_reliability(cfg, generations_dir, seeds, folds=cfg.reward.cross_fit_folds or 2)
    fingerprint = Fingerprint(
        "reliability",
        cfg.section_hashes("knowledge", "recommender", "reward", "seed"),
        {"generations": gen_marker["fingerprint"]},
    )

    def write(tmp: Path, stats: dict) -> None:
        write_json(result, tmp / RELIABILITY)
        stats.update({k: v for k, v in result.items() if not isinstance(v, dict)})
        for metric, by_way in result["metrics"].items():
            for way, values in by_way.items():
                prefix = way if metric == cfg.reward.metric else f"{metric}/{way}"
                stats.update({f"{prefix}/{k}": v for k, v in values.items() if k != "spearman_per_user"})

    # A measurement: written anew on every call.
    return publish(cfg.layout.controls(f"reliability-{name}"), fingerprint, write, dump_config(cfg), force=True)


STAGE = Stage(
    "reliability",
    "reward reliability (controls --reliability): ties and seed agreement of the reward on a generation",
    upstream=("data", "encode", "generate"),
    inside="controls",
)
