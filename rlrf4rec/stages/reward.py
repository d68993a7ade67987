"""Reward from recommender feedback (METHOD.md section 5): how well a preference text lets the frozen
knowledge-augmented re-ranker order its user's lists.

Consumes generations (user, sample, preference text), the user's history text, a trained knowledge-augmented
recommender stage and the frozen encoder; produces one reward per generation key: the mean NDCG@K (or MAP@K) over
the user's re-rank lists of their own split (train users: training lists) with the text's vector in place of the
user's knowledge. Deterministic: eval mode, no sampling, same model + text + lists -> same reward.
Knows nothing about how the texts were generated or what the rewards are used for.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import (
    is_complete,
    read_parquet,
    read_table,
    read_tables,
    require_marker,
    stage_output,
    write_parquet,
)
from rlrf4rec.core.config import RunConfig, dump_config
from rlrf4rec.core.layout import GENERATIONS, REWARDS
from rlrf4rec.core.metrics import (
    SYNTHETIC_CONTRAST,
    SYNTHETIC_METRICS,
    bootstrap_ci,
    contrast_genre_reward,
    pairwise_log_likelihood,
    rank_metrics,
    synthetic_genre_reward,
)
from rlrf4rec.core.prompts import user_knowledge_text
from rlrf4rec.core.recommender import RerankTask, load_checkpoint
from rlrf4rec.stages.data import user_history_texts
from rlrf4rec.stages.encode import embedding_cache, encode_user_texts, make_encoder

log = logging.getLogger(__name__)


@dataclass
class RewardModel:
    """A trained knowledge-augmented re-ranker, frozen, with the lists of every user indexed for scoring."""

    task: RerankTask
    model: torch.nn.Module
    metric: str = "ndcg@5"
    chunk_lists: int = 4096  # lists per forward pass
    item_knowledge: torch.Tensor | None = None  # [num_items + 1, D], what the model was trained with
    user_segments: int = 0  # how a text is encoded for it: 0 = one vector, k = up to k segment vectors
    by_user: dict[str, tuple[str, torch.Tensor]] = field(init=False)  # user -> (split, its list indices)

    def __post_init__(self) -> None:
        by_user: dict[str, tuple[str, list[int]]] = {}
        for split, users in self.task.list_users.items():
            for i, u in enumerate(users):
                by_user.setdefault(u, (split, []))[1].append(i)
        self.by_user = {u: (s, torch.tensor(idx, dtype=torch.long)) for u, (s, idx) in by_user.items()}

    @classmethod
    def load(
        cls,
        recommender_dir: Path,
        data_dir: Path,
        metric: str = "ndcg@5",
        *,
        require_knowledge: bool = True,
        task: RerankTask | None = None,
    ) -> RewardModel:
        """A recommender stage's model.pt around the data stage's lists (ID-only allowed for evaluation only).
        `task`: one already built from those tables (another model's), whose lists are shared instead of re-read."""
        ckpt = load_checkpoint(recommender_dir, read_tables(data_dir) if task is None else task)
        if require_knowledge and ckpt.user_knowledge_dim is None:
            raise ValueError(f"{recommender_dir} is an ID-only recommender; the reward needs a knowledge-augmented one")
        return cls(ckpt.task, ckpt.model, metric, item_knowledge=ckpt.item_knowledge, user_segments=ckpt.user_segments)

    def encode(self, encoder, texts: Sequence[str], cache: Path | None = None) -> np.ndarray:
        """User knowledge texts -> what this model reads: [N, D], or [N, S, D] segment vectors."""
        return encode_user_texts(encoder, texts, self.user_segments, cache)

    def knowledge(self, user: torch.Tensor | None) -> dict[str, torch.Tensor] | None:
        """The model's knowledge input: user rows (None for an ID-only model) and the model's item knowledge."""
        out = {} if user is None else {"user": user}
        if self.item_knowledge is not None:
            out["item"] = self.item_knowledge
        return out or None

    @torch.inference_mode()
    def score(self, user_ids: Sequence[str], vectors: np.ndarray) -> np.ndarray:
        """Reward [R] of row r = mean metric over user_ids[r]'s lists with vectors[r] ([D] or [S, D], `encode`)
        as its knowledge."""
        if len(user_ids) != len(vectors):
            raise ValueError(f"{len(user_ids)} users but {len(vectors)} vectors")
        name = self.metric
        k = int(name.split("@")[1]) if "@" in name else 5
        rewards = np.zeros(len(user_ids), dtype=np.float64)
        pending: list[tuple[int, str, torch.Tensor]] = []  # (row, split, list indices)
        for row, user in enumerate(user_ids):
            if user not in self.by_user:
                raise ValueError(f"user {user!r} has no re-rank list; it cannot be rewarded (sequence too short?)")
            pending.append((row, *self.by_user[user]))
        knowledge = torch.from_numpy(np.asarray(vectors, dtype=np.float32))  # [R, D] or [R, S, D]
        if knowledge.dim() != (3 if self.user_segments else 2):
            raise ValueError(
                f"this reward model reads {'[R, S, D] segment vectors' if self.user_segments else '[R, D] vectors'}, "
                f"got {tuple(knowledge.shape)}; encode the texts with RewardModel.encode"
            )
        start = 0
        while start < len(pending):
            group, total = [], 0
            while start < len(pending) and (not group or total + len(pending[start][2]) <= self.chunk_lists):
                group.append(pending[start])
                total += len(pending[start][2])
                start += 1
            parts = []
            for split in S.SPLITS:
                rows = [(r, idx) for r, s, idx in group if s == split]
                if not rows:
                    continue
                data = self.task.splits[split]
                list_idx = torch.cat([idx for _, idx in rows])
                owner = torch.cat([torch.full((len(idx),), r, dtype=torch.long) for r, idx in rows])
                batch = data.take(list_idx)
                batch = dataclasses.replace(batch, user_row=torch.arange(len(list_idx)))
                logits = self.task.logits(self.model, batch, self.knowledge(knowledge[owner]))  # [n, C]
                values = list_rewards(logits, batch.labels, batch.candidates != 0, name, k)  # [n]
                parts.append((owner.numpy(), values))
            for owner, values in parts:
                sums = np.bincount(owner, weights=values, minlength=len(user_ids))
                counts = np.bincount(owner, minlength=len(user_ids))
                hit = counts > 0
                rewards[hit] += sums[hit] / counts[hit]
        return rewards


def list_rewards(logits, labels, mask, name: str, k: int) -> np.ndarray:
    """Per-list reward [n]: ndcg@K / map@K, or "pairwise" (mean log sigmoid(s_pos - s_neg) over the list's
    positive-negative pairs: smooth, where NDCG moves only when an order flips)."""
    if name == "pairwise":
        return pairwise_log_likelihood(logits, labels, mask)
    return rank_metrics(logits, labels, ks=(k,), mask=mask)[name]


@dataclass
class RewardEnsemble:
    """A reward model made of several frozen re-rankers (the same variant trained with reward.ensemble seeds): a
    text's reward is the mean of theirs. Averaging K models whose order of a user's texts agrees at r between two
    seeds makes two such ensembles agree at about K r / (1 + (K - 1) r) (Spearman-Brown), measured by
    `rlrf4rec controls --reliability`."""

    members: list[RewardModel]

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError("a reward ensemble needs at least one recommender")
        if len({m.user_segments for m in self.members}) > 1:
            raise ValueError("the ensemble's recommenders read texts differently (knowledge.user_segments differ)")

    @classmethod
    def load(cls, recommender_dirs: Sequence[Path], data_dir: Path, metric: str = "ndcg@5") -> RewardEnsemble:
        dirs = [Path(d) for d in recommender_dirs]
        if not dirs:
            return cls([])  # refused, with the reason
        head = RewardModel.load(dirs[0], data_dir, metric=metric)  # the data tables are read once, lists shared
        return cls([head, *(RewardModel.load(d, data_dir, metric=metric, task=head.task) for d in dirs[1:])])

    @property
    def by_user(self) -> dict[str, tuple[str, torch.Tensor]]:
        return self.members[0].by_user

    def encode(self, encoder, texts: Sequence[str], cache: Path | None = None) -> np.ndarray:
        return self.members[0].encode(encoder, texts, cache)

    def score(self, user_ids: Sequence[str], vectors: np.ndarray) -> np.ndarray:
        """The members' mean reward of each row (RewardModel.score)."""
        return np.mean([m.score(user_ids, vectors) for m in self.members], axis=0)


class TextRewarder:
    """A preference text's reward for its user: the reward stage's computation, callable per batch of texts (the
    reward stage calls it on a generations table; GRPO on each step's completions).

    With a recommender metric: the user's knowledge text (the preference text, then the history text with
    knowledge.history_text) encoded by the frozen encoder and scored by the reward ensemble `scorer`, or, for a user
    of a cross-fitting fold, by that fold's ensemble (`folds`: (recommender dirs, users)). With synthetic-genres: the
    text against the user's list genres (the contrast: less its mean over the other users of its split). Models,
    encoder and tables load on first use, once."""

    def __init__(
        self,
        cfg: RunConfig,
        scorer: Sequence[Path] = (),
        folds: Sequence[tuple[Sequence[Path], Sequence[str]]] = (),
    ):
        self.cfg = cfg
        self.main = tuple(scorer)
        self.scorer_of = {u: tuple(dirs) for dirs, fold in folds for u in fold}
        self.groups = list(dict.fromkeys([self.main, *(tuple(dirs) for dirs, _ in folds)]))
        self._models: dict[tuple, RewardEnsemble] = {}
        self._encoder = None
        self._histories: dict[str, str] | None = None
        self._genres: dict[str, tuple[set[str], set[str]]] | None = None
        self._peers: dict[str, list[tuple[set[str], set[str]]]] | None = None

    @property
    def synthetic(self) -> bool:
        return self.cfg.reward.metric in SYNTHETIC_METRICS

    def model(self, group: tuple) -> RewardEnsemble:
        if group not in self._models:
            self._models[group] = RewardEnsemble.load(group, self.cfg.layout.data, metric=self.cfg.reward.metric)
        return self._models[group]

    def rewardable(self) -> set[str]:
        """Users with re-rank lists: the only ones a text can be rewarded for."""
        if self.synthetic:
            return set(self._list_genres())
        return set(self.model(self.main).by_user)

    def knowledge_texts(self, users: Sequence[str], preferences: Sequence[str]) -> list[str]:
        if self._histories is None:
            self._histories = user_history_texts(self.cfg)
        with_history = self.cfg.knowledge.history_text
        return [user_knowledge_text(self._histories[u], t, with_history) for u, t in zip(users, preferences)]

    def rows_of(self, users: Sequence[str], group: tuple) -> list[int]:
        """Rows whose user `group` rewards (its fold's ensemble, or the main one for users of no fold)."""
        return [i for i, u in enumerate(users) if self.scorer_of.get(u, self.main) == group]

    def __call__(self, users: Sequence[str], preferences: Sequence[str]) -> np.ndarray:
        """Reward [R] of row r: preferences[r] as users[r]'s text."""
        if self.synthetic:
            return self._synthetic(users, preferences)
        texts = self.knowledge_texts(users, preferences)
        rewards = np.zeros(len(users))
        for group in self.groups:
            rows = self.rows_of(users, group)
            if rows:
                model = self.model(group)
                self._encoder = self._encoder or make_encoder(self.cfg)
                vectors = model.encode(self._encoder, [texts[i] for i in rows], embedding_cache(self.cfg))
                rewards[rows] = model.score([users[i] for i in rows], vectors)
        return rewards

    def _list_genres(self) -> dict[str, tuple[set[str], set[str]]]:
        if self._genres is None:
            self._genres = list_genres(read_tables(self.cfg.layout.data, ("items", "rerank_lists")))
        return self._genres

    def _synthetic(self, users: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        by_user = self._list_genres()
        if self.cfg.reward.metric != SYNTHETIC_CONTRAST:
            return np.array([synthetic_genre_reward(t, *by_user[u]) for u, t in zip(users, texts)], dtype=np.float64)
        if self._peers is None:
            seqs = read_table(self.cfg.layout.data, "sequences")
            split = dict(zip(seqs.column(S.USER_ID).to_pylist(), seqs.column(S.SPLIT).to_pylist()))
            members: dict[str, list[str]] = {}
            for u in sorted(by_user):
                members.setdefault(split[u], []).append(u)
            self._peers = {u: [by_user[v] for v in members[split[u]] if v != u] for u in by_user}
        return np.array(
            [contrast_genre_reward(t, by_user[u], self._peers[u]) for u, t in zip(users, texts)], dtype=np.float64
        )


def rewards_table(generations: pa.Table, rewards: np.ndarray) -> pa.Table:
    return pa.table(
        {
            S.USER_ID: generations.column(S.USER_ID),
            S.SAMPLE_IDX: generations.column(S.SAMPLE_IDX),
            S.SPLIT: generations.column(S.SPLIT),
            S.POLICY_VERSION: generations.column(S.POLICY_VERSION),
            S.REWARD: pa.array(rewards, pa.float64()),
        },
        schema=S.REWARDS,
    )


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
    import ray
    from ray.data import ActorPoolStrategy

    if not ray.is_initialized():
        raise RuntimeError("reward.engine=ray runs on Ray Data: call ray.init() first (the CLI does)")
    members = [recommender_dir] if isinstance(recommender_dir, (str, Path)) else list(recommender_dir)
    indexed = rows.append_column("row", pa.array(np.arange(rows.num_rows), pa.int64()))
    blocks = [indexed.slice(lo, batch_size) for lo in range(0, indexed.num_rows, batch_size)]
    ds = ray.data.from_arrow(blocks).map_batches(
        ScoreBatch,
        fn_constructor_args=(make_encoder, [str(d) for d in members], str(data_dir), metric),
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=concurrency),
        num_cpus=1,
    )
    out = pa.concat_tables(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    returned = out.column("row").to_numpy()
    if len(returned) != rows.num_rows or len(np.unique(returned)) != rows.num_rows:
        raise RuntimeError(f"Ray Data returned {len(returned)} rewards for {rows.num_rows} rows (lost or repeated)")
    rewards = np.empty(rows.num_rows, dtype=np.float64)
    rewards[returned] = out.column(S.REWARD).to_numpy()
    return rewards


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
    upstream = [
        require_marker(generations_dir, "generate")["fingerprint"],
        *(require_marker(d, "train-recommender")["fingerprint"] for group in groups for d in group),
    ]
    # reward.ensemble is the number of member fingerprints above: one seed rewards as before the field existed
    sections = cfg.section_hash("reward", "encode", "knowledge", "models", ignore=("reward.ensemble",))
    fingerprint = f"{sections}-{'-'.join(upstream)}"
    if is_complete(stage_dir, fingerprint):
        return stage_dir
    gens = read_parquet(generations_dir / GENERATIONS, S.GENERATIONS)
    rewarder = TextRewarder(cfg, main, folds)
    has_lists = pc.is_in(gens.column(S.USER_ID), pa.array(sorted(rewarder.rewardable())))
    unscorable = gens.num_rows - pc.sum(has_lists).as_py()
    if unscorable:  # a user whose sequence left no complete re-rank list cannot be rewarded
        log.warning("%s: %d texts of users without re-rank lists are not rewarded", stage, unscorable)
        gens = gens.filter(has_lists)
    users = gens.column(S.USER_ID).to_pylist()
    preferences = gens.column(S.PREFERENCE_TEXT).to_pylist()
    scorer_of = rewarder.scorer_of
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
    with stage_output(stage_dir, fingerprint, dump_config(cfg)) as (tmp, stats):
        write_parquet(table, tmp / REWARDS, S.REWARDS)
        spread = within_user_spread(table)
        stats.update(
            {
                "rows": table.num_rows,
                "reward/mean": float(rewards.mean()),
                "reward/std": float(rewards.std()),
                "reward/within_user_range_mean": spread,
                "cross_fitted_rows": sum(u in scorer_of for u in users),
                "ensemble": len(main),
            }
        )
    log.info("%s: mean reward %.4f over %d texts", stage, rewards.mean(), len(rewards))
    return stage_dir


def list_genres(tables: dict[str, pa.Table]) -> dict[str, tuple[set[str], set[str]]]:
    """user -> (genres of the liked items, genres of the other items) over the re-rank lists of the user's own split
    (schema.RERANK_LISTS and ITEMS rows; genres lower case)."""
    genres = dict(zip(tables["items"].column(S.ITEM_ID).to_pylist(), tables["items"].column(S.GENRES).to_pylist()))
    out: dict[str, tuple[set[str], set[str]]] = {}
    for r in tables["rerank_lists"].select([S.USER_ID, S.CANDIDATE_ITEMS, S.LABELS]).to_pylist():
        liked, other = out.setdefault(r[S.USER_ID], (set(), set()))
        for item, label in zip(r[S.CANDIDATE_ITEMS], r[S.LABELS]):
            (liked if label > 0 else other).update(g.lower() for g in genres[item] if g.lower() != "unknown")
    return out


def run_synthetic_reward(cfg: RunConfig, generations_dir: Path, stage_dir: Path) -> Path:
    """reward.metric = synthetic-genres, the RL loop's positive control: each text rewarded by
    core.metrics.synthetic_genre_reward against its user's list genres; synthetic-genres-contrast: less its mean
    against every other user of the same split (core.metrics.contrast_genre_reward). No recommender, no encoder."""
    upstream = [
        require_marker(d, what)["fingerprint"] for d, what in ((generations_dir, "generate"), (cfg.layout.data, "data"))
    ]
    fingerprint = f"{cfg.section_hash('reward')}-{'-'.join(upstream)}"
    if is_complete(stage_dir, fingerprint):
        return stage_dir
    gens = read_parquet(generations_dir / GENERATIONS, S.GENERATIONS)
    rewarder = TextRewarder(cfg)
    gens = gens.filter(pc.is_in(gens.column(S.USER_ID), pa.array(sorted(rewarder.rewardable()))))
    rewards = rewarder(gens.column(S.USER_ID).to_pylist(), gens.column(S.PREFERENCE_TEXT).to_pylist())
    table = rewards_table(gens, rewards)
    with stage_output(stage_dir, fingerprint, dump_config(cfg)) as (tmp, stats):
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
    return stage_dir


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
    from rlrf4rec.stages.generate import select_users
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
    from rlrf4rec.stages.generate import select_users

    sequences = read_table(cfg.layout.data, "sequences")
    return select_users(sequences, ("train",), cfg.loop.train_users).column(S.USER_ID).to_pylist()


def check_fold(folds: int, f: int, held_out: int, train_users: int, fix: str) -> None:
    """A cross-fitted model trains on the train users its fold does not hold out: at least 2 must be left."""
    if train_users - held_out < 2:
        raise ValueError(
            f"reward.cross_fit_folds={folds}: fold {f} holds out {held_out} of {train_users} train users, leaving "
            f"too few to train on; {fix}"
        )


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
