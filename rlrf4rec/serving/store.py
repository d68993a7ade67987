"""A knowledge version's user texts and vectors as memory-mapped files: one copy per machine, not per replica.

The knowledge stage writes `knowledge/<version>/user_knowledge.parquet`. Serving needs it as a lookup, user id ->
(text, vector), in every Reranker replica. Loaded into each replica's heap, that is users x segments x 384 floats per
replica (24 KB a user with 16 segments: 24 GB at a million users, in every replica). Here the first replica on a
machine converts the version once into `<run>/serving/knowledge-<version>/`:

    users.npy     sorted user ids (fixed-width UTF-8), binary-searched
    rows.npy      int64: the table row of each sorted user id
    vectors.npy   float32 [U, D] or [U, S, D] (zero rows = padding), in table order
    texts.arrow   Arrow IPC file, one `knowledge_text` column, in table order

and every replica maps them read-only: the pages live once in the OS page cache, shared by all the replicas of the
machine, and only the users a replica actually serves are ever read from disk. The directory is published like a
stage (temp dir + rename, a marker whose fingerprint is the knowledge stage's), under a file lock so that replicas
starting together build it once; a rebuilt knowledge stage gets a new index.

The data stage's users get the same treatment in `<run>/serving/users/` (`UserIndex`): each user's stored history
window (item indices and ratings, what a request without a history is re-ranked and prompted with) and attributes,
instead of a dict of every user's window in every replica:

    users.npy, rows.npy   as above
    offsets.npy   int64 [U + 1]: user row r's window is items[offsets[r]:offsets[r + 1]]
    items.npy     int32 item indices (item_index.parquet's), windows concatenated in row order
    ratings.npy   float32, aligned with items.npy (NaN: no rating)
    attributes.arrow   age, gender, occupation and in_users_table per row (only when the data has a users table)

Pure: numpy and pyarrow, no Ray.
"""

from __future__ import annotations

import fcntl
import json
import logging
import mmap
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import Fingerprint, is_complete, publish, read_marker
from rlrf4rec.core.knowledge import segments_of, vectors_of
from rlrf4rec.core.layout import USER_KNOWLEDGE, data_table

log = logging.getLogger(__name__)

# Part of each index's fingerprint: a change of a layout rebuilds old indexes of that kind.
FORMATS = {"knowledge": "mmap-v1", "users": "users-v1"}
USERS, ROWS, VECTORS, TEXTS = "users.npy", "rows.npy", "vectors.npy", "texts.arrow"
OFFSETS, ITEMS, RATINGS, ATTRIBUTES = "offsets.npy", "items.npy", "ratings.npy", "attributes.arrow"
KNOWN = "in_users_table"  # attributes.arrow: false for a user the users table does not name
BATCH_ROWS = 8_192  # rows per read while building: 200 MB of 16-segment vectors at most


def _save_keys(ids: list[str], out: Path, source: Path, stage: str) -> None:
    """users.npy (sorted fixed-width UTF-8 ids) and rows.npy (each sorted id's row), refusing a repeated id."""
    if len(set(ids)) != len(ids):
        raise ValueError(f"{source} lists a user twice; re-run the {stage} stage")
    encoded = [u.encode() for u in ids]
    keys = np.array(encoded, dtype=f"S{max(map(len, encoded), default=1)}")
    order = np.argsort(keys, kind="stable")
    np.save(out / USERS, keys[order])
    np.save(out / ROWS, order.astype(np.int64))


def build_index(knowledge_file: Path, out: Path, batch_rows: int = BATCH_ROWS) -> dict:
    """user_knowledge.parquet -> the four files in `out` (an existing directory), reading the table in batches of
    `batch_rows`. Returns stats for the marker. `open_index` runs it in a child process: Arrow's reader keeps
    buffers it has decoded, which a replica would otherwise carry for its whole life."""
    parquet = pq.ParquetFile(knowledge_file)
    missing = set(S.USER_KNOWLEDGE.names) - set(parquet.schema_arrow.names)
    if missing:
        raise ValueError(f"{knowledge_file}: no column(s) {sorted(missing)}; re-run the knowledge stage")
    # Pass 1: ids, and the widest user's segment count (segments per user vary). The vectors are read in pass 2 only.
    ids, width, segmented = [], 0, None
    for batch in parquet.iter_batches(batch_rows, columns=[S.USER_ID, S.SEGMENTS]):
        ids.extend(batch.column(S.USER_ID).to_pylist())
        segments = batch.column(S.SEGMENTS)
        has = segments.null_count < len(batch)
        if segmented is not None and has != segmented or has and segments.null_count:
            raise ValueError(f"{knowledge_file} holds segments for some users only; re-run the knowledge stage")
        segmented = has
        if has:
            width = max(width, int(pc.max(pc.list_value_length(segments)).as_py() or 0))
    _save_keys(ids, out, knowledge_file, "knowledge")

    def vector_file(dim: int) -> np.memmap:
        shape = (len(ids), max(width, 1), dim) if segmented else (len(ids), dim)
        return np.lib.format.open_memmap(out / VECTORS, mode="w+", dtype=np.float32, shape=shape)

    # Pass 2: vectors and texts, batch by batch, in table order; the vector file is sized by the first batch's D.
    vectors, row = None, 0
    text_schema = pa.schema([S.USER_KNOWLEDGE.field(S.KNOWLEDGE_TEXT)])
    with pa.ipc.new_file(out / TEXTS, text_schema) as texts:
        for batch in parquet.iter_batches(batch_rows, columns=[S.KNOWLEDGE_TEXT, S.VECTOR, S.SEGMENTS]):
            n = len(batch)
            block = segments_of(batch.column(S.SEGMENTS)) if segmented else vectors_of(pa.Table.from_batches([batch]))
            if vectors is None:
                vectors = vector_file(block.shape[-1])
            if segmented:
                vectors[row : row + n, : block.shape[1]] = block  # a batch's widest user may be narrower than S
            else:
                vectors[row : row + n] = block
            texts.write_batch(pa.record_batch([batch.column(S.KNOWLEDGE_TEXT)], schema=text_schema))
            row += n
    if vectors is None:  # an empty table
        vectors = vector_file(0)
    shape = list(vectors.shape)
    vectors.flush()
    del vectors
    return {"users": len(ids), "vector_shape": shape, "format": FORMATS["knowledge"]}


def build_user_index(data_dir: Path, out: Path, batch_rows: int = BATCH_ROWS) -> dict:
    """The data stage in `data_dir` -> the user index files in `out`: every user's history window (the
    `item_ids[history_start:history_end]` of sequences.parquet, as item indices, with ratings) and attributes, plus
    the longest re-rank list (the length a re-ranker scores at once). Windows are cut without a Python loop per user."""
    item_index = pq.read_table(data_dir / data_table("item_index"), columns=[S.ITEM_ID, S.ITEM_IDX])
    item_idx = item_index.column(S.ITEM_IDX).to_numpy()
    sequences = pq.ParquetFile(data_dir / data_table("sequences"))
    columns = [S.USER_ID, S.ITEM_IDS, S.RATINGS, S.HISTORY_START, S.HISTORY_END]
    missing = set(columns) - set(sequences.schema_arrow.names)
    if missing:
        raise ValueError(f"{data_dir}: sequences has no column(s) {sorted(missing)}; re-run the data stage")
    ids: list[str] = []
    offsets, items, ratings, done = [np.zeros(1, np.int64)], [], [], 0
    for batch in sequences.iter_batches(batch_rows, columns=columns):
        lengths = pc.list_value_length(batch.column(S.ITEM_IDS)).to_numpy(zero_copy_only=False).astype(np.int64)
        rated = pc.list_value_length(batch.column(S.RATINGS)).to_numpy(zero_copy_only=False).astype(np.int64)
        start = batch.column(S.HISTORY_START).to_numpy().astype(np.int64)
        end = batch.column(S.HISTORY_END).to_numpy().astype(np.int64)
        bad = np.flatnonzero((start < 0) | (end < start) | (end > lengths) | (rated != lengths))
        if len(bad):
            user = batch.column(S.USER_ID)[int(bad[0])].as_py()
            raise ValueError(
                f"{data_dir}: sequences row of user {user!r} has history_start/history_end outside its item_ids "
                "(or ratings of another length); re-run the data stage"
            )
        counts = end - start
        first = np.concatenate([[0], np.cumsum(lengths)[:-1]]) + start  # each window's first position, flattened
        within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        positions = pa.array(np.repeat(first, counts) + within)
        window_ids = pc.list_flatten(batch.column(S.ITEM_IDS)).take(positions)
        found = pc.index_in(window_ids, value_set=item_index.column(S.ITEM_ID))
        if found.null_count:
            unknown = window_ids.filter(pc.is_null(found))[0].as_py()
            raise ValueError(
                f"{data_dir}: item {unknown!r} of a history window is not in item_index; re-run the data stage"
            )
        items.append(item_idx[found.to_numpy()].astype(np.int32))
        ratings.append(pc.list_flatten(batch.column(S.RATINGS)).take(positions).to_numpy(zero_copy_only=False))
        offsets.append(done + np.cumsum(counts))
        done += int(counts.sum())
        ids.extend(batch.column(S.USER_ID).to_pylist())
    users_file = data_dir / data_table("users")
    users = pq.read_table(users_file) if users_file.is_file() else None
    if users is not None:  # users with attributes but no sequence keep them, with an empty window
        known = set(ids)
        extra = [u for u in users.column(S.USER_ID).to_pylist() if u not in known]
        ids.extend(extra)
        offsets.append(np.full(len(extra), done, np.int64))
    _save_keys(ids, out, data_dir / data_table("sequences"), "data")
    np.save(out / OFFSETS, np.concatenate(offsets))
    np.save(out / ITEMS, np.concatenate(items) if items else np.zeros(0, np.int32))
    np.save(out / RATINGS, np.concatenate(ratings).astype(np.float32) if ratings else np.zeros(0, np.float32))
    if users is not None:
        rows = pc.index_in(pa.array(ids, pa.string()), value_set=users.column(S.USER_ID))
        attributes = users.select([S.AGE, S.GENDER, S.OCCUPATION]).take(rows).append_column(KNOWN, pc.is_valid(rows))
        with pa.ipc.new_file(out / ATTRIBUTES, attributes.schema) as writer:
            writer.write_table(attributes)
    list_len = 0
    lists = pq.ParquetFile(data_dir / data_table("rerank_lists"))
    for batch in lists.iter_batches(batch_rows, columns=[S.CANDIDATE_ITEMS]):
        list_len = max(list_len, int(pc.max(pc.list_value_length(batch.column(0))).as_py() or 0))
    return {"users": len(ids), "window_items": done, "list_len": list_len, "format": FORMATS["users"]}


BUILDERS = {
    "knowledge": lambda source, out, rows: build_index(source / USER_KNOWLEDGE, out, rows),
    "users": build_user_index,
}


def _build_in_child(kind: str, source_dir: Path, out: Path, batch_rows: int) -> dict:
    command = [sys.executable, "-m", __name__, kind, str(source_dir), str(out), str(batch_rows)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise RuntimeError(f"building the {kind} index of {source_dir} failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def open_index(source_dir: Path, index_dir: Path, batch_rows: int = BATCH_ROWS, kind: str = "knowledge") -> Path:
    """The index of the stage in `source_dir` (a knowledge stage, or with kind="users" the data stage), built into
    `index_dir` unless it is already there and current. Replicas that start together wait for the first one's
    build. Where the run directory is read-only, a private copy goes to a temporary directory (mapped the same way,
    but no longer shared)."""
    marker = read_marker(source_dir)
    if marker is None:
        raise FileNotFoundError(
            f"{source_dir} holds no complete {'data' if kind == 'users' else kind} stage; finish the run first"
        )
    fingerprint = Fingerprint(f"{kind} index", {}, {"source": marker["fingerprint"]}, {"format": FORMATS[kind]})
    if is_complete(index_dir, fingerprint):
        return index_dir
    try:
        index_dir.parent.mkdir(parents=True, exist_ok=True)
        lock = open(index_dir.parent / f".{index_dir.name}.lock", "w")
    except OSError as e:
        index_dir = Path(tempfile.mkdtemp(prefix="rlrf4rec-knowledge-")) / index_dir.name
        log.warning("cannot write the knowledge index under the run (%s); building a private one in %s", e, index_dir)
        lock = open(index_dir.parent / ".lock", "w")
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # Another replica may have built it while this one waited: then there is nothing to do.
        publish(
            index_dir,
            fingerprint,
            lambda tmp, stats: stats.update(_build_in_child(kind, source_dir, tmp, batch_rows)),
            None,
        )
    return index_dir


def _mapped(path: Path) -> np.ndarray:
    """A read-only map of an .npy file, for lookups of single users in no order (reading ahead would only fill
    this replica's memory)."""
    array = np.load(path, mmap_mode="r")
    if array.size:
        array._mmap.madvise(mmap.MADV_RANDOM)
    return array


class _Keys:
    """user id -> row, by binary search over the mapped sorted ids."""

    def __init__(self, index_dir: Path):
        self._users = np.load(index_dir / USERS, mmap_mode="r")
        self._rows = np.load(index_dir / ROWS, mmap_mode="r")

    def __len__(self) -> int:
        return len(self._users)

    def row(self, user_id: str) -> int | None:
        key = user_id.encode()
        if len(key) > self._users.dtype.itemsize or not len(self._users):
            return None
        i = int(np.searchsorted(self._users, key))
        return int(self._rows[i]) if i < len(self._users) and self._users[i] == key else None


class KnowledgeIndex(_Keys):
    """user id -> (knowledge text, vector) over an index directory, every file mapped read-only."""

    def __init__(self, index_dir: Path):
        super().__init__(index_dir)
        self._vectors = _mapped(index_dir / VECTORS)
        self._texts = pa.ipc.open_file(pa.memory_map(str(index_dir / TEXTS))).read_all().column(S.KNOWLEDGE_TEXT)

    def get(self, user_id: str) -> tuple[str, np.ndarray] | None:
        """The user's text and a private copy of their vector ([D] or [S, D]), or None for an unknown user."""
        row = self.row(user_id)
        if row is None:
            return None
        return self._texts[row].as_py(), np.array(self._vectors[row])


class UserIndex(_Keys):
    """user id -> stored history window (item indices, ratings) and attributes, over a `build_user_index`
    directory mapped read-only; `list_len` is the data's longest re-rank list."""

    def __init__(self, index_dir: Path):
        super().__init__(index_dir)
        self._offsets = np.load(index_dir / OFFSETS, mmap_mode="r")
        self._items, self._ratings = _mapped(index_dir / ITEMS), _mapped(index_dir / RATINGS)
        has_attributes = (index_dir / ATTRIBUTES).is_file()
        self._attributes = (
            pa.ipc.open_file(pa.memory_map(str(index_dir / ATTRIBUTES))).read_all() if has_attributes else None
        )
        self.list_len = int(read_marker(index_dir)["stats"]["list_len"])

    def window(self, user_id: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The user's stored window, oldest first: (item indices, ratings with NaN for none), private copies; None
        for an unknown user."""
        row = self.row(user_id)
        if row is None:
            return None
        lo, hi = int(self._offsets[row]), int(self._offsets[row + 1])
        return np.array(self._items[lo:hi]), np.array(self._ratings[lo:hi])

    def attributes(self, user_id: str) -> dict[str, object] | None:
        """{"age", "gender", "occupation"} as the prompts name them, or None (unknown user, or no users table)."""
        row = self.row(user_id) if self._attributes is not None else None
        if row is None or not self._attributes.column(KNOWN)[row].as_py():
            return None
        return {name: self._attributes.column(name)[row].as_py() for name in (S.AGE, S.GENDER, S.OCCUPATION)}


if __name__ == "__main__":  # open_index's child: python -m rlrf4rec.serving.store <kind> <source dir> <out> <rows>
    print(json.dumps(BUILDERS[sys.argv[1]](Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))))
