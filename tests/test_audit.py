"""The signal audit's statistics on planted signals (rlrf4rec.core.audit)."""

import numpy as np
import pytest

from rlrf4rec.core import audit


def _judges(signal: float, users: int = 400, n: int = 16, seed: int = 0):
    """Two judges reading the same per-text quality (scaled by `signal`) through independent noise."""
    rng = np.random.default_rng(seed)
    quality = rng.normal(size=(users, n))
    return signal * quality + rng.normal(size=(users, n)), signal * quality + rng.normal(size=(users, n))


def test_label_validity_finds_a_planted_signal_and_none_in_shuffled_rewards():
    a, b = _judges(signal=3.0)
    strong = audit.label_validity(a, b)
    assert strong["mean"] > 0.95 and strong["ci"][0] > 0.9 and strong["users"] == 400
    shuffled = np.random.default_rng(1).permuted(b, axis=1)  # B's rewards moved to other texts of the same user
    null = audit.label_validity(a, shuffled)
    assert abs(null["mean"] - 0.5) < 0.06 and null["ci"][0] < 0.5 < null["ci"][1]


def test_label_validity_by_hand_with_ties():
    a = np.array([[0.1, 0.9, 0.5], [0.2, 0.2, 0.2], [0.3, 0.1, 0.7], [0.9, 0.2, 0.4]])
    b = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.1], [0.1, 0.3, 0.0]])
    # user 0: best 1 worst 0, B 1.0 > 0.0 -> 1; user 1 tied under A -> left out; user 2: best 2 worst 1, B 0.1 < 0.5
    # -> 0; user 3: best 0 worst 1, B 0.1 < 0.3 -> 0.
    out = audit.label_validity(a, b, num_samples=100)
    assert out["mean"] == pytest.approx(1 / 3) and out["users"] == 3 and out["tied_users"] == 1
    b[3, 0] = 0.3  # B ties A's best and worst: half a vote
    assert audit.label_validity(a, b, num_samples=100)["mean"] == pytest.approx(1.5 / 3)


def test_best_of_n_ceiling_by_hand_and_grows_with_n_for_a_real_signal():
    a = np.array([[0.0, 1.0, 0.0, 0.0], [2.0, 0.0, 0.0, 1.0]])
    b = np.array([[0.0, 0.4, 0.2, 0.2], [0.1, 0.3, 0.5, 0.3]])
    out = audit.best_of_n_ceiling(a, b, ns=(2, 4, 8), num_samples=100)
    assert set(out) == {2, 4}  # 8 > the 4 texts: left out
    # n=2: user 0 picks text 1 (0.4 - mean(0, 0.4) = 0.2), user 1 picks text 0 (0.1 - 0.2 = -0.1) -> mean 0.05
    assert out[2]["mean"] == pytest.approx(0.05)
    # n=4: user 0: 0.4 - 0.2 = 0.2; user 1: 0.1 - 0.3 = -0.2 -> 0
    assert out[4]["mean"] == pytest.approx(0.0)
    a, b = _judges(signal=1.0)
    curve = audit.best_of_n_ceiling(a, b)
    assert 0 < curve[2]["ci"][0] and curve[2]["mean"] < curve[4]["mean"] < curve[8]["mean"] < curve[16]["mean"]
    null = audit.best_of_n_ceiling(a, np.random.default_rng(2).permuted(b, axis=1))
    assert null[16]["ci"][0] < 0 < null[16]["ci"][1]


def test_within_user_association_and_paired_difference():
    reward = np.array([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1], [0.5, 0.5, 0.5]])
    feature = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    out = audit.within_user_association(feature, reward, num_samples=100)
    assert out["mean"] == pytest.approx(0.0) and out["users"] == 2 and out["constant_users"] == 1
    diff = audit.paired_difference(np.array([1.0, 2.0]), np.array([0.5, 0.5]), num_samples=100)
    assert diff["mean"] == pytest.approx(1.0)


def test_derangement_leaves_nobody_their_own():
    for n in (2, 3, 10, 94):
        source = audit.derangement(n, seed=n)
        assert sorted(source.tolist()) == list(range(n)) and (source != np.arange(n)).all()
    with pytest.raises(ValueError, match="2 users"):
        audit.derangement(1, seed=0)
