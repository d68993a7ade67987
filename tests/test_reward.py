"""The reward: a trained knowledge-augmented re-ranker scores a user's lists with a candidate knowledge vector."""

import numpy as np
import pytest
import torch
from synthetic import write_dataset, write_knowledge

from rlrf4rec.core.artifacts import read_tables
from rlrf4rec.core.config import RunConfig, from_dict
from rlrf4rec.core.recommender import ModelSpec, RerankTask, fit, save_checkpoint
from rlrf4rec.core.scoring import RewardEnsemble, RewardModel, knowledge_matrix, rewards_table
from rlrf4rec.stages.data import run_data

SPEC = ModelSpec(
    max_epochs=10, patience=10, batch_size=64, lr=1e-3, history_len=1, dropout=0.0, interaction=False, warmup_epochs=0
)


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    tastes = write_dataset(root / "raw", num_users=200, length=24, liked_fraction=0.5)
    cfg = from_dict(
        RunConfig, {"name": "r", "run_dir": str(root / "run"), "data": {"format": "parquet", "path": str(root / "raw")}}
    )
    data_dir = run_data(cfg)
    write_knowledge(root / "knowledge.parquet", tastes, noise=0.0)
    task = RerankTask(read_tables(data_dir), SPEC)
    knowledge = knowledge_matrix(root / "knowledge.parquet", task.users)
    torch.manual_seed(0)
    model = task.build_model(knowledge.shape[1])
    state = fit(task, model, knowledge, seed=0)
    save_checkpoint(root, state.best_model, SPEC, knowledge)
    return RewardModel.load(root, data_dir), tastes, root, data_dir


def _taste_vectors(tastes, users, flip=False):
    vectors = np.zeros((len(users), 8), np.float32)
    for row, user in enumerate(users):
        vectors[row, tastes[user] ^ int(flip)] = 1.0
    return vectors


def test_the_right_text_earns_more_reward(reward_model):
    rm, tastes, _, _ = reward_model
    users = [u for u in rm.task.list_users["train"][::3]]
    right = rm.score(users, _taste_vectors(tastes, users))
    wrong = rm.score(users, _taste_vectors(tastes, users, flip=True))
    assert right.mean() > wrong.mean() + 0.1  # a vector that states the user's real taste re-ranks better
    assert ((right >= 0) & (right <= 1)).all()


def test_reward_is_deterministic_and_independent_of_batching(reward_model):
    rm, tastes, _, _ = reward_model
    users = sorted(set(rm.task.list_users["train"]))[:40] + sorted(set(rm.task.list_users["valid"]))[:5]
    vectors = np.random.default_rng(0).normal(size=(len(users), 8)).astype(np.float32)
    first = rm.score(users, vectors)
    assert np.array_equal(first, rm.score(users, vectors))
    rm.chunk_lists = 7  # many small forward passes
    np.testing.assert_allclose(rm.score(users, vectors), first, rtol=0, atol=1e-12)
    rm.chunk_lists = 4096
    # a user's reward is the mean over its own lists only: scoring it alone gives the same number
    np.testing.assert_allclose(rm.score(users[3:4], vectors[3:4]), first[3:4], rtol=0, atol=1e-12)


def test_unknown_user_and_id_only_model_are_refused(reward_model, tmp_path):
    rm, _, _, data_dir = reward_model
    with pytest.raises(ValueError, match="user 'nobody' has no re-rank list"):
        rm.score(["nobody"], np.zeros((1, 8), np.float32))
    task = rm.task
    id_model = task.build_model(None)
    save_checkpoint(tmp_path, id_model.state_dict(), task.spec, None)
    with pytest.raises(ValueError, match="ID-only recommender"):
        RewardModel.load(tmp_path, data_dir)


def test_an_ensembles_reward_is_the_mean_of_its_seeds(reward_model, tmp_path):
    """reward.ensemble: the same recommender trained with another seed scores differently; the ensemble's reward is
    the members' mean, row by row."""
    rm, tastes, root, data_dir = reward_model
    knowledge = knowledge_matrix(root / "knowledge.parquet", rm.task.users)
    torch.manual_seed(1)
    state = fit(rm.task, rm.task.build_model(knowledge.shape[1]), knowledge, seed=1)
    save_checkpoint(tmp_path, state.best_model, SPEC, knowledge)
    users = sorted(set(rm.task.list_users["train"]))[:60]
    vectors = np.random.default_rng(1).normal(size=(len(users), 8)).astype(np.float32)
    first, second = rm.score(users, vectors), RewardModel.load(tmp_path, data_dir).score(users, vectors)
    assert not np.allclose(first, second)  # two seeds, two reward models
    both = RewardEnsemble.load([root, tmp_path], data_dir)
    np.testing.assert_allclose(both.score(users, vectors), (first + second) / 2, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(RewardEnsemble.load([root], data_dir).score(users, vectors), first)
    assert both.by_user.keys() == rm.by_user.keys()
    with pytest.raises(ValueError, match="at least one recommender"):
        RewardEnsemble([])


def test_an_ensemble_is_built_only_around_a_full_knowledge_recommender_of_the_run(tmp_path):
    """reward.ensemble > 1 retrains seed siblings like the given recommender, so a fold model, an ID-only one or one
    from another run is refused with the fix; one seed takes any recommender as it is."""
    import dataclasses

    from rlrf4rec.core.artifacts import stage_output
    from rlrf4rec.stages.reward import reward_scorer

    cfg = from_dict(RunConfig, {"name": "r", "run_dir": str(tmp_path / "run"), "reward": {"ensemble": 2}})

    def recommender(path, **stats):
        with stage_output(path, "f", None) as (_, out):
            out.update(stats)
        return path

    fold = recommender(cfg.layout.recommender("base-fold0"), held_out_users=3, knowledge=["item", "user"])
    id_only = recommender(cfg.layout.recommender("id"), held_out_users=0, knowledge=[])
    elsewhere = recommender(tmp_path / "other" / "recommender" / "base", held_out_users=0, knowledge=["user"])
    for bad in (fold, id_only, elsewhere):
        with pytest.raises(ValueError, match=r"must be a user-knowledge recommender of this run.*--reward.ensemble=1"):
            reward_scorer(cfg, bad)
    one = dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, ensemble=1))
    assert reward_scorer(one, fold) == [fold] and reward_scorer(one, elsewhere) == [elsewhere]


def test_a_fold_must_leave_two_train_users_to_train_on():
    from rlrf4rec.core.scoring import check_fold

    check_fold(2, 0, 8, 10, "fix")  # 2 left: a model can train
    with pytest.raises(ValueError, match=r"cross_fit_folds=1: fold 0 holds out 9 of 10 train users, .*; use 2 folds"):
        check_fold(1, 0, 9, 10, "use 2 folds")


def test_rewards_table_keeps_the_generation_keys():
    import pyarrow as pa

    from rlrf4rec.core import schema as S

    gens = pa.table(
        {
            S.USER_ID: ["a", "a"],
            S.SAMPLE_IDX: pa.array([0, 1], pa.int32()),
            S.SPLIT: ["train"] * 2,
            S.POLICY_VERSION: ["base"] * 2,
        }
    )
    table = rewards_table(gens, np.array([0.25, 0.5]))
    assert table.schema == S.REWARDS and table.column(S.REWARD).to_pylist() == [0.25, 0.5]


@pytest.mark.slow
def test_ray_data_scoring_matches_in_process(reward_model, tmp_path):
    """The scale-out path (actors holding encoder + recommender) gives exactly the in-process rewards. The Ray Data
    map under it returns every row once, in order, or fails."""
    import os

    import pyarrow as pa
    import ray

    from rlrf4rec.core import schema as S
    from rlrf4rec.core.cluster import map_rows_on_ray
    from rlrf4rec.stages.reward import score_on_ray

    class Reverse:  # local: shipped by value
        def __call__(self, batch):
            return batch.take(list(range(batch.num_rows - 1, -1, -1)))

    class RepeatFirstRow:  # a lost-or-repeated-rows bug: the batch with its first row twice
        def __call__(self, batch):
            return pa.concat_tables([batch.slice(0, 1), batch])

    class TasteEncoder:  # texts that name a genre -> the synthetic knowledge vectors (local: shipped by value)
        def encode(self, texts):
            out = np.zeros((len(texts), 8), np.float32)
            for i, text in enumerate(texts):
                out[i, 1 if "genre B" in text else 0] = 1.0
            return out

    rm, tastes, model_dir, data_dir = reward_model
    users = sorted(set(rm.task.list_users["train"]))[:30]
    texts = [f"likes genre {'AB'[(tastes[u] + i) % 2]}" for i, u in enumerate(users)]
    expected = rm.score(users, TasteEncoder().encode(texts))
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rows = pa.table({S.USER_ID: users, S.KNOWLEDGE_TEXT: texts})
        got = score_on_ray(rows, TasteEncoder, model_dir, data_dir, "ndcg@5", batch_size=7, concurrency=2)
        numbers = pa.table({"x": list(range(23))})
        kwargs = {"batch_size": 5, "concurrency": 2, "num_cpus": 1, "what": "test"}
        assert map_rows_on_ray(numbers, Reverse, (), **kwargs).column("x").to_pylist() == list(range(23))
        with pytest.raises(Exception, match="lost or repeated"):
            map_rows_on_ray(numbers, RepeatFirstRow, (), **kwargs)
    finally:
        ray.shutdown()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_synthetic_genre_reward_on_a_hand_made_user():
    import pyarrow as pa

    from rlrf4rec.core import schema as S
    from rlrf4rec.core.metrics import genres_named, synthetic_genre_reward
    from rlrf4rec.core.scoring import list_genres

    items = pa.table(
        {
            S.ITEM_ID: ["1", "2", "3", "4"],
            S.GENRES: [["Drama", "War"], ["Sci-Fi"], ["Comedy", "Drama"], ["Children's", "unknown"]],
        }
    )
    lists = pa.table(
        {
            S.USER_ID: ["u", "u"],
            S.CANDIDATE_ITEMS: [["1", "3"], ["2", "4"]],
            S.LABELS: [[1, 0], [1, 0]],
        }
    )
    liked, other = list_genres({"items": items, "rerank_lists": lists})["u"]
    assert liked == {"drama", "war", "sci-fi"} and other == {"comedy", "drama", "children's"}
    assert genres_named("Loves SCI-FI and war films; dramatic.", liked | other) == {"sci-fi", "war"}  # not "drama"
    # Liked genres named: drama and sci-fi, 2 of 3; other genres (children's, comedy: drama is liked) named:
    # comedy, 1 of 2. By hand: 2/3 - 1/2.
    text = "Enjoys drama, sci-fi and comedy."
    assert synthetic_genre_reward(text, liked, other) == pytest.approx(2 / 3 - 1 / 2)
    assert synthetic_genre_reward("Nothing about films.", liked, other) == 0.0
    assert synthetic_genre_reward("children's comedy", liked, other) == pytest.approx(-1.0)

    # The contrast: less the mean over other users. v likes comedy only (other: war); w likes nothing listed here.
    from rlrf4rec.core.metrics import contrast_genre_reward

    v, w = ({"comedy"}, {"war"}), (set(), {"drama"})
    # Own 2/3 - 1/2 as above; on v: comedy named (1/1), war not named (0): 1; on w: drama named, 1 of 1: -1.
    assert contrast_genre_reward(text, (liked, other), [v, w]) == pytest.approx(2 / 3 - 1 / 2 - (1 + -1) / 2)
    # A text naming no genre earns nothing on any lists; without other users the contrast is the plain reward.
    assert contrast_genre_reward("nothing", (liked, other), [v, w]) == 0.0
    assert contrast_genre_reward(text, (liked, other), []) == pytest.approx(2 / 3 - 1 / 2)


def test_cross_fitting_scores_every_train_text_by_the_model_that_held_its_user_out(reward_model, tmp_path, monkeypatch):
    """Routing only: stub models score a text with their fold id (-1: the round's model). A train user's texts go to
    the one fold model trained without that user; valid texts to the round's model; folds cover exactly the rewarded
    train users (loop.train_users), disjointly."""
    from synthetic import generations_table, stage_with

    from rlrf4rec.core import schema as S
    from rlrf4rec.core import scoring
    from rlrf4rec.core.artifacts import read_marker, read_parquet, read_table, stage_output
    from rlrf4rec.core.layout import GENERATIONS, REWARDS
    from rlrf4rec.stages import reward as R
    from rlrf4rec.stages import train as T

    _, _, root, data_dir = reward_model
    cfg = from_dict(
        RunConfig,
        {
            "name": "r",
            "run_dir": str(root / "run"),
            "data": {"format": "parquet", "path": str(root / "raw")},
            "loop": {"train_users": 30},
            "reward": {"cross_fit_folds": 3, "ensemble": 1},
        },
    )
    trained: dict[str, set[str]] = {}

    def fake_run_recommender(cfg, name, data_dir, knowledge, held_out=()):
        trained[name] = set(held_out)
        with stage_output(tmp_path / "recs" / name, f"fp-{name}", None):
            pass
        return tmp_path / "recs" / name

    class Stub:
        def __init__(self, dirs):
            self.id = int(str(dirs[0]).split("fold")[1]) if "fold" in str(dirs[0]) else -1
            self.by_user = {u: None for u in read_table(data_dir, "sequences").column(S.USER_ID).to_pylist()}

        def encode(self, encoder, texts, cache=None):
            return np.zeros((len(texts), 1), np.float32)

        def score(self, users, vectors):
            return np.full(len(users), float(self.id))

    monkeypatch.setattr(T, "run_recommender", fake_run_recommender)
    load = classmethod(lambda cls, dirs, data, metric="ndcg@5": Stub(dirs))
    monkeypatch.setattr(scoring.RewardEnsemble, "load", load)
    monkeypatch.setattr(scoring, "make_encoder", lambda cfg: None)
    main = fake_run_recommender(cfg, "base", data_dir, None)
    folds = R.reward_folds(cfg, main)

    seqs = read_table(data_dir, "sequences").to_pylist()
    split = {r[S.USER_ID]: r[S.SPLIT] for r in seqs}
    rewarded = sorted(u for u, s in split.items() if s == "train")[:30]
    held = [set(users) for _, users in folds]
    assert len(folds) == 3 and set().union(*held) == set(rewarded) and sum(map(len, held)) == 30
    for k, (dirs, users) in enumerate(folds):
        assert trained[dirs[0].name] == set(users) and dirs[0].name == f"base-fold{k}"

    valid = sorted(u for u, s in split.items() if s == "valid")[:5]
    rows = [(u, k, f"text {k}", []) for u in rewarded + valid for k in range(2)]
    gen = stage_with(tmp_path / "gen", GENERATIONS, generations_table(rows, split), S.GENERATIONS)
    out = R.run_reward(cfg, gen, [main], tmp_path / "rewards", folds)
    fold_of = {u: k for k, users in enumerate(held) for u in users}
    for r in read_parquet(out / REWARDS, S.REWARDS).to_pylist():
        assert r[S.REWARD] == (fold_of[r[S.USER_ID]] if split[r[S.USER_ID]] == "train" else -1), r
    assert read_marker(out)["stats"]["cross_fitted_rows"] == 60
    # GRPO's reward function routes the same way: each completion scored by the model its user's fold was held from.
    from rlrf4rec.stages.grpo import RecsysReward

    reward = RecsysReward(cfg.to_dict(), [str(main)], [([str(d) for d in dirs], users) for dirs, users in folds])
    table = read_parquet(out / REWARDS, S.REWARDS).to_pylist()
    got = reward(
        ["p"] * len(table), [[{"role": "assistant", "content": "text"}]] * len(table), [r[S.USER_ID] for r in table]
    )
    assert got == [r[S.REWARD] for r in table]
