"""Load test of the Serve application: knowledge path vs ID-only path, side by side (target: p99 <= 30 ms at
50 requests/s, 100 candidates per request, precomputed knowledge, 0 errors).

    .venv/bin/python benchmarks/serve_load.py [--run-dir runs/ml100k-cpu] [--rate 50] [--seconds 30]
                                              [--ingress haproxy|proxy [--throughput-optimized]]

Deploys serve_config.yaml as shipped (`serve run`, its own local Ray on 127.0.0.1, only run_dir and port changed;
by default with Serve's HAProxy ingress, as `rlrf4rec serve --ingress haproxy` starts it), then sends an
open-loop stream at a fixed rate: request i leaves at start + i / rate whether or not earlier ones have returned,
so a slow server shows up as latency instead of a slower client (bounded by --max-in-flight).
Knowledge path: known users. ID-only path: no user id, a random recent history -> the fallback re-ranker.
The two phases alternate (--rounds) so both see the same machine load. Needs a finished run directory.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import yaml
from common import append_section, machine

from rlrf4rec.serving.launch import SERVE_HAPROXY_ENV

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run_dir: Path, port: int, workdir: Path, ingress: str, throughput_optimized: bool) -> subprocess.Popen:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = port
    config["applications"][0]["args"]["run_dir"] = str(run_dir.resolve())
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


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)  # `serve run` shuts the application and its local Ray down
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


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
    latencies, codes, paths = [], {}, {}
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

    tasks, t0 = [], time.perf_counter()
    try:
        for i, payload in enumerate(payloads):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if in_flight >= max_in_flight:
                codes["dropped by client"] = codes.get("dropped by client", 0) + 1
                continue
            tasks.append(asyncio.create_task(one(payload)))
        await asyncio.gather(*tasks)
    finally:
        client.close()
    elapsed = time.perf_counter() - t0
    return {"latencies": latencies, "codes": codes, "paths": paths, "seconds": elapsed}


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
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    items = pq.read_table(args.run_dir / "data" / "item_index.parquet").column("item_id").to_pylist()
    users = pq.read_table(args.run_dir / "data" / "sequences.parquet").column("user_id").to_pylist()
    per_round = int(args.rate * args.seconds / args.rounds)

    def bodies(known: bool) -> list[dict]:
        out = []
        for _ in range(per_round):
            body = {"candidates": [str(i) for i in rng.choice(items, args.candidates, replace=False)]}
            if known:
                body["user_id"] = str(rng.choice(users))
            else:
                body["history"] = [{"item_id": str(i)} for i in rng.choice(items, 20, replace=False)]
            out.append(body)
        return out

    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="serve-load-"))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args.run_dir, port, workdir, args.ingress, args.throughput_optimized)
    results = {"knowledge": [], "ID-only fallback": []}  # by what was asked; the table also says what answered
    try:
        deadline = time.monotonic() + 300
        probe = {"user_id": users[0], "candidates": items[:10]}
        while True:
            try:
                if httpx.post(f"{url}/rank", json=probe, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the application did not come up; see {workdir / 'serve.log'}")
            time.sleep(1)
        asyncio.run(phase(port, bodies(True)[:100], args.rate, args.max_in_flight))  # warm-up, not counted
        for _ in range(args.rounds):
            for name, known in (("knowledge", True), ("ID-only fallback", False)):
                results[name].append(asyncio.run(phase(port, bodies(known), args.rate, args.max_in_flight)))
    finally:
        stop_server(proc)
    load_after = os.getloadavg()

    rows, p99 = [], {}
    for name, runs in results.items():
        lat = np.concatenate([r["latencies"] for r in runs]) if runs else np.zeros(0)
        codes: dict = {}
        served: dict = {}
        for r in runs:
            for k, v in r["codes"].items():
                codes[k] = codes.get(k, 0) + v
            for k, v in r["paths"].items():
                served[k] = served.get(k, 0) + v
        sent = sum(codes.values())
        errors = sent - codes.get(200, 0)
        seconds = sum(r["seconds"] for r in runs)
        p50, p90, p99[name] = (float(np.percentile(lat, q)) if len(lat) else float("nan") for q in (50, 90, 99))
        by = ", ".join(f"{k} {v}" for k, v in sorted(served.items()))
        rows.append(
            f"| {name} | {by} | {sent} | {errors} | {codes.get(200, 0) / seconds:.1f} | {p50:.1f} | {p90:.1f} | "
            f"{p99[name]:.1f} | {lat.max() if len(lat) else float('nan'):.1f} |"
        )
    lines = (
        [
            f"- Machine: {machine()}; load average before {' '.join(f'{x:.2f}' for x in load_before)}, after "
            f"{' '.join(f'{x:.2f}' for x in load_after)}.",
            f"- Server: serve_config.yaml as shipped (`serve run`), run {args.run_dir}; client on the same box "
            "(asyncio, raw HTTP/1.1 keep-alive connections); "
            f"ingress {args.ingress}"
            + (" (RAY_SERVE_ENABLE_HA_PROXY=1, RAY_SERVE_THROUGHPUT_OPTIMIZED=1)" if args.ingress == "haproxy" else "")
            + (" (RAY_SERVE_THROUGHPUT_OPTIMIZED=1)" if args.ingress == "proxy" and args.throughput_optimized else "")
            + ".",
            f"- Load: open loop at {args.rate:g} requests/s, {args.candidates} candidates per request, "
            f"{args.rounds} alternating rounds of {per_round} requests per path, max {args.max_in_flight} in flight; "
            "the client's garbage collector off while it sends.",
            "",
            "| phase | served by (from each response) | requests | errors | achieved req/s | p50 ms | p90 ms | p99 ms "
            "| max ms |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"knowledge / ID-only p99: {p99['knowledge'] / p99['ID-only fallback']:.2f}x",
            "",
        ]
    )
    if args.no_append:
        print("\n".join(lines))
    else:
        append_section("Serve load: knowledge path vs ID-only fallback", lines, args.results)


if __name__ == "__main__":
    main()
