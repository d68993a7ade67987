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
starting together build it once; a rebuilt knowledge stage gets a new index. Pure: numpy and pyarrow, no Ray.
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
from rlrf4rec.core.artifacts import is_complete, read_marker, stage_output
from rlrf4rec.core.layout import USER_KNOWLEDGE
from rlrf4rec.stages.encode import segments_of, vectors_of

log = logging.getLogger(__name__)

FORMAT = "mmap-v1"  # part of the index's fingerprint: a change of this layout rebuilds old indexes
USERS, ROWS, VECTORS, TEXTS = "users.npy", "rows.npy", "vectors.npy", "texts.arrow"
BATCH_ROWS = 8_192  # rows per read while building: 200 MB of 16-segment vectors at most


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
    if len(set(ids)) != len(ids):
        raise ValueError(f"{knowledge_file} lists a user twice; re-run the knowledge stage")
    encoded = [u.encode() for u in ids]
    keys = np.array(encoded, dtype=f"S{max(map(len, encoded), default=1)}")
    order = np.argsort(keys, kind="stable")
    np.save(out / USERS, keys[order])
    np.save(out / ROWS, order.astype(np.int64))

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
    return {"users": len(ids), "vector_shape": shape, "format": FORMAT}


def _build_in_child(knowledge_file: Path, out: Path, batch_rows: int) -> dict:
    command = [sys.executable, "-m", __name__, str(knowledge_file), str(out), str(batch_rows)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise RuntimeError(f"building the knowledge index of {knowledge_file} failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def open_index(knowledge_dir: Path, index_dir: Path, batch_rows: int = BATCH_ROWS) -> Path:
    """The index of the knowledge stage in `knowledge_dir`, built into `index_dir` unless it is already there and
    current. Replicas that start together wait for the first one's build. Where the run directory is read-only,
    a private copy goes to a temporary directory (mapped the same way, but no longer shared)."""
    marker = read_marker(knowledge_dir)
    if marker is None:
        raise FileNotFoundError(f"{knowledge_dir} holds no complete knowledge stage; finish the run first")
    fingerprint = f"{marker['fingerprint']}-{FORMAT}"
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
        if not is_complete(index_dir, fingerprint):  # another replica may have built it while this one waited
            log.info("building the memory-mapped knowledge index %s", index_dir)
            with stage_output(index_dir, fingerprint, None) as (tmp, stats):
                stats.update(_build_in_child(knowledge_dir / USER_KNOWLEDGE, tmp, batch_rows))
    return index_dir


class KnowledgeIndex:
    """user id -> (knowledge text, vector) over an index directory, every file mapped read-only."""

    def __init__(self, index_dir: Path):
        self._users = np.load(index_dir / USERS, mmap_mode="r")
        self._rows = np.load(index_dir / ROWS, mmap_mode="r")
        self._vectors = np.load(index_dir / VECTORS, mmap_mode="r")
        # One user's vectors per lookup, users in no order: reading ahead would only fill this replica's memory.
        self._vectors._mmap.madvise(mmap.MADV_RANDOM)
        self._texts = pa.ipc.open_file(pa.memory_map(str(index_dir / TEXTS))).read_all().column(S.KNOWLEDGE_TEXT)

    def __len__(self) -> int:
        return len(self._users)

    def row(self, user_id: str) -> int | None:
        key = user_id.encode()
        if len(key) > self._users.dtype.itemsize or not len(self._users):
            return None
        i = int(np.searchsorted(self._users, key))
        return int(self._rows[i]) if i < len(self._users) and self._users[i] == key else None

    def get(self, user_id: str) -> tuple[str, np.ndarray] | None:
        """The user's text and a private copy of their vector ([D] or [S, D]), or None for an unknown user."""
        row = self.row(user_id)
        if row is None:
            return None
        return self._texts[row].as_py(), np.array(self._vectors[row])


if __name__ == "__main__":  # open_index's child: python -m rlrf4rec.serving.store <parquet> <out dir> <batch rows>
    print(json.dumps(build_index(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))))
