"""Load test of the Serve application: knowledge path vs ID-only path, side by side (target: p99 <= 30 ms at
50 requests/s, 100 candidates per request, precomputed knowledge, 0 errors).

    .venv/bin/python benchmarks/serve_load.py [--run-dir runs/ml100k-cpu] [--rate 50] [--seconds 30]
                                              [--ingress haproxy|proxy [--throughput-optimized]]
                                              [--synthetic-users 1000000 [--synthetic-dir DIR]]
                                              [--kill-replica-at 10 [--kill-window 10] [--replicas 1,2]]

With --synthetic-users N, the same load runs twice, first on the run itself and then on a synthetic run of N users
made from it (`synthetic_run`: user i is a copy of the run's user i mod U, with that user's history window,
attributes and base knowledge text, and the first segment vector of its knowledge), and the table puts the two side
by side, with each deployment's replica memory read from /proc (owned, mapped page cache, PSS) and the seconds until
the first answer. That is what serving a million users costs a replica, next to the run's own few hundred.

Deploys serve_config.yaml as shipped (`serve run`, its own local Ray on 127.0.0.1, only run_dir and port changed;
by default with Serve's HAProxy ingress, as `rlrf4rec serve --ingress haproxy` starts it), then sends an
open-loop stream at a fixed rate: request i leaves at start + i / rate whether or not earlier ones have returned,
so a slow server shows up as latency instead of a slower client (bounded by --max-in-flight).
Knowledge path: known users. ID-only path: no user id, a random recent history -> the fallback re-ranker.
The two phases alternate (--rounds) so both see the same machine load. Needs a finished run directory.

With --kill-replica-at S, availability instead: known users' requests for --seconds (40 beside the recorded figure),
first with one Reranker replica, then with two, and at S seconds into the load one replica's process (its PID from
Ray's state API) gets SIGKILL. Reported per replica count: errors, p99 and max latency of the requests sent in the
--kill-window seconds from the kill, the longest time with no request answered, when Serve ran a replacement, and
each replica's memory before the kill; then one line puts one replica and two side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from common import append_section, machine, process_memory

from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import read_marker, stage_output
from rlrf4rec.core.layout import CONFIG, USER_KNOWLEDGE, RunLayout, data_table
from rlrf4rec.serving.launch import SERVE_HAPROXY_ENV

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    run_dir: Path, port: int, workdir: Path, ingress: str, throughput_optimized: bool, replicas: int | None = None
) -> subprocess.Popen:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = port
    config["applications"][0]["args"]["run_dir"] = str(run_dir.resolve())
    if replicas is not None:  # a fixed number of Reranker replicas instead of the shipped autoscaling range
        (reranker,) = (d for d in config["applications"][0]["deployments"] if d["name"] == "Reranker")
        reranker.pop("autoscaling_config")
        reranker["num_replicas"] = replicas
    path = workdir / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    if ingress == "haproxy":  # what `rlrf4rec serve --ingress haproxy` sets
        env.update(SERVE_HAPROXY_ENV)
    elif throughput_optimized:  # Serve's low-overhead settings, requests still through the Python proxy
        env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "serve"), "run", str(path)],
        env=env,
        start_new_session=True,
        stdout=open(workdir / "serve.log", "w"),
        stderr=subprocess.STDOUT,
    )


def synthetic_run(run_dir: Path, users: int, out: Path, batch: int = 50_000) -> Path:
    """A run directory of `users` users made from `run_dir`'s base version (see the module docstring): the data
    stage (sequences = history windows only, users, and the run's items and lists), knowledge/base, and the run's
    recommender/id and recommender/base linked. Built once per (run, users); reused while its markers match."""
    src, dst = RunLayout(run_dir), RunLayout(out)
    fingerprint = (
        f"synthetic-{users}-{read_marker(src.data)['fingerprint']}-{read_marker(src.knowledge('base'))['fingerprint']}"
    )
    if (read_marker(dst.knowledge("base")) or {}).get("fingerprint") == fingerprint:
        return out
    seq = pq.read_table(src.data / data_table("sequences"))
    lo, hi = seq.column(S.HISTORY_START).to_numpy(), seq.column(S.HISTORY_END).to_numpy()

    def window(column: str) -> pa.Array:
        values = seq.column(column).to_pylist()
        return pa.array([v[a:b] for v, a, b in zip(values, lo, hi)], S.SEQUENCES.field(column).type)

    windows = pa.table(
        {
            S.ITEM_IDS: window(S.ITEM_IDS),
            S.RATINGS: window(S.RATINGS),
            S.TIMESTAMPS: window(S.TIMESTAMPS),
            S.HISTORY_START: pa.array(np.zeros(len(lo), np.int32)),
            S.HISTORY_END: pa.array((hi - lo).astype(np.int32)),
        }
    )
    source_users = seq.column(S.USER_ID).to_pylist()
    attributes = pq.read_table(src.data / data_table("users")) if (src.data / data_table("users")).is_file() else None
    attribute_row = (
        pc.index_in(pa.array(source_users), value_set=attributes.column(S.USER_ID)) if attributes is not None else None
    )
    knowledge = pq.read_table(src.knowledge("base") / USER_KNOWLEDGE)
    knowledge_row = pc.index_in(pa.array(source_users), value_set=knowledge.column(S.USER_ID))
    config = (src.data / CONFIG).read_text()
    with stage_output(dst.data, fingerprint, config) as (tmp, stats):
        for name in ("item_index", "items", "rerank_lists", "leave_one_out"):
            (tmp / data_table(name)).write_bytes((src.data / data_table(name)).read_bytes())
        seq_writer = pq.ParquetWriter(tmp / data_table("sequences"), S.SEQUENCES)
        users_writer = pq.ParquetWriter(tmp / data_table("users"), S.USERS) if attributes is not None else None
        for start in range(0, users, batch):
            n = min(batch, users - start)
            of = pa.array(np.arange(start, start + n) % len(source_users))
            ids = pa.array([f"s{i:07d}" for i in range(start, start + n)])
            rows = windows.take(of)
            seq_writer.write_table(
                pa.table(
                    {
                        S.USER_ID: ids,
                        S.SPLIT: pa.array(["train"] * n),
                        **{c: rows.column(c) for c in rows.column_names},
                    },
                    schema=S.SEQUENCES,
                )
            )
            if users_writer is not None:
                picked = attributes.take(attribute_row.take(of)).set_column(0, S.USER_ID, ids)
                users_writer.write_table(picked.filter(pc.is_valid(attribute_row.take(of))).cast(S.USERS))
        seq_writer.close()
        if users_writer is not None:
            users_writer.close()
        stats["users"] = users
    with stage_output(dst.knowledge("base"), fingerprint, None) as (tmp, stats):
        with pq.ParquetWriter(tmp / USER_KNOWLEDGE, S.USER_KNOWLEDGE) as writer:
            for start in range(0, users, batch):
                n = min(batch, users - start)
                of = knowledge_row.take(pa.array(np.arange(start, start + n) % len(source_users)))
                rows = knowledge.take(of)
                segments = rows.column(S.SEGMENTS)
                if segments.null_count < len(rows):  # a segmented model: each user's first segment only
                    first = pc.list_slice(segments, 0, 1)
                    rows = rows.set_column(3, S.SEGMENTS, first).set_column(2, S.VECTOR, pc.list_flatten(first))
                ids = pa.array([f"s{i:07d}" for i in range(start, start + n)])
                writer.write_table(rows.set_column(0, S.USER_ID, ids).cast(S.USER_KNOWLEDGE))
        stats["users"] = users
    for version in ("id", "base"):
        link = dst.recommender(version)
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(src.recommender(version).resolve(), target_is_directory=True)
    return out


def replica_memory() -> dict[str, list[tuple[float, float, float]]]:
    """deployment -> (owned, mapped file, PSS) MiB of each of its replica processes on this machine."""
    out: dict[str, list] = {}
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode()
            if title.startswith("ray::ServeReplica:"):
                out.setdefault(title.split(":")[-1], []).append(process_memory(proc.name))
        except (OSError, UnicodeDecodeError):
            continue
    return out


def _session(sid: int) -> list[int]:
    """Every process of session `sid` (what `serve run` started, in whatever process group)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
            except ProcessLookupError:
                continue
    return pids


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)  # `serve run` shuts the application and its local Ray down
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # `serve run` leaves Serve's HAProxy running (it has a process group of its own), holding its ports.
    deadline = time.monotonic() + 30
    while _session(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in _session(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class _Client:
    """A minimal HTTP/1.1 keep-alive client for POST /rank: a few microseconds of CPU per request where httpx spends
    ~3.7 ms, which on a 2-core box is taken from the server under test."""

    def __init__(self, port: int, timeout_s: float = 10.0):
        self.port, self.timeout_s = port, timeout_s
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        return await asyncio.wait_for(self._post(path, body), self.timeout_s)

    async def _post(self, path: str, body: bytes) -> tuple[int, bytes]:
        reader, writer = self.idle.pop() if self.idle else await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(
                b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                % (path.encode(), len(body))
                + body
            )
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
            if "content-length" not in headers:
                raise RuntimeError(f"response without content-length ({headers}); this client reads only those")
            data = await reader.readexactly(int(headers["content-length"]))
        except BaseException:
            writer.close()
            raise
        if headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            self.idle.append((reader, writer))
        return int(head[0].split()[1]), data

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


async def phase(port: int, bodies: list[dict], rate: float, max_in_flight: int) -> dict:
    """Send `bodies` open loop at `rate`/s; latency per request (ms) and status counts.

    The client's garbage collector is off while it sends: a full collection of this process stalls its event loop
    for ~45 ms, which the requests in flight would count as server latency (it did, once per phase, before).
    """
    payloads = [json.dumps(b).encode() for b in bodies]
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        return await _phase(port, payloads, rate, max_in_flight)
    finally:
        gc.enable()
        gc.unfreeze()


async def _phase(port: int, payloads: list[bytes], rate: float, max_in_flight: int) -> dict:
    latencies, codes, paths, events = [], {}, {}, []
    in_flight = 0
    client = _Client(port)

    async def one(payload: bytes) -> None:
        nonlocal in_flight
        in_flight += 1
        start = time.perf_counter()
        try:
            code, data = await client.post("/rank", payload)
            if code == 200:
                latencies.append((time.perf_counter() - start) * 1000)
                body = json.loads(data)
                path = body["path"] if body["path"] == "knowledge" else f"fallback/{body['fallback_reason']}"
                paths[path] = paths.get(path, 0) + 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ValueError,
                RuntimeError) as e:  # fmt: skip
            code = type(e).__name__
        finally:
            in_flight -= 1
        codes[code] = codes.get(code, 0) + 1
        events.append((start - t0, time.perf_counter() - t0, code))

    tasks, t0 = [], time.perf_counter()
    try:
        for i, payload in enumerate(payloads):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if in_flight >= max_in_flight:
                codes["dropped by client"] = codes.get("dropped by client", 0) + 1
                events.append((time.perf_counter() - t0,) * 2 + ("dropped by client",))
                continue
            tasks.append(asyncio.create_task(one(payload)))
        await asyncio.gather(*tasks)
    finally:
        client.close()
    elapsed = time.perf_counter() - t0
    # events: (sent, done) seconds after t0 and the status (exception name, or dropped) of each request
    return {"latencies": latencies, "codes": codes, "paths": paths, "seconds": elapsed, "events": events, "t0": t0}


@contextlib.contextmanager
def serving(run_dir: Path, args: argparse.Namespace, probe: dict, replicas: int | None = None):
    """Start the application on `run_dir` and wait for its first answer; yields (port, seconds until that answer,
    the local cluster's dashboard address); stops it on exit."""
    workdir = Path(tempfile.mkdtemp(prefix="serve-load-"))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    proc = start_server(run_dir, port, workdir, args.ingress, args.throughput_optimized, replicas)
    try:
        deadline = time.monotonic() + 900
        while True:
            try:
                if httpx.post(f"{url}/rank", json=probe, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the application did not come up; see {workdir / 'serve.log'}")
            time.sleep(1)
        ready_s = time.monotonic() - started
        log = re.sub(r"\x1b\[[0-9;]*m", "", (workdir / "serve.log").read_text())
        dashboard = re.search(r"View the dashboard at (\S+)", log)
        yield port, ready_s, (dashboard and dashboard[1].removeprefix("http://"))
    finally:
        stop_server(proc)


def load_run(run_dir: Path, args: argparse.Namespace, rng: np.random.Generator) -> dict:
    """Start the application on `run_dir`, send the alternating phases, read the replicas' memory, stop it."""
    items = pq.read_table(run_dir / "data" / "item_index.parquet").column("item_id").to_pylist()
    users = pq.read_table(run_dir / "data" / "sequences.parquet", columns=["user_id"]).column("user_id").to_pylist()
    per_round = int(args.rate * args.seconds / args.rounds)
    bodies = functools.partial(request_bodies, items, users, per_round, args.candidates, rng)
    results = {"knowledge": [], "ID-only fallback": []}  # by what was asked; the table also says what answered
    with serving(run_dir, args, {"user_id": users[-1], "candidates": items[:10]}) as (port, ready_s, _):
        asyncio.run(phase(port, bodies(True)[:100], args.rate, args.max_in_flight))  # warm-up, not counted
        for _ in range(args.rounds):
            for name, known in (("knowledge", True), ("ID-only fallback", False)):
                results[name].append(asyncio.run(phase(port, bodies(known), args.rate, args.max_in_flight)))
        memory = replica_memory()
    return {"users": len(users), "results": results, "memory": memory, "ready_s": ready_s, "per_round": per_round}


def request_bodies(
    items: list, users: list, n: int, candidates: int, rng: np.random.Generator, known: bool
) -> list[dict]:
    """`n` requests of `candidates` random items: for random known users, or with a random history and no user."""
    out = []
    for _ in range(n):
        body = {"candidates": [str(i) for i in rng.choice(items, candidates, replace=False)]}
        if known:
            body["user_id"] = users[int(rng.integers(len(users)))]
        else:
            body["history"] = [{"item_id": str(i)} for i in rng.choice(items, 20, replace=False)]
        out.append(body)
    return out


REPLICA_CLASS = "ServeReplica:rlrf4rec:Reranker"  # the Ray actor class of the application's Reranker replicas


@functools.cache
def dashboard_headers() -> dict[str, str]:
    """The `Authorization` header of Ray's token authentication, which a local cluster turns on when a token exists
    (~/.ray/auth_token): enabled in this process as Ray's own CLI does, so that the state API sends it too."""
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    return get_auth_headers_if_auth_enabled({})


def reranker_pids(dashboard: str) -> list[int]:
    """PIDs of the live Reranker replica processes, from Ray's state API (`ray list actors`)."""
    from ray.util.state import list_actors

    dashboard_headers()
    alive = [("class_name", "=", REPLICA_CLASS), ("state", "=", "ALIVE")]
    actors = list_actors(address=f"http://{dashboard}", filters=alive)
    return sorted(a.pid for a in actors)


def running_replicas(dashboard: str) -> list[int]:
    """PIDs of the Reranker replicas that Serve reports RUNNING (started, and passing their health checks)."""
    r = httpx.get(f"http://{dashboard}/api/serve/applications/", headers=dashboard_headers(), timeout=10)
    r.raise_for_status()
    replicas = r.json()["applications"]["rlrf4rec"]["deployments"]["Reranker"]["replicas"]
    return sorted(x["pid"] for x in replicas if x["state"] == "RUNNING")


def kill_run(run_dir: Path, args: argparse.Namespace, rng: np.random.Generator, replicas: int) -> dict:
    """Serve `run_dir` with `replicas` Reranker replicas, send known users' requests for --seconds and SIGKILL one
    replica's process --kill-replica-at seconds into them; Serve's status says when its replacement runs."""
    items = pq.read_table(run_dir / "data" / "item_index.parquet").column("item_id").to_pylist()
    users = pq.read_table(run_dir / "data" / "sequences.parquet", columns=["user_id"]).column("user_id").to_pylist()
    bodies = request_bodies(items, users, int(args.rate * args.seconds), args.candidates, rng, True)
    with serving(run_dir, args, {"user_id": users[-1], "candidates": items[:10]}, replicas) as (port, ready_s, at):
        if at is None:
            raise RuntimeError("no dashboard address in serve.log; Ray's state API needs the dashboard (ray[default])")
        deadline = time.monotonic() + 300
        while len(running_replicas(at)) < replicas:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{replicas} Reranker replicas did not come up in 300 s")
            time.sleep(1)
        asyncio.run(phase(port, bodies[:100], args.rate, args.max_in_flight))  # warm-up (every replica), not counted
        pids = reranker_pids(at)
        assert len(pids) == replicas, pids
        memory = replica_memory()  # every replica warm, before the kill
        result, killed_s, replaced_s = asyncio.run(load_and_kill(port, bodies, args, at, pids[0], replicas))
    return {"replicas": replicas, "result": result, "killed_s": killed_s, "replaced_s": replaced_s, "memory": memory,
            "ready_s": ready_s}  # fmt: skip


async def load_and_kill(
    port: int, bodies: list[dict], args: argparse.Namespace, dashboard: str, pid: int, replicas: int
) -> tuple[dict, float, float]:
    """The open-loop load with `pid` SIGKILLed --kill-replica-at seconds in: (phase result, kill time after the
    load's start, seconds from the kill until Serve runs `replicas` replicas again, none of them the killed one)."""

    async def kill() -> tuple[float, float]:
        await asyncio.sleep(args.kill_replica_at)
        os.kill(pid, signal.SIGKILL)
        killed = time.perf_counter()
        while True:
            running = await asyncio.to_thread(running_replicas, dashboard)
            if len(running) >= replicas and pid not in running:
                return killed, time.perf_counter()
            await asyncio.sleep(0.5)

    killer = asyncio.create_task(kill())
    result = await phase(port, bodies, args.rate, args.max_in_flight)
    killed, replaced = await asyncio.wait_for(killer, 300)
    return result, killed - result["t0"], replaced - killed


def kill_figures(m: dict, window_s: float) -> dict:
    """Errors and latency of the requests sent in [kill, kill + window_s), and the longest time without an answer."""
    r, kill_s = m["result"], m["killed_s"]
    answered = sorted(done for _, done, code in r["events"] if code == 200)
    edges = np.array([0.0, *answered, r["seconds"]])
    gaps = np.diff(edges)
    window = [(done - sent, code) for sent, done, code in r["events"] if kill_s <= sent < kill_s + window_s]
    # Failures count with their time to fail; a request the client dropped (too many in flight) is an error only.
    ms = np.array([d for d, code in window if code != "dropped by client"]) * 1000
    return {
        "requests": len(r["events"]),
        "errors": sum(code != 200 for _, _, code in r["events"]),
        "window_requests": len(window),
        "window_errors": sum(code != 200 for _, code in window),
        "window_p99": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
        "window_max": float(ms.max()) if len(ms) else float("nan"),
        "p99": float(np.percentile(r["latencies"], 99)) if r["latencies"] else float("nan"),
        "gap": float(gaps.max()),
        "gap_from": float(edges[gaps.argmax()]),
        "codes": {k: v for k, v in r["codes"].items() if k != 200},
    }


def kill_report(measured: list[dict], args: argparse.Namespace, load: tuple) -> list[str]:
    figures = {m["replicas"]: kill_figures(m, args.kill_window) for m in measured}
    rows, memory_rows = [], []
    for m in measured:
        f = figures[m["replicas"]]
        rows.append(
            f"| {m['replicas']} | {m['killed_s']:.2f} s | {f['requests']} | {f['errors']} "
            f"{f['codes'] or ''} | {f['window_requests']} | {f['window_errors']} | {f['window_p99']:.1f} | "
            f"{f['window_max']:.1f} | {f['p99']:.1f} | {f['gap']:.2f} s (from {f['gap_from']:.2f} s) | "
            f"{m['replaced_s']:.1f} s | {m['ready_s']:.0f} s |"
        )
        for i, (owned, mapped, pss) in enumerate(m["memory"].get("Reranker", [])):
            memory_rows.append(
                f"| {m['replicas']} | {i + 1} | {owned:,.0f} | {mapped:,.0f} | {owned + mapped:,.0f} | {pss:,.0f} |"
            )
    lines = [
        f"- Machine: {machine()}; load average before {' '.join(f'{x:.2f}' for x in load[0])}, after "
        f"{' '.join(f'{x:.2f}' for x in load[1])}.",
        f"- Server: serve_config.yaml (`serve run`) with the Reranker fixed at 1, then 2 replicas (num_replicas "
        f"instead of its autoscaling range), run {args.run_dir}; ingress {args.ingress}; client on the same box.",
        f"- Load: open loop at {args.rate:g} requests/s for {args.seconds:g} s, known users (knowledge path), "
        f"{args.candidates} candidates per request, client timeout 10 s, after a 100-request warm-up; at "
        f"{args.kill_replica_at:g} s one Reranker replica's process (its PID from Ray's state API) gets SIGKILL. "
        f"Kill window: requests sent in the {args.kill_window:g} s from the kill; its p99 counts a failed request "
        "with its time to fail. Errors: anything but 200, requests the client dropped at "
        f"{args.max_in_flight} in flight included. Longest gap: the longest time with no request answered 200.",
        "",
        "| Reranker replicas | killed at | requests | errors (all) | requests in kill window | errors in window "
        "| p99 ms in window | max ms in window | p99 ms (answered, all load) | longest gap without an answer "
        "| replacement RUNNING after kill | first answer after `serve run` |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    if {1, 2} <= set(figures):
        a, b = figures[1], figures[2]
        lines += [
            f"One Reranker replica SIGKILLed at {args.kill_replica_at:g} s, 1 replica vs 2: errors {a['errors']} vs "
            f"{b['errors']}; p99 over the kill window {a['window_p99']:,.0f} vs {b['window_p99']:,.0f} ms; longest "
            f"gap without an answer {a['gap']:.2f} vs {b['gap']:.2f} s.",
            "",
        ]
    lines += [
        "Reranker replica memory after the warm-up, before the kill, MiB per replica process (owned = anonymous; "
        "mapped = page-cache pages it maps, shared; RSS = owned + mapped; PSS = its proportional share):",
        "",
        "| Reranker replicas | replica | owned | mapped | RSS | PSS |",
        "|---|---|---|---|---|---|",
        *memory_rows,
        "",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "ml100k-cpu")
    parser.add_argument("--rate", type=float, default=50.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=30.0, help="per path, split over --rounds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--max-in-flight", type=int, default=64)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument(
        "--ingress",
        choices=["haproxy", "proxy"],
        default="haproxy",
        help="HTTP front: HAProxy to the ingress replica (`rlrf4rec serve --ingress haproxy`) or Serve's Python proxy",
    )
    parser.add_argument(
        "--throughput-optimized", action="store_true", help="with --ingress proxy: RAY_SERVE_THROUGHPUT_OPTIMIZED=1"
    )
    parser.add_argument("--synthetic-users", type=int, default=0, help="also load a synthetic run of this many users")
    parser.add_argument("--synthetic-dir", type=Path, help="where it is built (default runs/serve-synthetic-<N>)")
    parser.add_argument(
        "--kill-replica-at",
        type=float,
        help="instead of the two paths: the knowledge path alone for --seconds, with 1 and then 2 Reranker replicas, "
        "and one replica's process SIGKILLed this many seconds in",
    )
    parser.add_argument("--kill-window", type=float, default=10.0, help="seconds after the kill that are reported")
    parser.add_argument("--replicas", default="1,2", help="with --kill-replica-at: the Reranker replica counts")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    if args.kill_replica_at is not None:
        before = os.getloadavg()
        measured = [kill_run(args.run_dir, args, rng, int(n)) for n in args.replicas.split(",")]
        lines = kill_report(measured, args, (before, os.getloadavg()))
        if args.no_append:
            print("\n".join(lines))
        else:
            append_section("Serve under a replica kill: one Reranker replica SIGKILLed under load", lines, args.results)
        return
    runs = [args.run_dir]
    synthetic_s = None
    if args.synthetic_users:
        t0 = time.monotonic()
        out = args.synthetic_dir or ROOT / "runs" / f"serve-synthetic-{args.synthetic_users}"
        runs.append(synthetic_run(args.run_dir, args.synthetic_users, out))
        synthetic_s = time.monotonic() - t0
    load_before = os.getloadavg()
    measured = [load_run(run, args, rng) for run in runs]
    load_after = os.getloadavg()

    rows, memory_rows, p99 = [], [], {}
    for m in measured:
        for name, phases in m["results"].items():
            lat = np.concatenate([r["latencies"] for r in phases]) if phases else np.zeros(0)
            codes: dict = {}
            served: dict = {}
            for r in phases:
                for k, v in r["codes"].items():
                    codes[k] = codes.get(k, 0) + v
                for k, v in r["paths"].items():
                    served[k] = served.get(k, 0) + v
            sent = sum(codes.values())
            errors = sent - codes.get(200, 0)
            seconds = sum(r["seconds"] for r in phases)
            p50, p90, p99[m["users"], name] = (
                float(np.percentile(lat, q)) if len(lat) else float("nan") for q in (50, 90, 99)
            )
            by = ", ".join(f"{k} {v}" for k, v in sorted(served.items()))
            rows.append(
                f"| {m['users']:,} | {name} | {by} | {sent} | {errors} | {codes.get(200, 0) / seconds:.1f} | "
                f"{p50:.1f} | {p90:.1f} | {p99[m['users'], name]:.1f} | {lat.max() if len(lat) else float('nan'):.1f} |"
            )
        for deployment, replicas in sorted(m["memory"].items()):
            owned, mapped, pss = (", ".join(f"{r[k]:,.0f}" for r in replicas) for k in range(3))
            memory_rows.append(f"| {m['users']:,} | {deployment} | {len(replicas)} | {owned} | {mapped} | {pss} |")
    lines = [
        f"- Machine: {machine()}; load average before {' '.join(f'{x:.2f}' for x in load_before)}, after "
        f"{' '.join(f'{x:.2f}' for x in load_after)}.",
        f"- Server: serve_config.yaml as shipped (`serve run`), run {args.run_dir}"
        + (
            f" and a synthetic run of {args.synthetic_users:,} users made from it ({runs[-1]}; built in "
            f"{synthetic_s:.0f} s, or reused)"
            if args.synthetic_users
            else ""
        )
        + "; client on the same box (asyncio, raw HTTP/1.1 keep-alive connections); "
        f"ingress {args.ingress}"
        + (" (RAY_SERVE_ENABLE_HA_PROXY=1, RAY_SERVE_THROUGHPUT_OPTIMIZED=1)" if args.ingress == "haproxy" else "")
        + (" (RAY_SERVE_THROUGHPUT_OPTIMIZED=1)" if args.ingress == "proxy" and args.throughput_optimized else "")
        + ".",
        f"- Load: open loop at {args.rate:g} requests/s, {args.candidates} candidates per request, "
        f"{args.rounds} alternating rounds of {measured[0]['per_round']} requests per path, max {args.max_in_flight} "
        "in flight; known users drawn uniformly from all the run's users; the client's garbage collector off while "
        "it sends.",
        "",
        "| users | phase | served by (from each response) | requests | errors | achieved req/s | p50 ms | p90 ms "
        "| p99 ms | max ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        *(
            f"{m['users']:,} users: knowledge / ID-only p99 "
            f"{p99[m['users'], 'knowledge'] / p99[m['users'], 'ID-only fallback']:.2f}x; "
            f"first answer {m['ready_s']:.0f} s after `serve run`"
            for m in measured
        ),
        "",
        "Replica memory after the load, MiB per replica process (owned = anonymous memory; mapped = page-cache pages "
        "it maps, shared with every process mapping the same files; PSS = its proportional share):",
        "",
        "| users | deployment | replicas | owned | mapped | PSS |",
        "|---|---|---|---|---|---|",
        *memory_rows,
        "",
    ]
    if len(measured) == 2:
        a, b = measured
        for deployment in sorted(set(a["memory"]) & set(b["memory"])):
            owned = [np.mean([r[0] for r in m["memory"][deployment]]) for m in (a, b)]
            lines.append(
                f"{deployment}: owned memory per replica at {b['users']:,} users / at {a['users']:,}: "
                f"{owned[1] / owned[0]:.2f}x ({owned[1]:,.0f} vs {owned[0]:,.0f} MiB)"
            )
        lines.append("")
    if args.no_append:
        print("\n".join(lines))
    else:
        append_section("Serve load: knowledge path vs ID-only fallback", lines, args.results)


if __name__ == "__main__":
    main()
