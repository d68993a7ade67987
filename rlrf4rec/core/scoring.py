"""The frozen re-ranker as a scorer: a preference text's reward for its user (METHOD.md section 5).

`RewardModel` is one trained knowledge-augmented re-ranker in eval mode over a user's re-rank lists, with the text's
vector in place of the user's knowledge; `RewardEnsemble` the mean of several seeds; `TextRewarder` the reward of a
batch of (user, preference text), through the ensemble (or a cross-fitting fold's) or the synthetic genre reward.
Deterministic: eval mode, no sampling. Used by the reward stage, GRPO's reward function, evaluation and the
controls; knows nothing about how the texts were generated or what the rewards are used for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import read_parquet, read_table, read_tables
from rlrf4rec.core.config import RunConfig
from rlrf4rec.core.history import user_history_texts
from rlrf4rec.core.knowledge import embedding_cache, encode_user_texts, make_encoder, user_vectors, vectors_of
from rlrf4rec.core.metrics import (
    SYNTHETIC_CONTRAST,
    SYNTHETIC_METRICS,
    contrast_genre_reward,
    pairwise_log_likelihood,
    rank_metrics,
    synthetic_genre_reward,
)
from rlrf4rec.core.prompts import user_knowledge_text
from rlrf4rec.core.recommender import RerankTask, load_checkpoint


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


def knowledge_matrix(path: Path | None, users: list[str]) -> torch.Tensor | None:
    """User knowledge Parquet (schema.USER_KNOWLEDGE) -> [U, D] or [U, S, D] rows in `users` order; every user
    must have one."""
    if path is None:
        return None
    table = read_parquet(path, S.USER_KNOWLEDGE)
    row = {u: i for i, u in enumerate(table.column(S.USER_ID).to_pylist())}
    missing = [u for u in users if u not in row]
    if missing:
        raise ValueError(f"{path} has no knowledge for {len(missing)} users (e.g. {missing[:3]}); re-run its stage")
    vectors = user_vectors(table)
    return torch.from_numpy(vectors[[row[u] for u in users]])


def item_knowledge_matrix(path: Path | None, task: RerankTask) -> torch.Tensor | None:
    """Item knowledge Parquet (schema.ITEM_KNOWLEDGE) -> [num_items + 1, D] by item idx, row 0 (padding) zero;
    every item of the task must have one."""
    if path is None:
        return None
    table = read_parquet(path, S.ITEM_KNOWLEDGE)
    to_idx = task.item_index
    ids = table.column(S.ITEM_ID).to_pylist()
    missing = set(to_idx) - set(ids)
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} items (e.g. {sorted(missing)[:3]}); re-run `rlrf4rec encode`")
    vectors = vectors_of(table)
    out = torch.zeros(task.num_items + 1, vectors.shape[1])
    keep = [i for i, item in enumerate(ids) if item in to_idx]
    out[[to_idx[ids[i]] for i in keep]] = torch.from_numpy(vectors[keep])
    return out


def check_fold(folds: int, f: int, held_out: int, train_users: int, fix: str) -> None:
    """A cross-fitted model trains on the train users its fold does not hold out: at least 2 must be left."""
    if train_users - held_out < 2:
        raise ValueError(
            f"reward.cross_fit_folds={folds}: fold {f} holds out {held_out} of {train_users} train users, leaving "
            f"too few to train on; {fix}"
        )
