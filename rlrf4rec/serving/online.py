"""On-line re-ranking from a finished run directory (pure torch, no Ray): the core the Serve application wraps.

Consumes a run directory: its data stage (item vocabulary, item genres, users' history windows), a recommender
stage per version (`recommender/<version>/model.pt`; `recommender/id` is the ID-only fallback) and the user
knowledge of that version (`knowledge/<version>/user_knowledge.parquet`). Produces scores for candidate lists.
A version's model and its precomputed knowledge are loaded, swapped and read together, so a score never mixes them.

Versions: "base" (the base policy's knowledge, or history texts with knowledge.user = history), "round<t>" (after
DPO round t-1), or "latest" (the last version whose recommender and knowledge are both complete). Lists longer
than the re-ranker's trained list length are scored in consecutive windows of that length, each window one
list-wise forward pass.
Knows nothing about HTTP, deployments or how the knowledge was produced.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rlrf4rec.core.artifacts import damaged_files, read_marker, read_tables
from rlrf4rec.core.config import RunConfig, load_config
from rlrf4rec.core.knowledge import pad_segments
from rlrf4rec.core.layout import CONFIG, RunLayout
from rlrf4rec.core.lineage import Version, read_rounds, round_policy, start_policy
from rlrf4rec.core.prompts import item_meta
from rlrf4rec.core.recommender import (
    Checkpoint,
    ModelSpec,
    RerankTask,
    checkpoint_header,
    item_lookup,
    load_checkpoint,
)
from rlrf4rec.serving.store import KnowledgeIndex, UserIndex, open_index


def run_config(run_dir: Path) -> RunConfig:
    """The config a run was made with (the data stage's copy), for the model and generation settings."""
    path = RunLayout(run_dir).data / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} holds no data stage; pass the run directory of a finished `rlrf4rec run`")
    return load_config(path)


def resolve_version(run_dir: Path, name: str) -> Version:
    """A knowledge version of the run by name: base, or round<t> for each round of the rounds manifest (lineage);
    'latest' is the last round's, else base. Refused unless its re-ranker and knowledge are whole."""
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    rounds = {r.version: r for r in read_rounds(layout)}
    if name == "latest":
        name = list(rounds)[-1] if rounds else "base"
    if name != "base" and name not in rounds:
        if re.fullmatch(r"round\d+", name):
            raise FileNotFoundError(
                f"version {name!r} is not a complete round of {run_dir} (its rounds manifest holds "
                f"{list(rounds) or 'none'}); finish the run (rlrf4rec run) or choose another version"
            )
        raise ValueError(f"version {name!r} is not known; use 'latest', 'base' or 'round<t>' (e.g. round1)")
    recommender, knowledge = layout.recommender(name), layout.knowledge(name)
    for stage_dir in (recommender, knowledge):
        if read_marker(stage_dir) is None:
            raise FileNotFoundError(
                f"version {name!r}: {stage_dir} is missing or incomplete; finish the run (rlrf4rec run) or choose "
                "another version"
            )
        damaged = damaged_files(stage_dir)
        if damaged:
            raise ValueError(
                f"version {name!r} is damaged: {damaged[0]}; rebuild it with `rlrf4rec run --config "
                f"{layout.data / CONFIG}` (`rlrf4rec verify` lists every damaged file)"
            )
    policy = start_policy(run_config(run_dir)) if name == "base" else str(round_policy(layout, rounds[name]))
    return Version(name, policy, knowledge, recommender)


@dataclass(frozen=True)
class Knowledge:
    text: str
    vector: np.ndarray  # [D] float32, or [S, D] segment vectors (zero rows = padding) for a segmented model
    version: str  # the version whose policy wrote the text; only that version's model reads the vector
    source: str = "precomputed"  # or "generated" (on line, for a user without precomputed knowledge)


class KnowledgeStore:
    """user_id -> the user's knowledge text and vector of one version, read from the version's memory-mapped index
    (store.py): every replica on a machine shares one copy in the page cache."""

    def __init__(self, version: Version, index_dir: Path):
        self.version = version.name
        self._index = KnowledgeIndex(open_index(version.knowledge, index_dir))

    def get(self, user_id: str | None) -> Knowledge | None:
        found = self._index.get(user_id) if user_id is not None else None
        return None if found is None else Knowledge(found[0], found[1], self.version)


@dataclass(frozen=True)
class Query:
    """One request to re-rank: candidate item ids, and the user's history (request's, else the stored window).
    Knowledge: `knowledge` when given (generated on line), else the user's precomputed knowledge, else none."""

    candidates: Sequence[str]
    user_id: str | None = None
    history: Sequence[str] | None = None  # item ids, oldest first
    knowledge: Knowledge | None = None


@dataclass(frozen=True)
class Ranked:
    scores: np.ndarray  # [len(candidates)], in candidate order
    model_version: str  # the knowledge-augmented model's version, or "id" (the ID-only model answered)
    knowledge: Knowledge | None  # what the knowledge-augmented model read; None on the ID-only path


class ItemCatalog:
    """The run's items (ids, titles, genres) from the data stage, and its users (stored history window with ratings,
    attributes) through the memory-mapped user index (store.py): every replica on a machine shares one copy."""

    def __init__(self, run_dir: Path):
        layout = RunLayout(run_dir)
        self.tables = read_tables(layout.data, ("item_index", "items"))
        self.index = item_lookup(self.tables["item_index"])  # item id -> item idx
        self.ids = {idx: item for item, idx in self.index.items()}
        self.meta = item_meta(self.tables["items"])
        self.users = UserIndex(open_index(layout.data, layout.serving_users, kind="users"))
        self.list_len = self.users.list_len  # the longest re-rank list of the data: what a model scores at once

    def window(self, user_id: str | None) -> list[tuple[str, float | None]] | None:
        """The user's stored history window (item id, rating or None), oldest first; None for an unknown user."""
        found = self.users.window(user_id) if user_id is not None else None
        if found is None:
            return None
        items, ratings = found
        return [(self.ids[int(i)], None if np.isnan(r) else float(r)) for i, r in zip(items, ratings)]

    def window_idx(self, user_id: str | None) -> list[int]:
        """The item indices of the user's stored window (empty for an unknown user)."""
        found = self.users.window(user_id) if user_id is not None else None
        return [] if found is None else found[0].tolist()

    def attributes(self, user_id: str | None) -> dict[str, object] | None:
        return self.users.attributes(user_id) if user_id is not None else None


def user_segments_of(version: Version) -> int:
    """How the version's knowledge model reads a user text: 0 = one vector, k = up to k segment vectors."""
    return checkpoint_header(version.recommender)["user_segments"]


def _checkpoint(recommender_dir: Path, task: RerankTask, *, knowledge: bool) -> Checkpoint:
    if read_marker(recommender_dir) is None:
        raise FileNotFoundError(f"{recommender_dir} holds no complete recommender stage")
    ckpt = load_checkpoint(recommender_dir, task)
    if knowledge != (ckpt.user_knowledge_dim is not None):
        kind = "a knowledge-augmented" if knowledge else "an ID-only"
        raise ValueError(f"{recommender_dir} does not hold {kind} recommender")
    return ckpt


@dataclass(frozen=True)
class _Loaded:
    ckpt: Checkpoint
    version: str
    store: KnowledgeStore | None = None  # the version's precomputed knowledge (None for the ID-only model)

    @property
    def history_len(self) -> int:
        return self.ckpt.task.spec.history_len if self.ckpt.task.spec.use_history else 0


class Reranker:
    """The ID-only re-ranker plus the knowledge-augmented one of a version with its precomputed knowledge, ready to
    score batches of queries. `load_version` swaps model and knowledge in place, together (what a Serve user_config
    update calls); a batch reads them once, so it never mixes two versions."""

    def __init__(
        self, run_dir: Path, version: Version, catalog: ItemCatalog | None = None, device: str | torch.device = "cpu"
    ):
        self.device = torch.device(device)  # where the models run; the lookups and the windows stay on the CPU
        self.layout = RunLayout(run_dir)
        self.catalog = catalog or ItemCatalog(run_dir)
        # Items and genres only; each model brings its spec.
        self.task = RerankTask.of_items(self.catalog.tables, ModelSpec(), self.catalog.list_len)
        self.list_len = self.catalog.list_len
        id_ckpt = _checkpoint(self.layout.recommender("id"), self.task, knowledge=False)
        id_ckpt.model.to(self.device)
        self.id_model = _Loaded(id_ckpt, "id")
        self.load_version(version)

    def load_version(self, version: Version) -> None:
        ckpt = _checkpoint(version.recommender, self.task, knowledge=True)
        ckpt.model.to(self.device)  # before the swap below: a batch never sees a half-moved model
        store = KnowledgeStore(version, self.layout.serving_index(version.name))
        self.knowledge_model = _Loaded(ckpt, version.name, store)

    @property
    def version(self) -> str:
        return self.knowledge_model.version

    def _history(self, q: Query, length: int) -> list[int]:
        if not length:
            return []
        if q.history is not None:
            return [self.catalog.index[i] for i in q.history][-length:]
        return self.catalog.window_idx(q.user_id)[-length:]

    @torch.inference_mode()
    def score(self, queries: Sequence[Query]) -> list[Ranked]:
        """Scores per query. The knowledge-augmented model answers a query with the query's own knowledge when that
        is of the model's version, else with the user's precomputed knowledge; a query with neither (or with another
        version's knowledge) gets the ID-only model. Each model takes one forward pass over its queries' windows."""
        loaded = self.knowledge_model  # one read: a concurrent load_version cannot split this batch
        knowledge = [
            (q.knowledge if q.knowledge.version == loaded.version else None)
            if q.knowledge is not None
            else loaded.store.get(q.user_id)
            for q in queries
        ]
        out: list = [None] * len(queries)
        for with_knowledge, model in ((True, loaded), (False, self.id_model)):
            group = [i for i in range(len(queries)) if (knowledge[i] is not None) == with_knowledge]
            for i in (i for i in group if not queries[i].candidates):
                out[i] = Ranked(np.zeros(0, np.float32), model.version, knowledge[i])
            group = [i for i in group if queries[i].candidates]
            if not group:
                continue
            cands, hists, owners, vectors = [], [], [], []
            for i in group:
                q = queries[i]
                idx = [self.catalog.index[c] for c in q.candidates]
                hist = self._history(q, model.history_len)
                for lo in range(0, len(idx), self.list_len):
                    window = idx[lo : lo + self.list_len]
                    cands.append([0] * (self.list_len - len(window)) + window)  # left padding, as in training
                    hists.append(hist)
                    owners.append(i)
                    if with_knowledge:
                        vectors.append(knowledge[i].vector)
            candidates = torch.tensor(cands, dtype=torch.long)  # [W, L]
            H = model.history_len
            history = torch.tensor([[0] * (H - len(h)) + h for h in hists], dtype=torch.long) if H else None
            user = None
            if with_knowledge:
                user = pad_segments(vectors) if vectors[0].ndim == 2 else np.stack(vectors)  # [W, S, D] | [W, D]
            k = model.ckpt.knowledge(user)
            if k is not None and "item" in k:
                k["item"] = k["item"][candidates]  # [W, L, D]
            genres = self.task.item_genres[candidates]
            # Gathered on the CPU (the item tables live there), then one copy of each batch tensor to the device.
            if self.device.type != "cpu":
                candidates, genres = candidates.to(self.device), genres.to(self.device)
                history = None if history is None else history.to(self.device)
                k = None if k is None else {name: v.to(self.device) for name, v in k.items()}
            logits = model.ckpt.model(candidates, genres, knowledge=k, history=history).float().cpu().numpy()
            parts: dict[int, list[np.ndarray]] = {}
            for row, owner in enumerate(owners):
                parts.setdefault(owner, []).append(logits[row][cands[row].count(0) :])
            for owner, chunks in parts.items():
                out[owner] = Ranked(np.concatenate(chunks), model.version, knowledge[owner])
        return out


def top_k(item_ids: Sequence[str], scores: np.ndarray, k: int) -> list[tuple[str, float]]:
    """The k best (item, score), best first; ties keep request order (stable sort)."""
    order = np.argsort(-scores, kind="stable")[:k]
    return [(item_ids[i], float(scores[i])) for i in order]
