"""Training and evaluating the recommenders on the data stage's tables (pure torch, no Ray).

Two tasks share one training loop (`fit`):
- RerankTask: a re-ranker (PRM, SetRank, DLCM or SASRec) on KAR re-rank lists, BCE loss, NDCG@K/MAP@K per list.
  Knowledge-augmented when given a user knowledge matrix; this is the reward model of the RL loop.
- NextItemTask: SASRec on the leave-one-out split, full-softmax CE at every position, full-sort HR@10/NDCG@10
  (RecBole's protocol), for comparison with sequential-recommendation work.
Consumes Arrow tables and numpy knowledge vectors; produces trained modules, metric dicts and per-list values.
Early stopping and model selection read valid only; test is evaluated once by the caller. Knows nothing about Ray,
files or texts (rlrf4rec.stages.train runs `fit` under Ray Train).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from rlrf4rec.core import schema as S
from rlrf4rec.core.config import ModelSettings, RecommenderConfig
from rlrf4rec.core.layout import RECOMMENDER_MODEL
from rlrf4rec.core.metrics import RERANK_KS, full_sort_metrics, mean_metrics, rank_metrics
from rlrf4rec.core.models import DLCM, LOSSES, PRM, KnowledgeAdaptor, SASRec, SASRecRanker, SetRank

log = logging.getLogger(__name__)

RERANKERS = {"prm": PRM, "setrank": SetRank, "dlcm": DLCM}  # list-wise; "sasrec" builds a SASRecRanker

# Knowledge as the tasks take it: None (ID-only), a user matrix [U, D] / [U, S, D] (rows in the task's user order),
# or {"user": that, "item": [num_items + 1, D] (row = item idx, row 0 = padding)}; either key may be left out.
KnowledgeInput = torch.Tensor | dict[str, torch.Tensor] | None


@dataclass(frozen=True)
class ModelSpec(ModelSettings):
    """The model and training settings a checkpoint records: the config's (`ModelSettings`, built from the run's
    RecommenderConfig by the stage) and the next-item task's sequence length. Plain values: checked by the config."""

    max_seq_len: int = 50  # NextItemTask: the history positions SASRec reads (the re-rankers read history_len)


def item_lookup(item_index: pa.Table) -> dict[str, int]:
    return dict(zip(item_index.column(S.ITEM_ID).to_pylist(), item_index.column(S.ITEM_IDX).to_pylist()))


def _adaptor(spec: ModelSpec, dims: dict[str, int | None]) -> KnowledgeAdaptor | None:
    """The KAR adaptor over the knowledge types with a dim ("user", "item"), or None for an ID-only model."""
    dims = {t: d for t, d in dims.items() if d is not None}
    if not dims:
        return None
    shared, specific = spec.adaptor_shared_experts, spec.adaptor_specific_experts
    return KnowledgeAdaptor(dims, shared, specific, spec.adaptor_hidden, spec.adaptor_out, spec.dropout)


def knowledge_dims(knowledge: KnowledgeInput) -> dict[str, int | None]:
    """type -> embedding dim of the knowledge a model will be fed (None: no such knowledge)."""
    if knowledge is None:
        return {"user": None}
    if isinstance(knowledge, torch.Tensor):
        knowledge = {"user": knowledge}
    return {t: int(v.shape[-1]) for t, v in knowledge.items()}


def _shard(n: int, seed: int, rank: int, world: int) -> torch.Tensor:
    """This worker's rows of a seeded permutation of range(n): disjoint strided shards of equal length, the shortest
    topped up from the start of the permutation (as torch's DistributedSampler does). Every worker takes the same
    number of steps, so no collective waits forever for a worker that ran out of rows."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    per_worker = math.ceil(n / world)
    if world > 1 and n % world:
        order = torch.cat([order, order[: per_worker * world - n]])
    return order[rank::world]


def _left_pad(rows: list[list[int]], length: int) -> torch.Tensor:
    out = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        row = row[-length:]
        if row:
            out[i, length - len(row) :] = torch.tensor(row, dtype=torch.long)
    return out


# --------------------------------------------------------------------------------------------------- re-ranking


@dataclass
class RerankBatch:
    candidates: torch.Tensor  # [N, C] item idx
    attributes: torch.Tensor  # [N, C, A] genre idx, 0 = padding
    history: torch.Tensor  # [N, H] left-padded history-window items
    labels: torch.Tensor  # [N, C] float
    user_row: torch.Tensor  # [N] row of the user in the knowledge matrix
    own: torch.Tensor | None = None  # [N, C] bool: candidates whose train count includes the list's owner (ItemPrior)

    def __len__(self) -> int:
        return self.candidates.shape[0]

    def take(self, idx: torch.Tensor) -> RerankBatch:
        fields = (self.candidates, self.attributes, self.history, self.labels, self.user_row, self.own)
        return RerankBatch(*(None if t is None else t[idx] for t in fields))


def gather_knowledge(knowledge: KnowledgeInput, batch: RerankBatch, device) -> dict[str, torch.Tensor] | None:
    """The rows of `knowledge` a batch needs: user knowledge by list owner, item knowledge by candidate."""
    if knowledge is None:
        return None
    if isinstance(knowledge, torch.Tensor):
        knowledge = {"user": knowledge}
    out = {}
    for t, table in knowledge.items():
        index = batch.user_row if t == "user" else batch.candidates  # [B] or [B, C]
        out[t] = table[index.to(table.device)].to(device)  # [B, D] | [B, S, D] | [B, C, D]
    return out


class RerankTask:
    """Re-rank lists of one dataset, per split, plus the user order of the knowledge matrix."""

    def __init__(self, tables: dict[str, pa.Table], spec: ModelSpec, users: list[str] | None = None):
        self.spec = spec
        self._set_items(tables)
        to_idx = self.item_index
        seq = tables["sequences"].to_pylist()
        self.users = users or [r[S.USER_ID] for r in seq]  # knowledge matrix row order
        # A train user is among the counted users of every item it interacted with (leave-user-out in ItemPrior).
        counted = {r[S.USER_ID]: set(r[S.ITEM_IDS]) for r in seq if r[S.SPLIT] == "train"}
        row_of = {u: i for i, u in enumerate(self.users)}
        windows = {r[S.USER_ID]: [to_idx[i] for i in r[S.ITEM_IDS][r[S.HISTORY_START] : r[S.HISTORY_END]]] for r in seq}
        lists = tables["rerank_lists"]
        self.splits: dict[str, RerankBatch] = {}
        self.list_users: dict[str, list[str]] = {}
        for split in S.SPLITS:
            rows = lists.filter(pc.equal(lists.column(S.SPLIT), split)).to_pylist()
            C = max((len(r[S.CANDIDATE_ITEMS]) for r in rows), default=1)
            candidates = _left_pad([[to_idx[i] for i in r[S.CANDIDATE_ITEMS]] for r in rows], C)  # [N, C]
            own = [[int(i in counted.get(r[S.USER_ID], ())) for i in r[S.CANDIDATE_ITEMS]] for r in rows]
            self.splits[split] = RerankBatch(
                candidates=candidates,
                attributes=self.item_genres[candidates],  # [N, C, A]
                history=_left_pad([windows[r[S.USER_ID]] for r in rows], spec.history_len),
                labels=_left_pad([r[S.LABELS] for r in rows], C).float(),
                user_row=torch.tensor([row_of[r[S.USER_ID]] for r in rows], dtype=torch.long),
                own=_left_pad(own, C).bool(),
            )
            self.list_users[split] = [r[S.USER_ID] for r in rows]
        self.list_len = self.splits["train"].candidates.shape[1]  # the longest list a model built here scores at once

    @classmethod
    def of_items(cls, tables: dict[str, pa.Table], spec: ModelSpec, list_len: int) -> RerankTask:
        """A task that knows only the items (`tables`: item_index and items) and the list length: what serving
        builds its models around, without every user's sequence and lists. It has no splits to train or score."""
        task = cls.__new__(cls)
        task.spec = spec
        task._set_items(tables)
        task.users, task.splits, task.list_users, task.list_len = [], {}, {}, list_len
        return task

    def _set_items(self, tables: dict[str, pa.Table]) -> None:
        to_idx = item_lookup(tables["item_index"])
        self.item_index = to_idx  # item_id -> item idx
        self.num_items = len(to_idx)
        # Item popularity among train users by item idx (the data stage's count): the no-learning baseline's score
        # and the re-rankers' item prior.
        self.popularity = np.zeros(self.num_items + 1, dtype=np.int64)
        self.popularity[tables["item_index"].column(S.ITEM_IDX).to_numpy()] = (
            tables["item_index"].column(S.TRAIN_COUNT).to_numpy()
        )
        genres = sorted({g for gs in tables["items"].column(S.GENRES).to_pylist() for g in gs})
        self.genre_vocab = {g: i + 1 for i, g in enumerate(genres)}
        item_genres = [[self.genre_vocab[g] for g in gs] for gs in tables["items"].column(S.GENRES).to_pylist()]
        item_rows = [to_idx[i] for i in tables["items"].column(S.ITEM_ID).to_pylist()]
        # item idx -> its genre ids, 0-padded: candidates' attributes become one gather instead of a Python loop.
        self.item_genres = torch.zeros(self.num_items + 1, max(map(len, item_genres), default=1) or 1, dtype=torch.long)
        for row, g in zip(item_rows, item_genres):
            self.item_genres[row, : len(g)] = torch.tensor(g, dtype=torch.long)

    def without_train_users(self, users: Iterable[str]) -> RerankTask:
        """A shallow copy whose train split lacks the lists of `users` (a reward model cross-fitted over them)."""
        users = set(users)
        out = copy.copy(self)
        keep = [i for i, u in enumerate(self.list_users["train"]) if u not in users]
        out.splits = {**self.splits, "train": self.splits["train"].take(torch.tensor(keep, dtype=torch.long))}
        out.list_users = {**self.list_users, "train": [self.list_users["train"][i] for i in keep]}
        return out

    def build_model(self, dims: dict[str, int | None] | int | None) -> torch.nn.Module:
        """dims: knowledge type -> dim (`knowledge_dims`), or the user knowledge dim alone (None: ID-only).
        The backbone is `spec.backbone`: prm | setrank | dlcm (list-wise re-rankers) | sasrec (SASRecRanker)."""
        s = self.spec
        adaptor = _adaptor(s, dims if isinstance(dims, dict) else {"user": dims})
        interaction = s.interaction and adaptor is not None and "user" in adaptor.types
        model = self._build(s, adaptor, interaction)
        if s.item_prior:
            model.prior.set_counts(torch.from_numpy(self.popularity).float())
        return model

    def _build(self, s: ModelSpec, adaptor: KnowledgeAdaptor | None, interaction: bool) -> torch.nn.Module:
        max_list_len = self.list_len
        if s.backbone == "sasrec":
            return SASRecRanker(
                self.num_items,
                num_attributes=len(self.genre_vocab),
                use_history=s.use_history,
                adaptor=adaptor,
                d_model=s.hidden_dim,
                num_layers=s.num_layers,
                num_heads=s.num_heads,
                history_len=s.history_len,
                max_list_len=max_list_len,
                dropout=s.dropout,
                interaction=interaction,
                item_prior=s.item_prior,
            )
        if s.backbone not in RERANKERS:
            raise ValueError(f"backbone {s.backbone!r} is not one of {sorted([*RERANKERS, 'sasrec'])}")
        shared = dict(
            item_dim=s.item_dim,
            num_attributes=len(self.genre_vocab),
            use_history=s.use_history,
            adaptor=adaptor,
            d_model=s.hidden_dim,
            num_layers=s.num_layers,
            max_list_len=max_list_len,
            dropout=s.dropout,
            interaction=interaction,
            item_prior=s.item_prior,
        )
        if s.backbone != "dlcm":
            shared["num_heads"] = s.num_heads
        return RERANKERS[s.backbone](self.num_items, **shared)

    def logits(self, model: torch.nn.Module, batch: RerankBatch, knowledge: KnowledgeInput) -> torch.Tensor:
        device = next(model.parameters()).device  # the lists live on the CPU; a GPU model gets its batch moved
        attributes = None if batch.attributes is None else batch.attributes.to(device)
        history = batch.history.to(device) if self.spec.use_history else None
        k = gather_knowledge(knowledge, batch, device)
        own = None if batch.own is None else batch.own.to(device)
        return model(batch.candidates.to(device), attributes, knowledge=k, history=history, own=own)  # [B, C]

    def train_batches(self, epoch: int, seed: int, rank: int = 0, world: int = 1) -> Iterator[RerankBatch]:
        data = self.splits["train"]
        order = _shard(len(data), seed * 1000 + epoch, rank, world)
        for lo in range(0, len(order), self.spec.batch_size):
            yield data.take(order[lo : lo + self.spec.batch_size])

    def loss(self, model: torch.nn.Module, batch: RerankBatch, knowledge: KnowledgeInput) -> torch.Tensor:
        logits = self.logits(model, batch, knowledge)
        loss = LOSSES[self.spec.loss]
        return loss(logits, batch.labels.to(logits.device), (batch.candidates != 0).to(logits.device))

    @torch.inference_mode()
    def scores(
        self, model: torch.nn.Module, split: str, knowledge: KnowledgeInput, batch: RerankBatch | None = None
    ) -> np.ndarray:
        """Scores [N, C] of every list of `split` (or of `batch`), eval mode, in chunks."""
        model.eval()
        data = batch if batch is not None else self.splits[split]
        out = [
            self.logits(model, data.take(torch.arange(lo, min(lo + 2048, len(data)))), knowledge)
            for lo in range(0, len(data), 2048)
        ]
        return torch.cat(out).float().cpu().numpy() if out else np.zeros((0, 0))

    def per_list_metrics(self, model, split: str, knowledge: KnowledgeInput) -> dict[str, np.ndarray]:
        data = self.splits[split]
        scores = self.scores(model, split, knowledge)
        return rank_metrics(scores, data.labels.numpy(), ks=RERANK_KS, mask=(data.candidates != 0).numpy())

    def popularity_scores(self, split: str) -> np.ndarray:
        """Scores [N, C] of `split`'s lists by item popularity among train users; -inf at padding."""
        candidates = self.splits[split].candidates.numpy()
        return np.where(candidates == 0, -np.inf, self.popularity[candidates].astype(np.float64))

    def evaluate(self, model, split: str, knowledge: KnowledgeInput) -> dict[str, float]:
        return mean_metrics(self.per_list_metrics(model, split, knowledge), prefix=f"{split}/")


# --------------------------------------------------------------------------------------------------- next item


class NextItemTask:
    """SASRec on the leave-one-out split: train on all but the last two items, valid on the second-to-last, test on
    the last; full-sort ranking excluding the user's other interacted items."""

    def __init__(self, tables: dict[str, pa.Table], spec: ModelSpec, users: list[str] | None = None):
        self.spec = spec
        to_idx = item_lookup(tables["item_index"])
        self.num_items = len(to_idx)
        loo = tables["leave_one_out"].to_pylist()
        self.users = users or [r[S.USER_ID] for r in loo]
        row_of = {u: i for i, u in enumerate(self.users)}
        self.user_row = torch.tensor([row_of[r[S.USER_ID]] for r in loo], dtype=torch.long)
        train = [[to_idx[i] for i in r[S.TRAIN_ITEM_IDS]] for r in loo]
        valid = [to_idx[r[S.VALID_ITEM_ID]] for r in loo]
        test = [to_idx[r[S.TEST_ITEM_ID]] for r in loo]
        L = spec.max_seq_len
        # Training: inputs are the first n-1 train items, targets the next item at every position (0 = no loss).
        self.train_inputs = _left_pad([s[:-1] for s in train], L)  # [U, L]
        self.train_targets = _left_pad([s[1:] for s in train], L)  # [U, L]
        keep = (self.train_targets != 0).any(dim=1)
        self.train_inputs, self.train_targets = self.train_inputs[keep], self.train_targets[keep]
        self.train_rows = self.user_row[keep]
        self.eval_data = {
            "valid": (_left_pad(train, L), torch.tensor(valid), [s for s in train]),
            "test": (
                _left_pad([s + [v] for s, v in zip(train, valid)], L),
                torch.tensor(test),
                [s + [v] for s, v in zip(train, valid)],
            ),
        }

    def build_model(self, knowledge_dim: int | None) -> SASRec:
        s = self.spec
        adaptor = _adaptor(s, {"user": knowledge_dim})
        return SASRec(
            self.num_items,
            hidden_dim=s.hidden_dim,
            num_layers=s.num_layers,
            num_heads=s.num_heads,
            max_len=s.max_seq_len,
            dropout=s.dropout,
            adaptor=adaptor,
        )

    def train_batches(self, epoch: int, seed: int, rank: int = 0, world: int = 1):
        order = _shard(self.train_inputs.shape[0], seed * 1000 + epoch, rank, world)
        for lo in range(0, len(order), self.spec.batch_size):
            yield order[lo : lo + self.spec.batch_size]

    def loss(self, model, idx: torch.Tensor, knowledge: torch.Tensor | None) -> torch.Tensor:
        k = None if knowledge is None else knowledge[self.train_rows[idx]]
        return model.next_item_loss(self.train_inputs[idx], self.train_targets[idx], knowledge=k)

    @torch.inference_mode()
    def per_list_metrics(self, model, split: str, knowledge: torch.Tensor | None) -> dict[str, np.ndarray]:
        model.eval()
        inputs, targets, seen = self.eval_data[split]
        parts = []
        for lo in range(0, inputs.shape[0], 256):
            rows = slice(lo, lo + 256)
            k = None if knowledge is None else knowledge[self.user_row[rows]]
            scores = model.full_scores(inputs[rows], knowledge=k)  # [B, N + 1]
            parts.append(full_sort_metrics(scores, targets[rows], exclude=seen[rows], ks=(10,)))
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def evaluate(self, model, split: str, knowledge: torch.Tensor | None) -> dict[str, float]:
        return mean_metrics(self.per_list_metrics(model, split, knowledge), prefix=f"{split}/")


Task = RerankTask | NextItemTask


def standardize_adaptor(model: torch.nn.Module, knowledge: dict[str, torch.Tensor], task: RerankTask) -> None:
    """Fit the adaptor's per-type standardisation: user knowledge on the train users' real (non-padding) segments
    or vectors, item knowledge on every real item."""
    for t, table in knowledge.items():
        if t == "user":
            rows = table[task.splits["train"].user_row.unique()]  # [U, D] or [U, S, D]
            vectors = rows.reshape(-1, rows.shape[-1])
            vectors = vectors[vectors.abs().sum(-1) > 0]
        else:
            vectors = table[1:]
        model.adaptor.standardize(t, vectors)


# --------------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    recommender_dir: Path, weights: dict, spec: ModelSpec, knowledge: KnowledgeInput, user_segments: int = 0
) -> Path:
    """The one recommender checkpoint format, `<recommender_dir>/model.pt`: the weights with what rebuilds the model
    (its ModelSpec: backbone and sizes; knowledge types and dims), the item knowledge it was trained with (it belongs
    to the model: scoring with other item vectors would be another model) and how user texts must be encoded for it
    (`user_segments`: 0 = one vector per text). Read back by `load_checkpoint` (train, reward, evaluate, serving)."""
    if isinstance(knowledge, torch.Tensor):
        knowledge = {"user": knowledge}
    dims = knowledge_dims(knowledge) if knowledge else {}
    path = Path(recommender_dir) / RECOMMENDER_MODEL
    torch.save(
        {
            "model": weights,
            "spec": dataclasses.asdict(spec),
            "knowledge_dims": dims,
            "knowledge_dim": dims.get("user"),
            "user_segments": user_segments if "user" in dims else 0,
            "item_knowledge": None if not knowledge or "item" not in knowledge else knowledge["item"].cpu(),
        },
        path,
    )
    return path


@dataclass
class Checkpoint:
    """A loaded re-ranker around a task built from the given tables, frozen, in eval mode."""

    task: RerankTask
    model: torch.nn.Module
    item_knowledge: torch.Tensor | None  # [num_items + 1, D]
    user_segments: int
    user_knowledge_dim: int | None  # None: the model reads no user knowledge

    def knowledge(self, user: torch.Tensor | np.ndarray | None) -> KnowledgeInput:
        """The model's knowledge input for user vectors [U, D] / [U, S, D] (None without user knowledge)."""
        out = {}
        if user is not None:
            out["user"] = torch.as_tensor(np.asarray(user, dtype=np.float32))
        if self.item_knowledge is not None:
            out["item"] = self.item_knowledge
        return out or None


def checkpoint_header(recommender_dir: Path) -> dict:
    """A checkpoint's description without building its model: spec (a ModelSpec), knowledge_dims, user_segments
    and item_knowledge; also the weights under "model"."""
    path = Path(recommender_dir) / RECOMMENDER_MODEL
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {recommender_dir} is not a trained recommender stage")
    saved = torch.load(path, weights_only=False, map_location="cpu")
    # Written before the item prior existed: those models have none (and trained without a warm-up).
    old_defaults = {"item_prior": False, "warmup_epochs": 0}
    spec = {**old_defaults, **saved["spec"]}
    if "adaptor_experts" in spec:  # written when the two expert counts were one pair
        spec["adaptor_shared_experts"], spec["adaptor_specific_experts"] = spec.pop("adaptor_experts")
    saved["spec"] = ModelSpec(**spec)
    if saved.get("knowledge_dims") is None:  # written before item knowledge existed: user knowledge only
        saved["knowledge_dims"] = {"user": saved["knowledge_dim"]} if saved["knowledge_dim"] is not None else {}
    saved.setdefault("user_segments", 0)
    saved.setdefault("item_knowledge", None)
    return saved


def load_checkpoint(recommender_dir: Path, tables: dict[str, pa.Table] | RerankTask) -> Checkpoint:
    """The inverse of `save_checkpoint`, around the data stage's `tables` (or a task built from them already: its
    items, genres and lists are shared, and the checkpoint's sizes replace its spec). Frozen, in eval mode."""
    saved = checkpoint_header(recommender_dir)
    spec = saved["spec"]
    if isinstance(tables, RerankTask):
        task = copy.copy(tables)
        task.spec = spec
    else:
        task = RerankTask(tables, spec)
    dims = saved["knowledge_dims"]
    model = task.build_model(dims or None)
    model.load_state_dict(saved["model"])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Checkpoint(task, model, saved["item_knowledge"], saved["user_segments"], dims.get("user"))


# --------------------------------------------------------------------------------------------------- training loop


@dataclass
class FitState:
    """Everything needed to resume: saved in every checkpoint."""

    epoch: int = -1  # last finished epoch
    best_metric: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    best_model: dict | None = None
    history: list | None = None
    resumed_after: list | None = None  # the last finished epoch at each restart from a checkpoint


def stops_after(state: FitState, spec: ModelSpec) -> bool:
    """Whether `fit` ends after the epoch `state` last recorded: patience spent, or the last epoch done."""
    return state.bad_epochs >= spec.patience or state.epoch >= spec.max_epochs - 1


def warmup_factor(spec: ModelSpec, epoch: int, step: int, steps: int) -> float:
    """The learning rate's multiplier at `step` of `steps` in `epoch`: a linear ramp from 1/(warm-up steps) to 1
    over the first `spec.warmup_epochs` epochs, then 1. A function of the position alone, so a resumed fit
    continues the ramp exactly without a scheduler state."""
    if spec.warmup_epochs <= 0:
        return 1.0
    return min(1.0, (epoch * steps + step + 1) / (spec.warmup_epochs * steps))


def rng_states() -> dict:
    """This process's random state (dropout's stream), to be saved with a checkpoint and passed back to `fit`."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def make_optimizer(model: torch.nn.Module, spec: ModelSpec) -> torch.optim.Optimizer:
    """The recommenders' optimizer, in one place: plain training and the ZeRO engine (stages/train.py) use it."""
    return torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)


def fit(
    task: Task,
    model: torch.nn.Module,
    knowledge: KnowledgeInput,
    *,
    seed: int,
    state: FitState | None = None,
    optimizer_state: dict | None = None,
    rank: int = 0,
    world: int = 1,
    on_epoch: Callable[[dict, FitState, Any], None] | None = None,
    eval_model: torch.nn.Module | None = None,
    engine: Any | None = None,
    rng_state: dict | None = None,
) -> FitState:
    """Train with early stopping on valid `spec.select_metric`; returns the state holding the best weights.

    `model` may be a DDP wrapper or a DeepSpeed engine (then pass the bare module as `eval_model`; with an engine,
    pass it as `engine` too: it owns the optimizer and takes the backward pass and the step). Every worker evaluates
    the full valid split, so all ranks agree on when to stop without communicating. `on_epoch(metrics, state,
    optimizer or engine)` is where a caller reports and checkpoints.
    """
    spec = task.spec
    eval_model = eval_model or model
    torch.manual_seed(seed + rank)
    if rng_state is not None:  # resuming: dropout continues the stream this rank had drawn (rng_states)
        torch.set_rng_state(rng_state["cpu"])
        if rng_state.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng_state["cuda"])
    if engine is None:
        optimizer = make_optimizer(model, spec)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)

        def backward_and_step(loss: torch.Tensor) -> None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    else:

        def backward_and_step(loss: torch.Tensor) -> None:
            engine.backward(loss)  # reduces the gradient partitions (ZeRO-2)
            engine.step()  # steps this worker's optimizer partition, then gathers the weights

    state = state or FitState(history=[])
    select = f"valid/{spec.select_metric}"
    param_groups = (engine.optimizer if engine is not None else optimizer).param_groups
    for epoch in range(state.epoch + 1, spec.max_epochs):
        model.train()
        start, losses = time.perf_counter(), []
        batches = list(task.train_batches(epoch, seed, rank, world))
        for step, batch in enumerate(batches):
            for group in param_groups:
                group["lr"] = spec.lr * warmup_factor(spec, epoch, step, len(batches))
            loss = task.loss(model, batch, knowledge)
            backward_and_step(loss)
            losses.append(loss.item())
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        metrics = task.evaluate(eval_model, "valid", knowledge)
        metrics.update(
            {
                "epoch": epoch,
                "train/loss": float(np.mean(losses)),
                "train/seconds": train_seconds,
                "valid/seconds": time.perf_counter() - start,
            }
        )
        if select not in metrics:
            raise ValueError(f"recommender.select_metric={spec.select_metric!r} is not among {sorted(metrics)}")
        state.epoch = epoch
        state.history.append(metrics)
        if epoch < spec.warmup_epochs:  # still warming up: neither a candidate nor a bad epoch
            pass
        elif metrics[select] > state.best_metric:
            state.best_metric, state.best_epoch, state.bad_epochs = metrics[select], epoch, 0
            state.best_model = {k: v.detach().cpu().clone() for k, v in eval_model.state_dict().items()}
        else:
            state.bad_epochs += 1
        log.info(
            "epoch %d loss %.4f %s %.4f (best %.4f @ %d)",
            epoch,
            metrics["train/loss"],
            select,
            metrics[select],
            state.best_metric,
            state.best_epoch,
        )
        if on_epoch is not None:
            on_epoch(metrics, state, engine if engine is not None else optimizer)
        if stops_after(state, spec):
            break
    return state


def train_sasrec_loo(
    tables: dict[str, pa.Table], *, max_epochs: int = 200, patience: int = 10, seed: int = 2024, **spec_overrides
) -> dict:
    """SASRec on the leave-one-out split of the data stage's `tables`, ID only, single process: the benchmark against
    RecBole's SASRec."""
    spec = ModelSpec(
        backbone="sasrec",
        max_epochs=max_epochs,
        patience=patience,
        select_metric="ndcg@10",
        dropout=0.2,
        batch_size=128,
        warmup_epochs=0,
        **spec_overrides,
    )
    torch.manual_seed(seed)
    task = NextItemTask(tables, spec)
    model = task.build_model(None)
    state = fit(task, model, None, seed=seed)
    model.load_state_dict(state.best_model)
    best = state.history[state.best_epoch]
    test = task.evaluate(model, "test", None)
    return {
        "seconds_per_epoch": float(np.mean([h["train/seconds"] for h in state.history])),
        "eval_seconds_per_epoch": float(np.mean([h["valid/seconds"] for h in state.history])),
        "epochs_run": len(state.history),
        "best_epoch": state.best_epoch,
        "valid/ndcg@10": best["valid/ndcg@10"],
        "valid/hr@10": best["valid/hr@10"],
        "test/ndcg@10": test["test/ndcg@10"],
        "test/hr@10": test["test/hr@10"],
        "settings": {k: v for k, v in spec.__dict__.items()},
    }


def model_spec(rc: RecommenderConfig) -> ModelSpec:
    """The config's model and training settings as the checkpoint records them (where it trains stays in the
    config; the next-item sequence length keeps ModelSpec's)."""
    return ModelSpec(**{f.name: getattr(rc, f.name) for f in dataclasses.fields(ModelSettings)})


def train_model(task: RerankTask, knowledge: KnowledgeInput, seed: int):
    """One in-process fit with early stopping on valid; returns the model holding its best weights and its state."""
    torch.manual_seed(seed)
    model = task.build_model(knowledge_dims(knowledge))
    if knowledge is not None:
        standardize_adaptor(model, knowledge, task)
    state = fit(task, model, knowledge, seed=seed)
    model.load_state_dict(state.best_model)
    return model, state
