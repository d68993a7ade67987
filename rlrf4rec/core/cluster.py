"""cluster.yaml -> an autoscaling config for Ray's fake multi-node provider, which starts each node the autoscaler
launches as one more raylet on this machine. The worker types keep cluster.yaml's names, min/max workers and GPU counts
(declared, not detected) and the global limits; CPUs and object store become small numbers that fit a laptop, and
nothing is installed, copied or started over SSH. Knows nothing about AWS beyond how many GPUs each instance type has,
and starts nothing itself.

`ray_session` is how a command joins the cluster of a submitted job ($RAY_ADDRESS) or starts a local one (with the
dashboard on 127.0.0.1: Ray Train's state checks and the Jobs API need it).

By hand, from the project's venv (a job runs the `python` that `ray start` finds):

    python -m rlrf4rec.core.cluster cluster.yaml --gcs-port 6379 --idle-timeout-minutes 0.5 > /tmp/fake-cluster.yaml
    RAY_FAKE_CLUSTER=1 AUTOSCALER_UPDATE_INTERVAL_S=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ray start --head \\
        --node-ip-address 127.0.0.1 --port 6379 --num-cpus 0 --num-gpus 0 --autoscaling-config /tmp/fake-cluster.yaml
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import yaml

# GPUs per instance of the AWS types cluster.yaml names. Ray's AWS provider asks the EC2 API; offline, this table
# stands in for it (a node type whose instance it lacks is refused with the fix).
AWS_GPUS = {"m6i.4xlarge": 0, "g5.12xlarge": 4, "p4d.24xlarge": 8}
# The fake provider registers the head under this type name whatever the config calls it.
FAKE_HEAD_TYPE = "ray.head.default"
# The smallest object store Ray accepts is 75 MiB; each fake node is a raylet on this machine.
FAKE_OBJECT_STORE_BYTES = 100 * 1024**2

# Top-level fields the autoscaler expects (it hashes the commands and mounts); with disable_node_updaters none runs.
_FAKE_CLUSTER_FIELDS = {
    "auth": {},
    "docker": {},
    "initialization_commands": [],
    "setup_commands": [],
    "head_setup_commands": [],
    "worker_setup_commands": [],
    "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
    "file_mounts": {},
    "cluster_synced_files": [],
    "file_mounts_sync_continuously": False,
    "rsync_exclude": [],
    "rsync_filter": [],
}


def node_gpus(name: str, node: dict) -> int:
    """GPUs of one node type: its `resources.GPU` when cluster.yaml sets it, else its instance type's."""
    gpus = node.get("resources", {}).get("GPU")
    if gpus is not None:
        return int(gpus)
    instance = node.get("node_config", {}).get("InstanceType")
    if instance not in AWS_GPUS:
        raise ValueError(f"cluster.yaml {name}: instance type {instance!r} unknown; set resources.GPU for it")
    return AWS_GPUS[instance]


def fake_cluster_config(
    cluster: dict,
    gcs_address: str,
    *,
    worker_cpus: int = 1,
    idle_timeout_minutes: float | None = None,
) -> dict:
    """`cluster` (cluster.yaml, parsed) -> a fake_multinode autoscaling config whose head's GCS is `gcs_address`.

    Worker types: cluster.yaml's names, min/max workers and GPU counts, `worker_cpus` CPUs each. The head keeps
    cluster.yaml's resources under FAKE_HEAD_TYPE; the head raylet itself gets them from `ray start`'s flags.
    `idle_timeout_minutes` replaces cluster.yaml's (minutes of idling before a worker is removed) when given."""
    head_name = cluster["head_node_type"]
    types = {}
    for name, node in cluster["available_node_types"].items():
        if name == head_name:
            continue
        resources = {k: v for k, v in node.get("resources", {}).items() if k not in ("CPU", "GPU")}
        resources.update(CPU=worker_cpus, GPU=node_gpus(name, node), object_store_memory=FAKE_OBJECT_STORE_BYTES)
        types[name] = {
            "resources": resources,
            "node_config": {},
            "min_workers": node.get("min_workers", 0),
            "max_workers": node["max_workers"],
        }
    head = cluster["available_node_types"][head_name]
    idle = cluster["idle_timeout_minutes"] if idle_timeout_minutes is None else idle_timeout_minutes
    types[FAKE_HEAD_TYPE] = {"resources": dict(head.get("resources", {})), "node_config": {}, "max_workers": 0}
    return {
        "cluster_name": f"{cluster['cluster_name']}-fake",
        "max_workers": cluster["max_workers"],
        "upscaling_speed": cluster.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,  # every fake node has this machine's IP; tell them apart by node id
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": types,
        "head_node_type": FAKE_HEAD_TYPE,
        **copy.deepcopy(_FAKE_CLUSTER_FIELDS),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlrf4rec.core.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("cluster_yaml")
    parser.add_argument("--gcs-port", type=int, default=6379, help="the head's --port")
    parser.add_argument("--host", default="127.0.0.1", help="the head's --node-ip-address")
    parser.add_argument("--worker-cpus", type=int, default=1)
    parser.add_argument("--idle-timeout-minutes", type=float, default=None)
    args = parser.parse_args(argv)
    with open(args.cluster_yaml) as fh:
        cluster = yaml.safe_load(fh)
    config = fake_cluster_config(
        cluster,
        f"{args.host}:{args.gcs_port}",
        worker_cpus=args.worker_cpus,
        idle_timeout_minutes=args.idle_timeout_minutes,
    )
    yaml.safe_dump(config, sys.stdout, sort_keys=False)
    return 0


@contextmanager
def ray_session(needed: bool = True) -> Iterator[None]:
    """Start Ray for the stages that run on it: join $RAY_ADDRESS (`ray job submit`) or start a local cluster."""
    if not needed:
        yield
        return
    import ray

    if ray.is_initialized():
        yield
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        # With the dashboard (on loopback only): without it Ray Train's placement-group cleaner cannot query actor state
        # and logs a warning every few seconds of every fit (22 lines in a 50 s fit, none with it; start-up +2 s).
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1")
    if not verbose():
        quiet_ray()
    try:
        yield
    finally:
        ray.shutdown()


def verbose() -> bool:
    """The CLI's `--verbose`, which sets the root logger to DEBUG; any higher root level, Python's default WARNING
    included (a library caller that configured no logging), is quiet."""
    return logging.getLogger().level <= logging.DEBUG


def quiet_ray() -> None:
    """Ray's own INFO lines (Ray Data's execution plans and progress, Train's reports) only with --verbose: each
    stage logs its own progress. Ray's loggers print through their own console handlers, which get the level; the
    session log files under /tmp/ray keep everything."""
    import ray.data  # sets up Ray Data's loggers

    ray.data.DataContext.get_current().enable_progress_bars = False
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve"):
        for handler in logging.getLogger(name).handlers:
            if not isinstance(handler, logging.FileHandler) and type(handler).__name__ != "SessionFileHandler":
                handler.setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())


# --------------------------------------------------------------------------------------------------- Ray Data

ROW = "_row"  # the row index map_rows_on_ray adds to check what comes back


def map_batches_on_ray(
    rows: pa.Table,
    udf: type,
    constructor_args: tuple,
    *,
    batch_size: int,
    concurrency: int,
    num_cpus: float,
    num_gpus: float = 0.0,
    what: str,
) -> Iterator[pa.Table]:
    """`rows` through `concurrency` Ray Data actors of `udf` (its model loads once per actor, in `__init__`), a batch
    of rows in, the same rows out; yields output batches as they finish, in any order. One block per batch, so every
    actor gets work and results stream back batch by batch. `what` names the setting that asked for Ray."""
    import ray
    from ray.data import ActorPoolStrategy

    if not ray.is_initialized():
        raise RuntimeError(f"{what} runs on Ray Data: call ray.init() first (the CLI does)")
    blocks = [rows.slice(lo, batch_size) for lo in range(0, rows.num_rows, batch_size)]
    ds = ray.data.from_arrow(blocks).map_batches(
        udf,
        fn_constructor_args=constructor_args,
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=concurrency),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        udf_modifying_row_count=False,
    )
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")


def map_rows_on_ray(rows: pa.Table, udf: type, constructor_args: tuple, **kwargs) -> pa.Table:
    """map_batches_on_ray, collected: every row back exactly once (else an error: Ray Data lost or repeated some),
    in the order of `rows`."""
    indexed = rows.append_column(ROW, pa.array(np.arange(rows.num_rows), pa.int64()))
    out = pa.concat_tables(list(map_batches_on_ray(indexed, udf, constructor_args, **kwargs)))
    returned = out.column(ROW).to_numpy()
    if len(returned) != rows.num_rows or len(np.unique(returned)) != rows.num_rows:
        raise RuntimeError(f"Ray Data returned {len(returned)} rows for {rows.num_rows} (lost or repeated)")
    return out.take(np.argsort(returned)).drop_columns([ROW])
