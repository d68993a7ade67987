"""The memory-mapped knowledge index that Serve replicas share: same answers as the Parquet table, built once,
rebuilt when the knowledge stage changes, bad tables refused."""

import multiprocessing

import numpy as np
import pyarrow as pa
import pytest

from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import MARKER, read_marker, read_table, stage_output, write_parquet
from rlrf4rec.core.knowledge import pad_segments, user_vectors
from rlrf4rec.core.layout import USER_KNOWLEDGE, data_table
from rlrf4rec.core.prompts import user_attributes
from rlrf4rec.serving import store as ST


def knowledge_table(num_users: int, *, segmented: bool, seed: int = 0, dim: int = 8) -> pa.Table:
    """Users with 1-5 segments each (ragged), ids of several lengths and scripts, texts with newlines."""
    rng = np.random.default_rng(seed)
    users = [f"u{i}" if i % 3 else f"user-{i:06d}-é" for i in range(num_users)]
    segments = [rng.normal(size=(rng.integers(1, 6), dim)).astype(np.float32) for _ in users]
    return pa.table(
        {
            S.USER_ID: users,
            S.KNOWLEDGE_TEXT: [f"Liked: film {i}\nDisliked: none" for i in range(num_users)],
            S.VECTOR: [s.mean(0).tolist() for s in segments],
            S.SEGMENTS: [s.tolist() for s in segments] if segmented else [None] * num_users,
        },
        schema=S.USER_KNOWLEDGE,
    )


def publish(knowledge_dir, table, fingerprint="k1"):
    with stage_output(knowledge_dir, fingerprint, None) as (tmp, _):
        write_parquet(table, tmp / USER_KNOWLEDGE, S.USER_KNOWLEDGE)


@pytest.mark.parametrize("segmented", [True, False])
def test_index_answers_what_the_table_holds(tmp_path, segmented):
    table = knowledge_table(50, segmented=segmented)
    publish(tmp_path / "knowledge", table)
    # Batches of 7 rows: several, and the widest segment count is not in the first one.
    index = ST.KnowledgeIndex(ST.open_index(tmp_path / "knowledge", tmp_path / "index", batch_rows=7))
    expected = user_vectors(table)
    assert len(index) == 50
    for row, (user, text) in enumerate(zip(table[S.USER_ID].to_pylist(), table[S.KNOWLEDGE_TEXT].to_pylist())):
        got_text, vector = index.get(user)
        assert got_text == text
        np.testing.assert_array_equal(vector, expected[row])
        assert vector.flags.writeable  # a private copy: a caller cannot write into the shared map
    if segmented:
        assert expected.shape[1] == 5  # padded to the widest user, zero rows after each user's last segment
        segments = [np.asarray(s, np.float32) for s in table[S.SEGMENTS].to_pylist()]
        np.testing.assert_array_equal(expected, pad_segments(segments))
    for unknown in ("u", "u1000", "user-000000-é-and-more-than-the-widest-id", ""):
        assert index.get(unknown) is None


def test_index_is_built_once_and_rebuilt_when_the_knowledge_changes(tmp_path):
    publish(tmp_path / "knowledge", knowledge_table(10, segmented=True))
    index_dir = ST.open_index(tmp_path / "knowledge", tmp_path / "index")
    built = read_marker(index_dir)["finished"]
    assert ST.open_index(tmp_path / "knowledge", tmp_path / "index") == index_dir
    assert read_marker(index_dir)["finished"] == built  # current: not rebuilt
    publish(tmp_path / "knowledge", knowledge_table(12, segmented=True, seed=1), fingerprint="k2")
    ST.open_index(tmp_path / "knowledge", tmp_path / "index")
    assert read_marker(index_dir)["stats"]["users"] == 12
    assert ST.KnowledgeIndex(index_dir).get("u11") is not None


def _open(args):
    knowledge_dir, index_dir = args
    index = ST.KnowledgeIndex(ST.open_index(knowledge_dir, index_dir))
    return read_marker(index_dir)["finished"], index.get("u1")[0]


def test_replicas_starting_together_build_one_index(tmp_path):
    publish(tmp_path / "knowledge", knowledge_table(2000, segmented=True))
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        results = pool.map(_open, [(tmp_path / "knowledge", tmp_path / "index")] * 3)
    assert len({finished for finished, _ in results}) == 1  # one build; the others waited and mapped it
    assert {text for _, text in results} == {"Liked: film 1\nDisliked: none"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".index.lock", "index", "knowledge"]  # no temp dirs left


def test_an_unwritable_run_gets_a_private_index(tmp_path):
    publish(tmp_path / "knowledge", knowledge_table(5, segmented=False))
    (tmp_path / "serving").write_text(
        ""
    )  # the index's parent cannot be made (as with a read-only mount, even for root)
    index_dir = ST.open_index(tmp_path / "knowledge", tmp_path / "serving" / "knowledge-base")
    assert not index_dir.is_relative_to(tmp_path) and index_dir.name == "knowledge-base"
    assert ST.KnowledgeIndex(index_dir).get("u1")[0] == "Liked: film 1\nDisliked: none"


def test_bad_knowledge_is_refused_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete knowledge stage"):
        ST.open_index(tmp_path / "missing", tmp_path / "index")
    table = knowledge_table(4, segmented=True)
    twice = pa.concat_tables([table, table.slice(0, 1)])
    publish(tmp_path / "knowledge", twice)
    with pytest.raises(RuntimeError, match="lists a user twice; re-run the knowledge stage"):
        ST.open_index(tmp_path / "knowledge", tmp_path / "index")
    assert not (tmp_path / "index").exists() and not list(tmp_path.glob("index.tmp-*"))  # nothing half-written
    mixed = pa.concat_tables([table, knowledge_table(3, segmented=False, seed=2).slice(1, 1)])
    publish(tmp_path / "knowledge", mixed, fingerprint="k2")
    with pytest.raises(RuntimeError, match="segments for some users only"):
        ST.open_index(tmp_path / "knowledge", tmp_path / "index")
    assert (tmp_path / "knowledge" / MARKER).is_file()  # the knowledge stage itself is untouched


def publish_data(data_dir, num_users, *, seed=0, users_table=True, bad_window=False):
    """A data stage by hand: sequences with windows of every length (0 included) inside longer item lists, ratings
    with gaps, a users table that also names users without a sequence, and re-rank lists up to 12 long."""
    rng = np.random.default_rng(seed)
    items = [f"i{k}" for k in range(40)]
    rows = []
    for u in range(num_users):
        n = int(rng.integers(1, 30))
        start = int(rng.integers(0, n))
        end = int(rng.integers(start, n + 1))
        ids = [items[k] for k in rng.integers(0, 40, n)]
        ratings = [None if rng.random() < 0.2 else float(rng.integers(1, 6)) for _ in range(n)]
        rows.append((f"u{u}" if u % 4 else f"user-{u}-é", ids, ratings, start, end))
    if bad_window:
        rows[-1] = (*rows[-1][:3], 0, len(rows[-1][1]) + 1)
    sequences = pa.table(
        {
            S.USER_ID: [r[0] for r in rows],
            S.SPLIT: ["train"] * num_users,
            S.ITEM_IDS: [r[1] for r in rows],
            S.RATINGS: [r[2] for r in rows],
            S.TIMESTAMPS: [list(range(len(r[1]))) for r in rows],
            S.HISTORY_START: [r[3] for r in rows],
            S.HISTORY_END: [r[4] for r in rows],
        },
        schema=S.SEQUENCES,
    )
    lists = pa.table(
        {
            S.USER_ID: ["u1", "u2"],
            S.SPLIT: ["train", "valid"],
            S.LIST_IDX: [0, 0],
            S.CANDIDATE_ITEMS: [items[:10], items[:12]],
            S.LABELS: [[1] * 10, [0] * 12],
        },
        schema=S.RERANK_LISTS,
    )
    index = pa.table(
        {S.ITEM_ID: items[::-1], S.ITEM_IDX: list(range(1, 41)), S.TRAIN_COUNT: [1] * 40}, schema=S.ITEM_INDEX
    )
    with stage_output(data_dir, f"d{seed}-{num_users}", None) as (tmp, _):
        write_parquet(sequences, tmp / data_table("sequences"), S.SEQUENCES)
        write_parquet(lists, tmp / data_table("rerank_lists"), S.RERANK_LISTS)
        write_parquet(index, tmp / data_table("item_index"), S.ITEM_INDEX)
        if users_table:
            ids = [r[0] for r in rows[::2]] + ["no-sequence"]
            users = pa.table(
                {
                    S.USER_ID: ids,
                    S.AGE: [20 + k for k in range(len(ids))],
                    S.GENDER: ["F", None] * (len(ids) // 2) + ["M"] * (len(ids) % 2),
                    S.OCCUPATION: ["writer"] * len(ids),
                },
                schema=S.USERS,
            )
            write_parquet(users, tmp / data_table("users"), S.USERS)
    return sequences, index


@pytest.mark.parametrize("users_table", [True, False])
def test_user_index_answers_what_the_data_stage_holds(tmp_path, users_table):
    sequences, item_index = publish_data(tmp_path / "data", 60, users_table=users_table)
    index = ST.UserIndex(ST.open_index(tmp_path / "data", tmp_path / "users", batch_rows=7, kind="users"))
    to_idx = dict(zip(item_index[S.ITEM_ID].to_pylist(), item_index[S.ITEM_IDX].to_pylist()))
    attributes = user_attributes(read_table(tmp_path / "data", "users")) if users_table else {}
    assert index.list_len == 12
    for r in sequences.to_pylist():
        lo, hi = r[S.HISTORY_START], r[S.HISTORY_END]
        items, ratings = index.window(r[S.USER_ID])
        assert items.tolist() == [to_idx[i] for i in r[S.ITEM_IDS][lo:hi]]
        expected = [np.nan if x is None else x for x in r[S.RATINGS][lo:hi]]
        np.testing.assert_array_equal(ratings, np.array(expected, np.float32))
        assert index.attributes(r[S.USER_ID]) == attributes.get(r[S.USER_ID])
    if users_table:  # a user with attributes and no sequence: an empty window, the attributes
        assert [len(a) for a in index.window("no-sequence")] == [0, 0]
        assert index.attributes("no-sequence") == {"age": 50, "gender": "M", "occupation": "writer"}
    for unknown in ("u", "u1000", "no-sequence-and-longer-than-any-id", ""):
        assert index.attributes(unknown) is None
        assert (index.window(unknown) is None) == (unknown != "no-sequence")


def test_user_index_refuses_bad_data_and_is_rebuilt_with_the_data(tmp_path):
    publish_data(tmp_path / "data", 10, bad_window=True)
    with pytest.raises(RuntimeError, match="outside its item_ids .* re-run the data stage"):
        ST.open_index(tmp_path / "data", tmp_path / "users", kind="users")
    assert not (tmp_path / "users").exists()
    publish_data(tmp_path / "data", 10, seed=1)
    assert ST.UserIndex(ST.open_index(tmp_path / "data", tmp_path / "users", kind="users")).window("u9") is not None
    publish_data(tmp_path / "data", 12, seed=2)  # a new data stage: a new index
    assert ST.UserIndex(ST.open_index(tmp_path / "data", tmp_path / "users", kind="users")).window("u11") is not None
