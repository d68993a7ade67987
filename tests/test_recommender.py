"""Training the re-ranker on a synthetic dataset: the loop learns, knowledge helps, scoring is deterministic."""

import dataclasses

import numpy as np
import pytest
import torch
from synthetic import write_dataset, write_knowledge

from rlrf4rec.core.artifacts import read_tables
from rlrf4rec.core.config import RunConfig, from_dict
from rlrf4rec.core.recommender import ModelSpec, NextItemTask, RerankTask, checkpoint_header, fit, save_checkpoint
from rlrf4rec.core.scoring import knowledge_matrix
from rlrf4rec.stages.data import run_data

# history_len=1: the ID-only model sees a single history item, so the user's taste is (almost) only in the knowledge.
SPEC = ModelSpec(
    max_epochs=12, patience=12, batch_size=64, lr=1e-3, history_len=1, dropout=0.0, interaction=False, warmup_epochs=0
)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    # Half the interactions in each genre: which items a user touched says nothing of the taste; only ratings do.
    tastes = write_dataset(root / "raw", num_users=200, length=24, liked_fraction=0.5)
    cfg = from_dict(
        RunConfig, {"name": "s", "run_dir": str(root / "run"), "data": {"format": "parquet", "path": str(root / "raw")}}
    )
    data_dir = run_data(cfg)
    write_knowledge(root / "knowledge.parquet", tastes)
    return data_dir, root / "knowledge.parquet"


def test_rerank_task_tensors_match_the_tables(synthetic):
    data_dir, _ = synthetic
    task = RerankTask(read_tables(data_dir), SPEC)
    train = task.splits["train"]
    assert train.candidates.shape[1] == 10 and train.attributes.shape == (len(train), 10, 1)
    assert (train.labels.sum(1) <= 4).all() and train.labels.sum() > 0
    assert set(task.genre_vocab) == {"A", "B"}
    # attributes are the genre of each candidate: items 1-40 are genre A
    a, b = task.genre_vocab["A"], task.genre_vocab["B"]
    assert torch.equal(train.attributes[..., 0], torch.where(train.candidates <= 40, a, b))


def test_a_checkpoint_written_before_the_settings_were_shared_reads_back_as_it_was_trained(tmp_path):
    """Older checkpoints hold the adaptor's expert counts as one pair and no item prior or warm-up: they read back as
    the model they were (two counts, neither prior nor warm-up), and a new one reads back equal to its spec."""
    spec = dataclasses.replace(SPEC, adaptor_shared_experts=3, adaptor_specific_experts=1)
    path = save_checkpoint(tmp_path, {}, spec, None)
    assert checkpoint_header(tmp_path)["spec"] == spec
    saved = torch.load(path, weights_only=False)
    old = {k: v for k, v in saved["spec"].items() if k not in ("item_prior", "warmup_epochs")}
    old["adaptor_experts"] = [old.pop("adaptor_shared_experts"), old.pop("adaptor_specific_experts")]
    torch.save({**saved, "spec": old}, path)
    read = checkpoint_header(tmp_path)["spec"]
    assert (read.adaptor_shared_experts, read.adaptor_specific_experts) == (3, 1)
    assert read == dataclasses.replace(spec, item_prior=False, warmup_epochs=0)


def test_workers_take_equal_batches_covering_every_list_once(synthetic):
    data_dir, _ = synthetic
    task = RerankTask(read_tables(data_dir), SPEC)
    n = len(task.splits["train"])
    for world in (1, 2, 3, 7):
        batches = [[len(b) for b in task.train_batches(epoch=1, seed=3, rank=r, world=world)] for r in range(world)]
        # The same number of steps on every worker (a shorter one would leave DDP's all-reduce waiting forever) ...
        assert len({len(b) for b in batches}) == 1 and len({sum(b) for b in batches}) == 1, (world, n, batches)
        # ... and together every list, plus at most world - 1 repeated to even the shards out.
        assert n <= sum(map(sum, batches)) < n + world


def _fit_id_and_knowledge(data_dir, knowledge_path, spec: ModelSpec) -> tuple[dict, tuple]:
    """Test NDCG@5 of an ID-only and a knowledge-augmented re-ranker (same seed); the latter's (task, model,
    knowledge, best weights) too."""
    results = {}
    for name, path in [("id", None), ("knowledge", knowledge_path)]:
        torch.manual_seed(0)
        task = RerankTask(read_tables(data_dir), spec)
        knowledge = knowledge_matrix(path, task.users)
        model = task.build_model(None if knowledge is None else knowledge.shape[1])
        state = fit(task, model, knowledge, seed=0)
        assert state.history[-1]["train/loss"] < state.history[0]["train/loss"]
        model.load_state_dict(state.best_model)
        results[name] = task.evaluate(model, "test", knowledge)["test/ndcg@5"]
    return results, (task, model, knowledge, state.best_model)


def test_knowledge_augmented_reranker_beats_id_only_on_unseen_users(synthetic):
    results, _ = _fit_id_and_knowledge(*synthetic, SPEC)
    assert results["knowledge"] > results["id"] + 0.05, results  # measured: 0.386 vs 0.286


def test_scores_depend_on_knowledge_and_are_deterministic(synthetic):
    data_dir, knowledge_path = synthetic
    task = RerankTask(read_tables(data_dir), SPEC)
    knowledge = knowledge_matrix(knowledge_path, task.users)
    torch.manual_seed(0)
    model = task.build_model(knowledge.shape[1])
    fit(task, model, knowledge, seed=0)
    first = task.scores(model, "valid", knowledge)
    assert np.array_equal(first, task.scores(model, "valid", knowledge))
    flipped = knowledge[:, [1, 0, *range(2, knowledge.shape[1])]]  # swap the taste dims: the opposite user
    other = task.scores(model, "valid", flipped)
    assert (np.argsort(-first, axis=1) != np.argsort(-other, axis=1)).any(axis=1).mean() > 0.5


def test_next_item_task_learns_and_excludes_history(tmp_path):
    # 95% of a user's items are of one genre: the history tells which half of the catalogue the next item is in.
    write_dataset(tmp_path / "raw", num_users=200, length=24, liked_fraction=0.95)
    cfg = from_dict(
        RunConfig,
        {"name": "n", "run_dir": str(tmp_path / "run"), "data": {"format": "parquet", "path": str(tmp_path / "raw")}},
    )
    data_dir = run_data(cfg)
    spec = ModelSpec(
        backbone="sasrec", max_epochs=20, patience=20, batch_size=32, select_metric="ndcg@10", warmup_epochs=0
    )
    task = NextItemTask(read_tables(data_dir), spec)
    real = task.train_targets[:, :-1] != 0
    assert (task.train_targets[:, :-1] == task.train_inputs[:, 1:])[real].all()  # targets: the inputs shifted by one
    torch.manual_seed(0)
    model = task.build_model(None)
    state = fit(task, model, None, seed=0)
    assert len(state.history) == 20 and state.history[-1]["train/loss"] < state.history[0]["train/loss"]
    metrics = task.evaluate(model, "test", None)
    assert 0.0 <= metrics["test/ndcg@10"] <= metrics["test/hr@10"] <= 1.0
    # It learns: the trained model ranks the held-out item far better than the same model untrained.
    torch.manual_seed(0)
    untrained = task.evaluate(task.build_model(None), "test", None)
    assert metrics["test/ndcg@10"] > untrained["test/ndcg@10"] + 0.05

    # History is excluded from the ranking: a model that scores every item the user already has above the held-out
    # item still puts that item first, which users with 10+ history items could not have without the exclusion.
    inputs, targets, seen = task.eval_data["test"]

    class PrefersHistory(torch.nn.Module):
        def full_scores(self, rows, knowledge=None):
            scores = torch.zeros(rows.shape[0], task.num_items + 1)
            for r, items in enumerate(rows.tolist()):
                scores[r, [i for i in items if i]] = 100.0
            row_of = {tuple(x): j for j, x in enumerate(inputs.tolist())}
            scores[torch.arange(rows.shape[0]), targets[[row_of[tuple(x)] for x in rows.tolist()]]] = 50.0
            return scores

    per_list = task.per_list_metrics(PrefersHistory(), "test", None)
    assert (per_list["hr@10"] == 1.0).all() and (per_list["ndcg@10"] == 1.0).all()
    assert sum(len(set(s)) >= 10 for s in seen) > len(seen) // 2


@pytest.mark.parametrize("backbone", ["setrank", "dlcm", "sasrec"])
def test_every_backbone_uses_knowledge_and_reloads_from_its_checkpoint(synthetic, tmp_path, backbone):
    """Each re-ranker backbone learns the synthetic lists, does better with the taste knowledge than without on
    unseen users, and comes back from `save_checkpoint` as the same class giving the same scores."""
    from rlrf4rec.core.recommender import load_checkpoint, save_checkpoint

    spec = dataclasses.replace(SPEC, backbone=backbone)
    results, (task, model, knowledge, weights) = _fit_id_and_knowledge(*synthetic, spec)
    assert results["knowledge"] > results["id"] + 0.05, results
    save_checkpoint(tmp_path, weights, spec, knowledge)
    loaded = load_checkpoint(tmp_path, task)
    assert type(loaded.model) is type(model)
    np.testing.assert_array_equal(
        loaded.task.scores(loaded.model, "valid", loaded.knowledge(knowledge)), task.scores(model, "valid", knowledge)
    )


@pytest.mark.parametrize(("n", "world"), [(10, 2), (11, 2), (7, 3), (5, 1), (3, 4)])
def test_ddp_shards_cover_the_rows_by_rank_disjointly_with_equal_lengths(n, world):
    from rlrf4rec.core.recommender import _shard

    shards = [_shard(n, seed=11, rank=r, world=world).tolist() for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # every worker takes the same number of steps
    assert set().union(*shards) == set(range(n))  # the union is the dataset
    per_worker = -(-n // world)
    distinct = [set(s) for s in shards]
    # Disjoint except for the top-up: exactly per_worker * world - n rows repeated, taken from the permutation's start.
    assert sum(len(s) for s in distinct) - n == per_worker * world - n
    assert all(len(s) == len(d) for s, d in zip(shards, distinct))  # no worker sees a row twice
    assert shards != [shards[0]] * world or world == 1  # the rank selects the shard
    if n >= 7:  # another seed, another permutation (small n may repeat one by chance)
        assert [_shard(n, 12, r, world).tolist() for r in range(world)] != shards
