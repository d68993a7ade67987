"""A Ray head started the way a cluster starts one, for the tests that need a real head (job submission, Serve,
autoscaling): its command line on free ports, waiting for it, and stopping its whole process group."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(predicate, timeout: float, what: str, interval: float = 1.0):
    """predicate()'s first truthy value within `timeout` s; connection errors (a head still starting) retry."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if value := predicate():
                return value
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(interval)
    raise TimeoutError(f"{what} not within {timeout:.0f} s")


def head_command(gcs: int, dashboard: int, temp_dir: str, *extra: str) -> list[str]:
    """`ray start --head --block` on 127.0.0.1 with a dashboard; every per-node agent on a free port (their defaults,
    52365 and so on, clash with any other Ray on the machine)."""
    return [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        *extra,
    ]


def stop_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the head's process group (it was started with start_new_session), then SIGKILL what is left."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):  # the group may be gone already
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
