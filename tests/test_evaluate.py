"""The evaluate stage's pure parts on lists small enough to rank by hand: per-user metrics, summaries, paired
differences."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from rlrf4rec.core import schema as S
from rlrf4rec.core.metrics import RANKED_METRICS as METRICS
from rlrf4rec.core.recommender import ModelSpec, RerankTask
from rlrf4rec.core.scoring import RewardModel
from rlrf4rec.stages.evaluate import paired_differences, per_user_metrics, popularity_metrics, summarize

R2 = 1 / np.log2(3)  # NDCG of a list whose one positive is ranked 2nd
R3 = 1 / np.log2(4)  # ... 3rd (= 0.5)


def _tables() -> dict[str, pa.Table]:
    """Items 1-4 (idx = id) with the data stage's train-user counts 1: 3, 2: 2, 3: 1, 4: 0 (item_index.train_count:
    that no test interaction reaches them is tests/test_protocol.py's); test user x interacted with item 4 four
    times. Test lists (candidates -> labels):
        x: [4, 1] -> [0, 1]    [1, 3] -> [0, 1]    [2, 4] -> [1, 0]
        y: [2, 3, 4] -> [0, 0, 1]    [4, 2] -> [1, 0]
    z is a test user without lists."""
    items = [str(i) for i in range(1, 5)]
    sequences = [
        ("t1", "train", ["1", "1", "1", "2", "2"]),
        ("t2", "train", ["3"]),
        ("x", "test", ["4", "4", "4", "4"]),
        ("y", "test", ["2"]),
        ("z", "test", ["3"]),
    ]
    lists = [
        ("t1", "train", ["1", "2"], [1, 0]),
        ("x", "test", ["4", "1"], [0, 1]),
        ("x", "test", ["1", "3"], [0, 1]),
        ("x", "test", ["2", "4"], [1, 0]),
        ("y", "test", ["2", "3", "4"], [0, 0, 1]),
        ("y", "test", ["4", "2"], [1, 0]),
    ]
    return {
        "item_index": pa.Table.from_pylist(
            [{S.ITEM_ID: i, S.ITEM_IDX: int(i), S.TRAIN_COUNT: 4 - int(i)} for i in items], schema=S.ITEM_INDEX
        ),
        "items": pa.Table.from_pylist(
            [{S.ITEM_ID: i, S.TITLE: f"Movie {i}", S.YEAR: 2000, S.GENRES: ["A"]} for i in items], schema=S.ITEMS
        ),
        "sequences": pa.Table.from_pylist(
            [
                {
                    S.USER_ID: u,
                    S.SPLIT: split,
                    S.ITEM_IDS: ids,
                    S.RATINGS: [4.0] * len(ids),
                    S.TIMESTAMPS: list(range(len(ids))),
                    S.HISTORY_START: 0,
                    S.HISTORY_END: len(ids),
                }
                for u, split, ids in sequences
            ],
            schema=S.SEQUENCES,
        ),
        "rerank_lists": pa.Table.from_pylist(
            [
                {S.USER_ID: u, S.SPLIT: split, S.LIST_IDX: n, S.CANDIDATE_ITEMS: c, S.LABELS: labels}
                for n, (u, split, c, labels) in enumerate(lists)
            ],
            schema=S.RERANK_LISTS,
        ),
    }


@pytest.fixture(scope="module")
def task() -> RerankTask:
    return RerankTask(_tables(), ModelSpec(history_len=2))


USERS = ["y", "x", "z"]  # the order of the output rows (and of the knowledge vectors)


def test_popularity_ranks_by_train_users_interactions_only(task):
    out = popularity_metrics(task, USERS)
    assert set(out) == set(METRICS)
    # x: [4, 1] puts 1 first (hit), [1, 3] ranks the positive 2nd, [2, 4] puts 2 first (hit); had x's own four
    # interactions with item 4 counted, 4 would lead and the first list would miss.
    # y: [2, 3, 4] ranks the positive 3rd, [4, 2] ranks it 2nd (the left padding of the short list is never ranked).
    np.testing.assert_allclose(out["ndcg@1"], [0.0, 2 / 3, 0.0])
    np.testing.assert_allclose(out["ndcg@3"], [(R3 + R2) / 2, (2 + R2) / 3, 0.0])
    np.testing.assert_allclose(out["map@3"], [(1 / 3 + 1 / 2) / 2, (1 + 1 / 2 + 1) / 3, 0.0])
    np.testing.assert_allclose(out["ndcg@7"], out["ndcg@3"])  # a cut-off past a list's end counts the whole list


class IdTimesKnowledge(torch.nn.Module):
    """A re-ranker ranked by hand: score = item idx x the user's knowledge[0] (+1: high ids first, -1: low ids
    first); without knowledge (ID-only), low ids first."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))  # task.logits reads the device off the parameters

    def forward(self, candidates, attributes=None, knowledge=None, history=None, own=None):
        sign = -1.0 if knowledge is None else knowledge["user"][:, :1]  # [B, 1]
        return candidates.float() * sign  # [B, C]


def test_each_user_is_scored_with_its_own_knowledge_row(task):
    model = RewardModel(task, IdTimesKnowledge())
    knowledge = per_user_metrics(model, USERS, np.array([[1.0], [-1.0], [1.0]], np.float32))  # y: +1, x: -1
    # y, high ids first: item 4 leads both its lists, a hit each time. x, low ids first: hit, 2nd, hit.
    np.testing.assert_allclose(knowledge["ndcg@1"], [1.0, 2 / 3, 0.0])
    np.testing.assert_allclose(knowledge["ndcg@3"], [1.0, (2 + R2) / 3, 0.0])
    swapped = per_user_metrics(model, USERS, np.array([[-1.0], [1.0], [1.0]], np.float32))  # y: -1, x: +1
    # y: 3rd and 2nd; x: 2nd, hit (3 before 1), 2nd
    np.testing.assert_allclose(swapped["ndcg@1"], [0.0, 1 / 3, 0.0])
    np.testing.assert_allclose(swapped["ndcg@3"], [(R3 + R2) / 2, (1 + 2 * R2) / 3, 0.0])
    np.testing.assert_allclose(swapped["map@3"], [(1 / 3 + 1 / 2) / 2, (1 / 2 + 1 + 1 / 2) / 3, 0.0])


def test_id_only_is_scored_without_knowledge(task):
    out = per_user_metrics(RewardModel(task, IdTimesKnowledge()), USERS, None)
    np.testing.assert_allclose(out["ndcg@1"], [0.0, 2 / 3, 0.0])  # low ids first for everyone
    np.testing.assert_allclose(out["ndcg@3"], [(R3 + R2) / 2, (2 + R2) / 3, 0.0])


def test_summarize_gives_the_mean_and_a_bootstrap_interval_around_it():
    # Two users, 0 and 1: a resample's mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the 2.5% and
    # 97.5% quantiles are 0 and 1.
    assert summarize({"ndcg@5": np.array([0.0, 1.0])}, 500, seed=0) == {"ndcg@5": [0.5, 0.0, 1.0]}
    out = summarize({"ndcg@5": np.array([0.0, 1.0, 1.0, 0.0, 1.0]), "map@5": np.full(5, 0.25)}, 500, seed=3)
    mean, low, high = out["ndcg@5"]
    assert mean == pytest.approx(0.6) and 0.0 <= low < mean < high <= 1.0
    assert out["map@5"] == [0.25, 0.25, 0.25]  # every user alike: no uncertainty
    assert all(type(v) is float for v in out["ndcg@5"])  # written to table.json as plain numbers


def _row(values) -> dict[str, np.ndarray]:
    return {m: np.asarray(values, dtype=np.float64) for m in METRICS}


def test_paired_differences_resolve_only_an_interval_that_excludes_zero():
    rows = {
        "popularity": _row([0.9, 0.9, 0.9, 0.9]),
        "KAR ID-only": _row([0.5, 0.5, 0.5, 0.5]),
        "ID only": _row([0.5, 0.5, 0.5, 0.5]),
        "base LLM": _row([0.3, 0.3, 0.3, 0.3]),
        "DPO round 1": _row([0.5, 0.7, 0.3, 0.5]),
    }
    out = paired_differences(rows, 500, seed=0)
    # every row against each baseline except itself (popularity too: a learned row must beat the count)
    assert set(out) == set(rows)
    assert set(out["DPO round 1"]) == {"popularity", "KAR ID-only", "ID only", "base LLM"}
    assert set(out["popularity"]) == {"KAR ID-only", "ID only", "base LLM"}
    assert set(out["ID only"]) == {"popularity", "KAR ID-only", "base LLM"}
    assert set(out["base LLM"]) == {"popularity", "KAR ID-only", "ID only"}
    assert all(set(by_metric) == set(METRICS) for bases in out.values() for by_metric in bases.values())

    d, low, high, resolved = out["base LLM"]["ID only"]["ndcg@5"]  # variant minus baseline, -0.2 for every user
    assert (d, low, high) == pytest.approx((-0.2, -0.2, -0.2)) and resolved is True
    d, low, high, resolved = out["popularity"]["base LLM"]["map@3"]
    assert (d, low, high) == pytest.approx((0.6, 0.6, 0.6)) and resolved is True
    d, low, high, resolved = out["ID only"]["KAR ID-only"]["ndcg@5"]  # the same values: [0, 0] touches 0
    assert (d, low, high, resolved) == (0.0, 0.0, 0.0, False)
    d, low, high, resolved = out["DPO round 1"]["ID only"]["ndcg@5"]  # +0.2 and -0.2 cancel
    assert d == pytest.approx(0.0) and low < 0 < high and resolved is False
    d, low, high, resolved = out["DPO round 1"]["base LLM"]["ndcg@1"]  # 0.2, 0.4, 0, 0.2
    assert d == pytest.approx(0.2) and low <= d <= high and resolved == (low > 0 or high < 0)


def test_evaluation_scores_a_text_exactly_as_the_reward_stage_does(task):
    """The fixed re-ranker rows read a policy's text through the same scoring as the reward: per-user NDCG@5 of a
    user's test lists equals that user's reward for the same knowledge vector."""
    model = RewardModel(task, IdTimesKnowledge(), metric="ndcg@5")
    users, vectors = ["y", "x"], np.array([[1.0], [-1.0]], np.float32)
    np.testing.assert_allclose(per_user_metrics(model, users, vectors)["ndcg@5"], model.score(users, vectors))
    swapped = vectors[::-1].copy()
    np.testing.assert_allclose(per_user_metrics(model, users, swapped)["ndcg@5"], model.score(users, swapped))
