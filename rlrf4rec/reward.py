"""Reward from recommender feedback (METHOD.md section 5): how well a preference text lets the frozen
knowledge-augmented re-ranker order its user's lists.

Consumes generations (user, sample, preference text), the user's history text, a trained knowledge-augmented
recommender stage and the frozen encoder; produces one reward per generation key: the mean NDCG@K (or MAP@K) over
the user's re-rank lists of their own split (train users: training lists) with the text's vector in place of the
user's knowledge. Deterministic: eval mode, no sampling, same model + text + lists -> same reward.
Knows nothing about how the texts were generated or what the rewards are used for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from rlrf4rec import schema as S
from rlrf4rec.encode import encode_user_texts
from rlrf4rec.metrics import pairwise_log_likelihood, rank_metrics
from rlrf4rec.recommender import RerankBatch, RerankTask, load_checkpoint, load_tables

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
        cls, recommender_dir: Path, data_dir: Path, metric: str = "ndcg@5", *, require_knowledge: bool = True
    ) -> RewardModel:
        """A recommender stage's model.pt around the data stage's lists (ID-only allowed for evaluation only)."""
        ckpt = load_checkpoint(Path(recommender_dir) / "model.pt", load_tables(data_dir))
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
                batch = RerankBatch(
                    batch.candidates, batch.attributes, batch.history, batch.labels, torch.arange(len(list_idx))
                )
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
    """Ray Data callable: the encoder and the frozen recommender load once per actor, then each batch of
    (user_id, knowledge_text) rows gets its rewards. Rows of a user are scored independently, so any batching
    gives the same rewards."""

    def __init__(self, make_encoder: Callable[[], object], recommender_dir: str, data_dir: str, metric: str):
        self.encoder = make_encoder()
        self.model = RewardModel.load(Path(recommender_dir), Path(data_dir), metric=metric)

    def __call__(self, batch: pa.Table) -> pa.Table:
        vectors = self.model.encode(self.encoder, batch.column(S.KNOWLEDGE_TEXT).to_pylist())
        rewards = self.model.score(batch.column(S.USER_ID).to_pylist(), vectors)
        return batch.append_column(S.REWARD, pa.array(rewards, pa.float64()))


def score_on_ray(
    rows: pa.Table,
    make_encoder: Callable[[], object],
    recommender_dir: Path,
    data_dir: Path,
    metric: str,
    *,
    batch_size: int,
    concurrency: int,
) -> np.ndarray:
    """Rewards of `rows` (user_id, knowledge_text) on Ray Data, `concurrency` actors; returned in row order."""
    import ray
    from ray.data import ActorPoolStrategy

    if not ray.is_initialized():
        raise RuntimeError("reward.engine=ray runs on Ray Data: call ray.init() first (the CLI does)")
    indexed = rows.append_column("row", pa.array(np.arange(rows.num_rows), pa.int64()))
    blocks = [indexed.slice(lo, batch_size) for lo in range(0, indexed.num_rows, batch_size)]
    ds = ray.data.from_arrow(blocks).map_batches(
        ScoreBatch,
        fn_constructor_args=(make_encoder, str(recommender_dir), str(data_dir), metric),
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
