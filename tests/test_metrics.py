import numpy as np
import pytest
import torch
from reference_metrics import reference_full_sort_metrics, reference_rank_metrics

from rlrf4rec.core.metrics import bootstrap_ci, full_sort_metrics, mean_metrics, rank_metrics, rank_order

LOG2_3 = np.log2(3.0)  # 1.5849625


def test_hand_computed_list_metrics():
    scores = np.array(
        [
            [0.9, 0.8, 0.7, 0.6, 0.5],  # A: ranked labels 1 0 1 0 0
            [0.1, 0.4, 0.3, 0.2, 0.0],  # B: ranked labels 0 0 1 1 (5th slot is padding)
            [0.5, 0.2, 0.9, 0.0, 0.0],  # C: no positive
            [0.2, 0.9, 0.5, 0.0, 0.0],  # D: graded, ranked labels 0 2 1
        ]
    )
    labels = np.array(
        [
            [1, 0, 1, 0, 0],
            [1, 0, 0, 1, 0],
            [0, 0, 0, 0, 0],
            [1, 0, 2, 0, 0],
        ],
        dtype=float,
    )
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]], dtype=bool)
    m = rank_metrics(scores, labels, ks=(1, 3, 5), mask=mask)

    # A: DCG@3 = 1/log2(2) + 1/log2(4) = 1.5; IDCG@3 = 1 + 1/log2(3) = 1.6309298 -> 0.9197208
    #    MAP@3 = (1/1 + 2/3) / 2 = 0.8333333; MAP@1 = 1/1 / 1 = 1
    # B: NDCG@1 = 0; DCG@3 = 1/log2(4) = 0.5 -> 0.5 / 1.6309298 = 0.3065736
    #    NDCG@5 (list has 4): DCG = 0.5 + 1/log2(5) = 0.9306766 -> 0.5706417
    #    MAP@3 = (1/3) / 1 = 0.3333333; MAP@5 = (1/3 + 2/4) / 2 = 0.4166667; MRR = 1/3
    # D: gains 2^0-1=0, 2^2-1=3, 2^1-1=1; DCG@3 = 3/log2(3) + 1/log2(4) = 2.3927893;
    #    IDCG@3 = 3 + 1/log2(3) = 3.6309298 -> 0.6590018; MAP@3 = (1/2 + 2/3) / 2 = 0.5833333; MRR = 1/2
    expected = {
        "ndcg@1": [1.0, 0.0, 0.0, 0.0],
        "ndcg@3": [1.5 / (1 + 1 / LOG2_3), 0.5 / (1 + 1 / LOG2_3), 0.0, 0.6590018048],
        "ndcg@5": [1.5 / (1 + 1 / LOG2_3), 0.5706417190, 0.0, 0.6590018048],
        "map@1": [1.0, 0.0, 0.0, 0.0],
        "map@3": [5 / 6, 1 / 3, 0.0, 7 / 12],
        "map@5": [5 / 6, 5 / 12, 0.0, 7 / 12],
        "hr@1": [1.0, 0.0, 0.0, 0.0],
        "hr@3": [1.0, 1.0, 0.0, 1.0],
        "hr@5": [1.0, 1.0, 0.0, 1.0],
        "mrr": [1.0, 1 / 3, 0.0, 0.5],
    }
    assert set(m) == set(expected)
    for name, values in expected.items():
        np.testing.assert_allclose(m[name], values, atol=1e-9, err_msg=name)
    assert pytest.approx(expected["ndcg@3"][0]) == 0.9197207891


def test_ties_break_to_earlier_position_and_torch_matches_numpy():
    scores = torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]])
    labels = torch.tensor([[0, 1, 0], [1, 0, 0]])
    np.testing.assert_array_equal(rank_order(scores), [[0, 1, 2], [0, 1, 2]])
    m = rank_metrics(scores, labels, ks=(1,))
    np.testing.assert_allclose(m["mrr"], [0.5, 1.0])  # positive at position 1 ranks 2nd; at position 0 ranks 1st
    np.testing.assert_allclose(m["ndcg@1"], [0.0, 1.0])
    m_np = rank_metrics(scores.numpy(), labels.numpy(), ks=(1,))
    for name in m:
        np.testing.assert_array_equal(m[name], m_np[name])


def test_padding_is_never_ranked_and_may_hold_nan():
    scores = np.array([[0.1, np.nan, 0.5], [0.1, 9.0, 0.5]])
    labels = np.array([[1, 1, 0], [1, 1, 0]])
    mask = np.array([[True, False, True], [True, False, True]])
    m = rank_metrics(scores, labels, ks=(1,), mask=mask)
    np.testing.assert_allclose(m["mrr"], [0.5, 0.5])  # valid order: position 2 (label 0), then position 0
    np.testing.assert_allclose(m["ndcg@1"], [0.0, 0.0])
    np.testing.assert_array_equal(rank_order(scores, mask), [[2, 0, 1], [2, 0, 1]])


def test_nan_scores_raise():
    with pytest.raises(ValueError, match="NaN"):
        rank_metrics(np.array([[0.3, np.nan]]), np.array([[1, 0]]))
    with pytest.raises(ValueError, match="NaN"):
        rank_metrics(torch.tensor([[float("nan"), 1.0]]), torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match="NaN"):
        full_sort_metrics(np.array([[0.0, np.nan, 0.2]]), np.array([2]))


def test_bad_shapes_and_ks_raise():
    with pytest.raises(ValueError, match="same shape"):
        rank_metrics(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="positive"):
        rank_metrics(np.zeros((2, 3)), np.zeros((2, 3)), ks=(0,))
    with pytest.raises(ValueError, match="padding"):
        full_sort_metrics(np.zeros((1, 4)), np.array([0]))


def test_vectorized_matches_reference_loop():
    rng = np.random.default_rng(0)
    B, L = 200, 10
    scores = rng.integers(0, 5, size=(B, L)) / 4.0  # few distinct values -> many ties
    labels = rng.integers(0, 2, size=(B, L)) * rng.integers(1, 3, size=(B, L))  # graded 0 / 1 / 2
    lengths = rng.integers(1, L + 1, size=B)
    mask = np.arange(L)[None, :] < lengths[:, None]
    for mask_arg in (None, mask):
        fast = rank_metrics(scores, labels, ks=(1, 3, 5, 7, 20), mask=mask_arg)
        slow = reference_rank_metrics(scores, labels, ks=(1, 3, 5, 7, 20), mask=mask_arg)
        assert set(fast) == set(slow)
        for name in slow:
            np.testing.assert_allclose(fast[name], slow[name], atol=1e-12, err_msg=name)
    assert 0.0 < fast["ndcg@5"].mean() < 1.0


def test_full_sort_hand_example_with_history_excluded():
    scores = np.array(
        [
            # pad   1    2    3    4    5    6
            [0.0, 0.9, 0.8, 0.1, 0.7, 0.3, 0.2],  # target 4; items 1, 2 seen -> excluded -> rank 1
            [5.0, 0.1, 0.6, 0.5, 0.4, 0.9, 0.3],  # target 3; 5 seen, pad ignored; only item 2 ahead -> rank 2
        ]
    )
    target = np.array([4, 3])
    exclude = [np.array([1, 2]), np.array([5, 3])]  # the target itself in the history must still be ranked
    m = full_sort_metrics(scores, target, exclude, ks=(1, 3))
    np.testing.assert_allclose(m["hr@1"], [1.0, 0.0])
    np.testing.assert_allclose(m["hr@3"], [1.0, 1.0])
    np.testing.assert_allclose(m["ndcg@1"], [1.0, 0.0])
    np.testing.assert_allclose(m["ndcg@3"], [1.0, 1 / LOG2_3])  # 1/log2(2+1) = 0.6309298
    bool_mask = np.zeros(scores.shape, dtype=bool)
    bool_mask[0, [1, 2]] = True
    bool_mask[1, [5, 3]] = True
    m_mask = full_sort_metrics(torch.tensor(scores), torch.tensor(target), torch.tensor(bool_mask), ks=(1, 3))
    for name in m:
        np.testing.assert_array_equal(m[name], m_mask[name])
    without_exclusion = full_sort_metrics(scores, target, None, ks=(1, 3))
    np.testing.assert_allclose(without_exclusion["hr@1"], [0.0, 0.0])  # user 0 rank 3, user 1 rank 3


def test_full_sort_ties_are_pessimistic_and_match_reference():
    constant = np.ones((3, 30))
    m = full_sort_metrics(constant, np.array([1, 15, 29]), [[], [2, 3], []], ks=(10,))
    np.testing.assert_array_equal(m["hr@10"], [0.0, 0.0, 0.0])  # a constant model earns nothing
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 6, size=(50, 40)).astype(float)
    target = rng.integers(1, 40, size=50)
    exclude = [rng.choice(np.arange(1, 40), size=rng.integers(0, 10), replace=False) for _ in range(50)]
    fast = full_sort_metrics(scores, target, exclude, ks=(5, 10))
    slow = reference_full_sort_metrics(scores, target, exclude, ks=(5, 10))
    for name in slow:
        np.testing.assert_allclose(fast[name], slow[name], atol=1e-12, err_msg=name)


def test_bootstrap_ci_contains_mean_and_is_deterministic():
    values = np.random.default_rng(3).random(300)
    mean, low, high = bootstrap_ci(values, num_samples=500, seed=7)
    assert mean == pytest.approx(values.mean())
    assert low < mean < high
    assert high - low < 0.2  # ~4 standard errors of a U(0,1) mean over 300 values is ~0.067
    assert bootstrap_ci(values, num_samples=500, seed=7) == (mean, low, high)
    assert bootstrap_ci(values, num_samples=500, seed=8) != (mean, low, high)
    assert bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_mean_metrics_namespaces():
    per_list = rank_metrics(np.array([[0.9, 0.1], [0.1, 0.9]]), np.array([[1, 0], [1, 0]]), ks=(1,))
    assert mean_metrics(per_list, prefix="eval/") == {
        "eval/ndcg@1": 0.5,
        "eval/map@1": 0.5,
        "eval/hr@1": 0.5,
        "eval/mrr": 0.75,
    }
