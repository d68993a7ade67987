"""Serving knowledge at scale: the memory-mapped index every replica shares vs each replica's own heap copy.

    python benchmarks/knowledge_store.py [--sizes 943,100000,1000000] [--segments 0,16] [--lookups 10000]

For each size (users) and layout (0: one 384-d vector per user; 16: up to 16 segment vectors, the default model's),
a synthetic user_knowledge.parquet (schema.USER_KNOWLEDGE, random unit vectors, ~120-character texts) is written,
then in fresh processes, side by side:

- heap (the baseline, what each Reranker replica did before): the table read into memory, vectors padded into one
  array, a dict of user rows, a list of texts;
- mmap (rlrf4rec.serving.store): the first replica builds the index (timed), each replica maps it.

Per replica: seconds to be ready, resident memory added (RSS) and its proportional share (PSS: pages shared with
other processes counted 1/n), and the latency of `get` over random users. Two replicas are run at once on one
machine, each looking up its own random users, to show what sharing saves. Sizes whose heap copy would not fit in
this machine's memory twice are run for mmap only. Appends one section to RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, append_section, load, machine, process_memory  # noqa: E402

DIM = 384


def write_table(path: Path, users: int, segments: int, seed: int = 0) -> None:
    """A synthetic knowledge table in batches (a million users with 16 segments does not fit in memory twice)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rlrf4rec.core import schema as S

    rng = np.random.default_rng(seed)
    with pq.ParquetWriter(path, S.USER_KNOWLEDGE) as writer:
        for lo in range(0, users, 20_000):
            n = min(20_000, users - lo)
            vectors = rng.standard_normal((n, DIM), dtype=np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            vector = pa.ListArray.from_arrays(np.arange(n + 1, dtype=np.int32) * DIM, pa.array(vectors.ravel()))
            if segments:
                counts = rng.integers(segments // 2, segments + 1, n)
                offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
                seg = rng.standard_normal((int(offsets[-1]), DIM), dtype=np.float32)
                inner = pa.ListArray.from_arrays(np.arange(len(seg) + 1, dtype=np.int32) * DIM, pa.array(seg.ravel()))
                segs = pa.ListArray.from_arrays(offsets, inner)
            else:
                segs = pa.nulls(n, S.USER_KNOWLEDGE.field(S.SEGMENTS).type)
            ids = pa.array([f"user{lo + i:08d}" for i in range(n)])
            texts = pa.array(
                [f"Preferences of user {lo + i}: likes slow dramas, dislikes loud action." * 2 for i in range(n)]
            )
            writer.write_table(pa.Table.from_arrays([ids, texts, vector, segs], schema=S.USER_KNOWLEDGE))


def replica(mode: str, knowledge_dir: Path, index_dir: Path, users: int, lookups: int, seed: int, hold_s: float):
    """One replica's life: load, look up random users, report; then hold its memory for `hold_s` (so that two
    replicas overlap while the other measures)."""
    import pyarrow.parquet as pq

    from rlrf4rec.core import schema as S
    from rlrf4rec.core.knowledge import user_vectors
    from rlrf4rec.core.layout import USER_KNOWLEDGE
    from rlrf4rec.serving import store

    anon0, file0, pss0 = process_memory()
    started = time.perf_counter()
    if mode == "heap":
        table = pq.read_table(knowledge_dir / USER_KNOWLEDGE)
        rows = {u: i for i, u in enumerate(table.column(S.USER_ID).to_pylist())}
        texts = table.column(S.KNOWLEDGE_TEXT).to_pylist()
        vectors = user_vectors(table)
        del table

        def get(user):
            row = rows.get(user)
            return None if row is None else (texts[row], vectors[row])
    else:
        index = store.KnowledgeIndex(store.open_index(knowledge_dir, index_dir))
        get = index.get
    ready = time.perf_counter() - started
    anon1, _, _ = process_memory()
    rng = np.random.default_rng(seed)
    wanted = [f"user{u:08d}" for u in rng.integers(0, users, lookups)]
    times = np.empty(lookups)
    for i, user in enumerate(wanted):
        t = time.perf_counter()
        found = get(user)
        times[i] = time.perf_counter() - t
        assert found is not None and found[0].startswith("Preferences of user")
    anon2, file2, pss2 = process_memory()
    time.sleep(hold_s)
    return {
        "ready_s": ready,
        "anon_loaded_mib": anon1 - anon0,
        "anon_mib": anon2 - anon0,
        "file_mib": file2 - file0,
        "pss_mib": pss2 - pss0,
        "p50_us": float(np.percentile(times, 50) * 1e6),
        "p99_us": float(np.percentile(times, 99) * 1e6),
    }


def spawn(args: argparse.Namespace, mode: str, work: Path, users: int, seed: int, hold_s: float):
    command = [sys.executable, __file__, "--replica", mode, "--work", str(work), "--users", str(users)]
    command += ["--seed", str(seed), "--hold-s", str(hold_s), "--lookups", str(args.lookups)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def result(proc) -> dict:
    out, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"replica failed ({proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="943,100000,1000000")
    parser.add_argument("--segments", default="0,16")
    parser.add_argument("--lookups", type=int, default=10_000)
    parser.add_argument("--work", default="/tmp/rlrf4rec-knowledge-store")
    parser.add_argument(
        "--max-segmented-users",
        type=int,
        default=100_000,
        help="larger sizes run with one vector a user only (16 segments: 24 KB a user on disk, twice)",
    )
    parser.add_argument("--max-heap-gib", type=float, default=6.0, help="skip the heap baseline above this size")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--replica", help=argparse.SUPPRESS)
    parser.add_argument("--users", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--hold-s", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.replica:
        work = Path(args.work)
        print(json.dumps(replica(args.replica, work / "knowledge", work / "index", args.users, args.lookups,
                                 args.seed, args.hold_s)))  # fmt: skip
        return

    from rlrf4rec.core.artifacts import stage_output
    from rlrf4rec.core.layout import USER_KNOWLEDGE

    before = load()
    rows = []
    for segments in map(int, args.segments.split(",")):
        for users in map(int, args.sizes.split(",")):
            if segments and users > args.max_segmented_users:
                continue
            work = Path(args.work) / f"{users}-{segments}"
            shutil.rmtree(work, ignore_errors=True)
            (work / "knowledge").mkdir(parents=True)
            started = time.perf_counter()
            with stage_output(work / "knowledge", f"synthetic-{users}-{segments}", None) as (tmp, _):
                write_table(tmp / USER_KNOWLEDGE, users, segments)
            written = time.perf_counter() - started
            size_gib = (work / "knowledge" / USER_KNOWLEDGE).stat().st_size / 2**30
            vector_gib = users * max(segments, 1) * DIM * 4 / 2**30
            print(
                f"{users} users x {segments} segments: table {size_gib:.2f} GiB written in {written:.0f} s", flush=True
            )
            row = {"users": users, "segments": segments, "table_gib": size_gib, "vector_gib": vector_gib}
            # mmap: the first replica builds the index; then two replicas at once map it.
            row["mmap_first"] = result(spawn(args, "mmap", work, users, 1, 0.0))
            pair = [spawn(args, "mmap", work, users, seed, 5.0) for seed in (2, 3)]
            row["mmap_two"] = [result(p) for p in pair]
            if vector_gib * 2 <= args.max_heap_gib:
                pair = [spawn(args, "heap", work, users, seed, 5.0) for seed in (2, 3)]
                row["heap_two"] = [result(p) for p in pair]
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(work, ignore_errors=True)

    def cell(r: dict) -> str:
        return (
            f"{r['anon_mib']:,.0f} / {r['file_mib']:,.0f} / {r['pss_mib']:,.0f} | {r['p50_us']:.0f} / {r['p99_us']:.0f}"
        )

    lines = [
        f"- Machine: {machine()}; load average before {before}, after {load()}.",
        f"- Work: synthetic user_knowledge.parquet of N users x 384-d float32 (segments 0: one vector; 16: 8-16 "
        f"segment vectors a user, padded to 16), ~120-character texts; each replica a fresh process looking up "
        f"{args.lookups:,} random users. Two replicas run at once; their figures are listed as first / second.",
        "- Memory, MiB added by the replica: own (anonymous: heap, not shareable) / file pages it maps (the page "
        "cache's copy of the index: one per machine, shared by every replica, reclaimable; the kernel maps whole "
        "large folios, so this overstates what a lookup reads) / PSS (a page shared by n processes counted 1/n). "
        "Latency: one `get`, p50 / p99 in microseconds.",
        "",
        "| users | segments | vectors GiB | store | ready | replica 1 own / mapped / PSS MiB | p50 / p99 us "
        "| replica 2 own / mapped / PSS MiB | p50 / p99 us |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['users']:,} | {r['segments']} | {r['vector_gib']:.2f}"
        first = r["mmap_first"]
        lines.append(f"{head} | mmap, first replica (builds) | {first['ready_s']:.1f} s | {cell(first)} | | |")
        for name in ("mmap_two", "heap_two"):
            if name in r:
                a, b = r[name]
                label = "mmap, two replicas" if name == "mmap_two" else "heap copy per replica (before), two replicas"
                lines.append(
                    f"{head} | {label} | {a['ready_s']:.2f} s / {b['ready_s']:.2f} s | {cell(a)} | {cell(b)} |"
                )
            elif name == "heap_two":
                lines.append(f"{head} | heap copy per replica (before) | not run: {r['vector_gib']:.1f} GiB a "
                             f"replica, over --max-heap-gib {args.max_heap_gib:g} for two | | | | |")  # fmt: skip
    for r in rows:
        if "heap_two" in r:
            heap = sum(x["anon_mib"] for x in r["heap_two"])
            mmap = sum(x["anon_mib"] for x in r["mmap_two"])
            lines.append(f"- {r['users']:,} users, {r['segments']} segments: two replicas' own memory, mmap / heap: "
                         f"{mmap:,.0f} / {heap:,.0f} MiB = {mmap / heap:.3f}x")  # fmt: skip
    append_section("knowledge for serving: memory-mapped index shared by replicas vs a heap copy per replica "
                   "(benchmarks/knowledge_store.py)", lines, Path(args.results))  # fmt: skip


if __name__ == "__main__":
    main()
