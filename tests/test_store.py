"""The memory-mapped knowledge index that Serve replicas share: same answers as the Parquet table, built once,
rebuilt when the knowledge stage changes, bad tables refused."""

import multiprocessing

import numpy as np
import pyarrow as pa
import pytest

from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import MARKER, read_marker, stage_output, write_parquet
from rlrf4rec.core.layout import USER_KNOWLEDGE
from rlrf4rec.serving import store as ST
from rlrf4rec.stages.encode import pad_segments, user_vectors


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
