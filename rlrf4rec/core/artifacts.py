"""How stages write their outputs: a stage directory that appears whole or not at all.

A stage writes everything into `<run>/<stage>.tmp-<pid>/`; on success it adds the resolved config and a completion
marker (written last), then swaps the directory into place. A crash leaves the previous complete output untouched
and the temporary directory is discarded on the next attempt. The marker records the stage's fingerprint (a hash of
the config sections and upstream fingerprints it depends on), so a re-run with the same inputs is skipped, and every
output file's size, modification time and sha256: a stage whose files were since deleted, truncated or edited is not
complete (`damaged_files`), so the re-run rebuilds it, and `rlrf4rec verify` names it.
Knows nothing about what the tables contain beyond their schemas (schema.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rlrf4rec.core import schema as S
from rlrf4rec.core.assets import sha256_file
from rlrf4rec.core.layout import CONFIG, MARKER, RunLayout, data_table

log = logging.getLogger(__name__)


def digest(payload: object, length: int | None = 16) -> str:
    """The one fingerprint hash: sha256 of a string (or of a value's JSON, keys sorted), hex, cut to `length`.

    Stages build their fingerprints from config section hashes, upstream fingerprints and digests of what they
    read (texts, held-out users, dataset files); a different input gives a different fingerprint and a re-run."""
    text = payload if isinstance(payload, str) else json.dumps(payload, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


@dataclass(frozen=True)
class Fingerprint:
    """What a stage's output depends on, as a record: the stage, a hash of each config section it reads, its upstream
    stages' keys by name, and digests or values of whatever else it reads (texts, held-out users, dataset files).

    The key, a fixed-length digest of the record, is what the stage's marker holds and what a re-run compares; the
    marker keeps the record itself as `lineage`, so a key stays 32 characters however many rounds lie upstream and
    the lineage still names each upstream stage. `prefix` starts the key: outputs sharing it can reuse each other's
    rows (the generate stage's key of what one text depends on, before which users it holds)."""

    stage: str
    sections: Mapping[str, str] = field(default_factory=dict)
    upstream: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    prefix: str = ""

    def record(self) -> dict:
        return {
            "stage": self.stage,
            "sections": dict(self.sections),
            "upstream": dict(self.upstream),
            "extra": dict(self.extra),
        }

    @property
    def key(self) -> str:
        key = digest(self.record(), 32)
        return f"{self.prefix}-{key}" if self.prefix else key


def key_of(fingerprint: Fingerprint | str) -> str:
    """A stage's key: its fingerprint's, or a string given as the key itself (a stage made by hand, in a test or a
    benchmark, with no lineage to record)."""
    return fingerprint if isinstance(fingerprint, str) else fingerprint.key


def write_parquet(table: pa.Table, path: Path, schema: pa.Schema | None = None) -> None:
    """Write atomically (temp file + rename); cast to `schema` first so the columns are exactly the declared ones."""
    if schema is not None:
        table = table.select(schema.names).cast(schema)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_parquet(path: Path, schema: pa.Schema | None = None) -> pa.Table:
    if not path.is_file():
        raise FileNotFoundError(f"artifact not found: {path} (run the stage that writes it first)")
    table = pq.read_table(path)
    if schema is not None:
        missing = set(schema.names) - set(table.column_names)
        if missing:
            raise ValueError(
                f"{path} lacks columns {sorted(missing)}; it was written by another version, re-run its stage"
            )
        table = table.select(schema.names).cast(schema)
    return table


def read_tables(data_dir: Path, names: tuple[str, ...] = S.RERANK_TABLES) -> dict[str, pa.Table]:
    """The data stage's tables `names` from `data_dir` (`<run>/data`), each checked against schema.TABLES."""
    return {name: read_parquet(Path(data_dir) / data_table(name), S.TABLES[name]) for name in names}


def read_table(data_dir: Path, name: str) -> pa.Table:
    return read_tables(data_dir, (name,))[name]


def read_manifest(layout: RunLayout, rounds: int | None = None) -> dict | None:
    """The rounds manifest (None when no round finished yet); with `rounds`, an error unless that many are complete
    (what a stage reading every round's policy and recommender needs)."""
    if not layout.manifest.is_file():
        if rounds:
            raise FileNotFoundError(f"{layout.manifest} is missing: no round is complete; run `rlrf4rec loop` first")
        return None
    manifest = json.loads(layout.manifest.read_text())
    if rounds is not None and len(manifest["rounds"]) != rounds:
        raise ValueError(
            f"{len(manifest['rounds'])} of loop.rounds={rounds} rounds are complete; run `rlrf4rec loop` to finish "
            "them first"
        )
    return manifest


def write_json(obj: object, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_marker(stage_dir: Path) -> dict | None:
    marker = Path(stage_dir) / MARKER
    if not marker.is_file() and not restore_interrupted(Path(stage_dir)):
        return None
    return json.loads(marker.read_text())


def restore_interrupted(stage_dir: Path) -> bool:
    """Put back a complete stage that a publish moved aside (`<name>.old-<pid>`) and died before moving the new one
    in, so a crash between stage_output's two renames never loses the stage. True when one was restored."""
    if stage_dir.exists():
        return False
    aside = [p for p in stage_dir.parent.glob(f"{stage_dir.name}.old-*") if (p / MARKER).is_file()]
    if not aside:
        return False
    newest = max(aside, key=lambda p: (p / MARKER).stat().st_mtime)
    try:
        os.replace(newest, stage_dir)
    except OSError:  # another process restored or published it first
        return (stage_dir / MARKER).is_file()
    log.warning("%s: restored the complete stage an interrupted publish had moved aside (%s)", stage_dir, newest.name)
    return True


def require_marker(stage_dir: Path, command: str) -> dict:
    """The marker of a stage this one depends on, or an error naming the command that writes it."""
    marker = read_marker(Path(stage_dir))
    if marker is None:
        raise FileNotFoundError(f"{stage_dir} holds no complete stage output; run `rlrf4rec {command}` first")
    return marker


def model_identity(model: str) -> str:
    """A model written by a stage (e.g. `<run>/dpo/round0/model`) is identified by that stage's fingerprint, so
    outputs made from it go stale when it is retrained; other models (hub ids, embedded assets) by name only."""
    marker = read_marker(Path(model).parent) if Path(model).is_dir() else None
    return marker["fingerprint"] if marker else ""


def is_complete(stage_dir: Path, fingerprint: Fingerprint | str) -> bool:
    """The stage holds a marker with this fingerprint and every file the marker records, unchanged (the cheap check
    of `damaged_files`); a damaged stage is logged, naming its files, and reported incomplete so it is rebuilt."""
    marker = read_marker(stage_dir)
    if marker is None or marker.get("fingerprint") != key_of(fingerprint):
        return False
    damaged = damaged_files(Path(stage_dir), marker)
    if damaged:
        log.warning("%s: %s; rebuilding the stage", stage_dir, "; ".join(damaged))
    return not damaged


def file_records(stage_dir: Path) -> dict[str, list]:
    """Every file of a stage directory but its marker, by relative path: [size, mtime_ns, sha256]."""
    records = {}
    for path in sorted(Path(stage_dir).rglob("*")):
        if path.is_file() and path.name != MARKER:
            st = path.stat()
            records[str(path.relative_to(stage_dir))] = [st.st_size, st.st_mtime_ns, sha256_file(path)]
    return records


def damaged_files(stage_dir: Path, marker: dict | None = None, deep: bool = False) -> list[str]:
    """What differs between a complete stage's files and its marker's records, one line per file ("<path>:
    missing", "... <n> bytes, published with <m>", "... content differs from the published file").

    The cheap check (every skip): existence and size; a file whose modification time changed is hashed as well, so
    an edit that keeps the size is found and a mere copy or `touch` is not. `deep` hashes every file (`rlrf4rec
    verify`). A marker written before files were recorded has nothing to compare: no damage reported."""
    stage_dir = Path(stage_dir)
    marker = read_marker(stage_dir) if marker is None else marker
    damaged = []
    for rel, (size, mtime_ns, sha) in ((marker or {}).get("files") or {}).items():
        path = stage_dir / rel
        if not path.is_file():
            damaged.append(f"{path}: missing")
            continue
        st = path.stat()
        if st.st_size != size:
            damaged.append(f"{path}: {st.st_size} bytes, published with {size}")
        elif (deep or st.st_mtime_ns != mtime_ns) and sha256_file(path) != sha:
            damaged.append(f"{path}: content differs from the published file")
    return damaged


@contextmanager
def stage_output(
    stage_dir: Path, fingerprint: Fingerprint | str, config_yaml: str | None
) -> Iterator[tuple[Path, dict]]:
    """Yield (temporary directory, stats dict); on normal exit publish it atomically with marker and config
    (`config.yaml`; None for a stage that has no config of its own).

    The caller fills the directory with artifacts and the dict with stats worth keeping (they go in the marker).
    Publishing renames the old stage aside, the new one in, then deletes the old one; a process killed between the
    renames leaves the old complete stage aside, which the next reader or writer restores (`restore_interrupted`).
    """
    stage_dir = Path(stage_dir)
    stage_dir.parent.mkdir(parents=True, exist_ok=True)
    restore_interrupted(stage_dir)
    for stale in [*stage_dir.parent.glob(f"{stage_dir.name}.tmp-*"), *stage_dir.parent.glob(f"{stage_dir.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    tmp = stage_dir.with_name(f"{stage_dir.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    stats: dict = {}
    started = time.time()
    try:
        yield tmp, stats
        if config_yaml is not None:
            (tmp / CONFIG).write_text(config_yaml)
        write_json(
            {
                "fingerprint": key_of(fingerprint),
                **({"lineage": fingerprint.record()} if isinstance(fingerprint, Fingerprint) else {}),
                "stage": stage_dir.name,
                "started": started,
                "finished": time.time(),
                "stats": stats,
                "files": file_records(tmp),
            },
            tmp / MARKER,
        )
        old = stage_dir.with_name(f"{stage_dir.name}.old-{os.getpid()}")
        if stage_dir.exists():
            os.replace(stage_dir, old)
        os.replace(tmp, stage_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(
    stage_dir: Path,
    fingerprint: Fingerprint,
    build: Callable[[Path, dict], object],
    config_yaml: str | None,
    *,
    force: bool = False,
) -> Path:
    """The stage protocol, once for every stage: skip when `stage_dir` is complete for `fingerprint` (unless
    `force`), else `build(tmp, stats)` fills a temporary directory and the stats, published atomically with the
    marker (stage_output). Returns the stage directory."""
    stage_dir = Path(stage_dir)
    if not force and is_complete(stage_dir, fingerprint):
        log.info("%s: complete output matches its inputs; nothing to do", stage_dir)
        return stage_dir
    with stage_output(stage_dir, fingerprint, config_yaml) as (tmp, stats):
        build(tmp, stats)
    log.info("%s: published", stage_dir)
    return stage_dir


def damaged_stages(root: Path) -> dict[str, list[str]]:
    """Every complete stage under a run directory, deep-checked (every file hashed): run-relative stage name ->
    its damaged files (`rlrf4rec verify`). Leftovers of an interrupted publish (`.tmp-`, `.old-`) are not stages."""
    root = Path(root)
    found = {}
    for marker in sorted(root.rglob(MARKER)):
        rel = marker.parent.relative_to(root)
        if any(".tmp-" in part or ".old-" in part for part in rel.parts):
            continue
        found[str(rel)] = damaged_files(marker.parent, json.loads(marker.read_text()), deep=True)
    return found


class RunLockedError(RuntimeError):
    """Another process is writing the run directory and this one was told not to wait."""


@contextmanager
def writer_lock(root: Path, command: str, wait: bool = True) -> Iterator[None]:
    """Hold the run directory's one-writer lock (an advisory `flock` on `<run>/.writer.lock`) for the block.

    Every command that writes a run takes it (`rlrf4rec run`, each stage, a submitted job); readers (report, serve,
    verify) never do. A second writer waits, saying for whom, or with `wait=False` raises RunLockedError naming the
    holder. The lock dies with its process, so a killed run never leaves the directory locked."""
    path = RunLayout(Path(root)).writer_lock
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            if not wait:
                raise RunLockedError(
                    f"{root} is being written by {holder}; wait for it to finish, or run with --lock=wait to queue "
                    "behind it"
                ) from None
            log.warning("%s is being written by %s; waiting for it to finish", root, holder)
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} (rlrf4rec {command}, since {time.strftime('%H:%M:%S')})")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)
