import numpy as np
import pyarrow as pa
import pytest

from rlrf4rec.core import schema as S
from rlrf4rec.core.config import DataConfig
from rlrf4rec.core.protocol import build_protocol, history_window, split_users

NUM_ITEMS = 40


def _tables(lengths: dict[str, int]):
    """User u with n interactions of items i(k), k = offset..offset+n-1, at shuffled file order; ratings cycle 1..5."""
    rows = []
    for u, (user, n) in enumerate(lengths.items()):
        for k in range(n):
            rows.append((user, f"i{(u * 3 + k) % NUM_ITEMS + 1}", float(k % 5 + 1), 1000 + 10 * k))
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]  # time order must be restored
    users, items, ratings, ts = zip(*rows)
    interactions = pa.table(
        {S.USER_ID: users, S.ITEM_ID: items, S.RATING: ratings, S.TIMESTAMP: ts}, schema=S.INTERACTIONS
    )
    item_ids = [f"i{k}" for k in range(1, NUM_ITEMS + 1)]
    catalog = pa.table(
        {S.ITEM_ID: item_ids, S.TITLE: item_ids, S.YEAR: [2000] * NUM_ITEMS, S.GENRES: [["Drama"]] * NUM_ITEMS},
        schema=S.ITEMS,
    )
    return interactions, catalog


LENGTHS = {"a": 14, "b": 20, "c": 12, "d": 9, "e": 30}
CFG = DataConfig(history_max=5, min_user_interactions=10)


def test_history_window():
    assert history_window(14, 0.5, 5) == (2, 7)
    assert history_window(14, 0.5, 30) == (0, 7)
    assert history_window(3, 0.2, 30) == (0, 1)  # always at least one history item


def test_exact_list_composition_for_one_user():
    tables = build_protocol(*_tables(LENGTHS), CFG, seed=1)
    seq = {r[S.USER_ID]: r for r in tables.sequences.to_pylist()}
    a = seq["a"]
    # 14 interactions: window = most recent 5 of the first 7 -> [2, 7); lists from positions 7..13 in chunks of 4:
    # one full chunk (7, 8, 9, 10); the 3 left over (11, 12, 13) make no list.
    assert (a[S.HISTORY_START], a[S.HISTORY_END]) == (2, 7)
    assert a[S.ITEM_IDS] == [f"i{k + 1}" for k in range(14)]  # time order restored from shuffled rows
    lists = [r for r in tables.rerank_lists.to_pylist() if r[S.USER_ID] == "a"]
    assert len(lists) == 1
    (lst,) = lists
    positives = {"i8": 3.0, "i9": 4.0, "i10": 5.0, "i11": 1.0}  # item -> rating (k % 5 + 1 for k = 7..10)
    assert len(lst[S.CANDIDATE_ITEMS]) == 10 and len(set(lst[S.CANDIDATE_ITEMS])) == 10
    assert set(positives) <= set(lst[S.CANDIDATE_ITEMS])
    negatives = set(lst[S.CANDIDATE_ITEMS]) - set(positives)
    assert len(negatives) == 6 and not negatives & set(a[S.ITEM_IDS])
    label_of = dict(zip(lst[S.CANDIDATE_ITEMS], lst[S.LABELS]))
    assert {i: label_of[i] for i in positives} == {"i8": 0, "i9": 1, "i10": 1, "i11": 0}  # rating > 3
    assert all(label_of[i] == 0 for i in negatives)


def test_lists_per_user_and_short_users_dropped():
    tables = build_protocol(*_tables(LENGTHS), CFG, seed=1)
    per_user = {}
    for user in tables.rerank_lists.column(S.USER_ID).to_pylist():
        per_user[user] = per_user.get(user, 0) + 1
    # b: 20 -> window end 10, 10 left -> 2 lists; c: 12 -> 6 left -> 1; e: 30 -> 15 left -> 3; d (9) is dropped.
    assert per_user == {"a": 1, "b": 2, "c": 1, "e": 3}
    assert tables.stats["users_dropped_too_few_interactions"] == 1
    assert "d" not in tables.sequences.column(S.USER_ID).to_pylist()


def test_no_window_or_later_item_leaks_and_no_seen_negative():
    tables = build_protocol(*_tables(LENGTHS), CFG, seed=3)
    seq = {r[S.USER_ID]: r for r in tables.sequences.to_pylist()}
    for lst in tables.rerank_lists.to_pylist():
        s = seq[lst[S.USER_ID]]
        window = set(s[S.ITEM_IDS][s[S.HISTORY_START] : s[S.HISTORY_END]])
        seen = set(s[S.ITEM_IDS])
        after = set(s[S.ITEM_IDS][s[S.HISTORY_END] :])
        assert not window & set(lst[S.CANDIDATE_ITEMS])
        for item, label in zip(lst[S.CANDIDATE_ITEMS], lst[S.LABELS]):
            assert item in after or item not in seen  # a candidate is a held-out positive or a never-seen item
            if item not in seen:
                assert label == 0


def test_same_seed_same_tables_other_seed_differs():
    data = _tables(LENGTHS)
    t1, t2, t3 = (build_protocol(*data, CFG, seed=s) for s in (5, 5, 6))
    assert t1.rerank_lists.equals(t2.rerank_lists) and t1.sequences.equals(t2.sequences)
    assert not t1.rerank_lists.equals(t3.rerank_lists)


def test_split_users_is_seeded_and_keeps_every_split():
    users = [str(u) for u in range(100)]
    split = split_users(users, (0.8, 0.1, 0.1), seed=1)
    assert split == split_users(list(reversed(users)), (0.8, 0.1, 0.1), seed=1)  # input order does not matter
    counts = {s: list(split.values()).count(s) for s in S.SPLITS}
    assert counts == {"train": 80, "valid": 10, "test": 10}
    assert split != split_users(users, (0.8, 0.1, 0.1), seed=2)
    assert sorted(split_users(["a", "b", "c"], (0.8, 0.1, 0.1), seed=0).values()) == ["test", "train", "valid"]
    with pytest.raises(ValueError, match="at least 3 users"):
        split_users(["a", "b"], (0.8, 0.1, 0.1), seed=0)


def test_leave_one_out_holds_out_the_last_two():
    tables = build_protocol(*_tables(LENGTHS), CFG, seed=1)
    loo = {r[S.USER_ID]: r for r in tables.leave_one_out.to_pylist()}
    assert loo["a"][S.TEST_ITEM_ID] == "i14" and loo["a"][S.VALID_ITEM_ID] == "i13"
    assert loo["a"][S.TRAIN_ITEM_IDS] == [f"i{k}" for k in range(1, 13)]


def test_item_index_is_dense_and_one_based():
    tables = build_protocol(*_tables(LENGTHS), CFG, seed=1)
    assert tables.item_index.column(S.ITEM_IDX).to_pylist() == list(range(1, NUM_ITEMS + 1))


def test_max_train_users_leaves_valid_and_test_lists_untouched():
    data = _tables({f"u{k}": 12 + k % 7 for k in range(40)})
    full = build_protocol(*data, CFG, seed=3)
    few = build_protocol(*data, DataConfig(history_max=5, min_user_interactions=10, max_train_users=5), seed=3)
    assert few.stats["train/users"] == 5 and few.stats["train_users_left_out"] == full.stats["train/users"] - 5
    for split in ("valid", "test"):
        rows = [r for r in full.rerank_lists.to_pylist() if r[S.SPLIT] == split]
        assert rows and rows == [r for r in few.rerank_lists.to_pylist() if r[S.SPLIT] == split]
    kept = {r[S.USER_ID] for r in few.sequences.to_pylist() if r[S.SPLIT] == "train"}
    assert [r for r in few.rerank_lists.to_pylist() if r[S.SPLIT] == "train"] == [
        r for r in full.rerank_lists.to_pylist() if r[S.USER_ID] in kept
    ]


def test_item_prior_counts_train_users_only():
    """The item prior is the number of train users per item; no valid or test interaction can change it."""
    interactions, catalog = _tables(LENGTHS)
    tables = build_protocol(interactions, catalog, CFG, seed=1)
    split = {r[S.USER_ID]: r[S.SPLIT] for r in tables.sequences.to_pylist()}
    seqs = {r[S.USER_ID]: set(r[S.ITEM_IDS]) for r in tables.sequences.to_pylist()}
    count = dict(
        zip(tables.item_index.column(S.ITEM_ID).to_pylist(), tables.item_index.column(S.TRAIN_COUNT).to_pylist())
    )
    expected = {i: sum(i in seqs[u] for u in seqs if split[u] == "train") for i in count}
    assert count == expected and sum(count.values()) > 0
    # One more interaction of a valid and of a test user with an item no train user has: the counts stay as they are.
    held = [u for u in split if split[u] != "train"]
    unseen = next(i for i in count if all(i not in seqs[u] for u in seqs if split[u] == "train"))
    extra = pa.table(
        {
            S.USER_ID: held,
            S.ITEM_ID: [unseen] * len(held),
            S.RATING: [5.0] * len(held),
            S.TIMESTAMP: [9999] * len(held),
        },
        schema=S.INTERACTIONS,
    )
    again = build_protocol(pa.concat_tables([interactions, extra]), catalog, CFG, seed=1)
    assert again.item_index.column(S.TRAIN_COUNT).to_pylist() == tables.item_index.column(S.TRAIN_COUNT).to_pylist()
    # ...while the same interaction by a train user counts.
    train_user = next(u for u in split if split[u] == "train")
    extra = pa.table(
        {S.USER_ID: [train_user], S.ITEM_ID: [unseen], S.RATING: [5.0], S.TIMESTAMP: [9999]}, schema=S.INTERACTIONS
    )
    more = build_protocol(pa.concat_tables([interactions, extra]), catalog, CFG, seed=1)
    more_count = dict(
        zip(more.item_index.column(S.ITEM_ID).to_pylist(), more.item_index.column(S.TRAIN_COUNT).to_pylist())
    )
    assert more_count[unseen] == count[unseen] + 1


def test_item_prior_counts_train_users_that_max_train_users_leaves_out():
    tables = build_protocol(*_tables(LENGTHS), CFG, seed=1)
    capped = build_protocol(
        *_tables(LENGTHS), DataConfig(history_max=5, min_user_interactions=10, max_train_users=1), seed=1
    )
    assert capped.sequences.num_rows < tables.sequences.num_rows
    assert capped.item_index.column(S.TRAIN_COUNT).to_pylist() == tables.item_index.column(S.TRAIN_COUNT).to_pylist()
