"""The shipped run configs (configs/*.yaml): each loads, writes every section out, asks for no more GPUs than
cluster.yaml's worker types hold (CPU configs for none), and the GPU configs pass `--dry-run` here; the Amazon Books
config's files, labels and window are checked on a small dataset of that layout. benchmarks/gpu_smoke.sh --dry-run
lists the gpu tests and the benchmark, and every test in tests/test_gpu.py is a gpu test."""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from rlrf4rec.core.cluster import node_gpus
from rlrf4rec.core.config import RunConfig, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
GPU_CONFIGS = [p for p in CONFIGS if "-gpu" in p.stem]
# name, run_dir, seed and the sections, in order; `fault` (resilience tests' kill switch) stays off by default.
SECTIONS = [f.name for f in dataclasses.fields(RunConfig) if f.name != "fault"]
NESTED = {name for name, tp in typing.get_type_hints(RunConfig).items() if dataclasses.is_dataclass(tp)}
# GPUs per instance of the AWS types cluster.yaml names. Ray's AWS provider asks the EC2 API; offline, this table
# stands in for it, and a node type whose instance it lacks fails the test until the table learns it.
# A small dataset of each GPU config's format, for what `--dry-run` checks beyond the data path.
FORMAT_FIXTURES = {"ml-1m": FIXTURES / "ml-1m", "amazon": FIXTURES / "amazon-2018"}


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def unwritten_sections(raw: dict) -> list[str]:
    """Top-level fields of RunConfig the YAML leaves out, or writes as an empty section: both take the defaults."""
    return [name for name in SECTIONS if name not in raw or (name in NESTED and not raw[name])]


def worker_gpus() -> dict[str, tuple[int, int]]:
    """cluster.yaml's worker node types -> (GPUs per node, most nodes of the type)."""
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    out = {}
    for name, node in cluster["available_node_types"].items():
        if name == cluster["head_node_type"]:
            continue
        out[name] = (node_gpus(name, node), min(node["max_workers"], cluster["max_workers"]))
    return out


def gpu_requests(cfg: RunConfig) -> dict[str, tuple[int, int]]:
    """What a config asks Ray for, per stage: (GPUs one unit needs on one node, units at once).

    A vLLM replica holds generate.num_gpus_per_replica GPUs (at least tensor_parallel_size, which the config
    checks) and runs its tensor-parallel workers beside it, so one replica stays on one node. A Ray Train worker
    holds one GPU."""
    out = {}
    g = cfg.generate
    if g.num_gpus_per_replica:
        out["generate"] = (max(g.num_gpus_per_replica, g.tensor_parallel_size), g.concurrency)
    if cfg.recommender.use_gpu:
        out["recommender"] = (1, cfg.recommender.num_workers)
    if cfg.dpo.use_gpu:
        out["dpo"] = (1, cfg.dpo.num_workers)
    return out


def misfits(cfg: RunConfig, nodes: dict[str, tuple[int, int]]) -> list[str]:
    """Each GPU request of `cfg` that the worker types `nodes` cannot hold (stages run one after another)."""
    problems = []
    for stage, (unit, units) in gpu_requests(cfg).items():
        fitting = {name: gpus // unit * count for name, (gpus, count) in nodes.items() if gpus >= unit}
        if not fitting:
            problems.append(f"{stage}: one unit needs {unit} GPUs on one node; no worker type has them")
        elif units > sum(fitting.values()):
            problems.append(f"{stage}: {units} x {unit} GPUs; the worker types hold {sum(fitting.values())} such units")
    # ZeRO-3 gathers every layer's weights each step: that traffic belongs inside one node.
    largest = max((gpus for gpus, _ in nodes.values()), default=0)
    if cfg.dpo.use_gpu and cfg.dpo.deepspeed == "zero3" and cfg.dpo.num_workers > largest:
        problems.append(f"dpo: ZeRO-3 over {cfg.dpo.num_workers} GPUs; the largest node holds {largest}")
    return problems


# --------------------------------------------------------------------------------------------------- every config


def test_configs_are_shipped_for_cpu_and_gpu():
    assert {p.name for p in GPU_CONFIGS} >= {"ml1m-gpu.yaml", "amazon-books-gpu.yaml"}
    assert all("-gpu" in p.stem or "-cpu" in p.stem for p in CONFIGS), "name a config *-gpu or *-cpu*"


@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
def test_config_loads_and_writes_every_section_out(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    missing = unwritten_sections(yaml.safe_load(path.read_text()))
    assert not missing, f"{path.name}: {missing} not written out; a missing section silently takes the defaults"


def test_a_left_out_or_empty_section_is_caught():
    raw = yaml.safe_load((ROOT / "configs" / "ml1m-gpu.yaml").read_text())
    assert unwritten_sections(raw) == []
    del raw["loop"]
    raw["encode"] = None  # `encode:` with nothing under it
    assert unwritten_sections(raw) == ["encode", "loop"]


@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
def test_resource_requests_fit_the_cluster(path):
    cfg = load_config(path)
    requests = gpu_requests(cfg)
    if "-cpu" in path.stem:
        assert requests == {} and not cfg.dpo.bf16, f"{path.name}: a CPU config asks for GPUs: {requests}"
        return
    assert set(requests) == {"generate", "recommender", "dpo"}, f"{path.name}: every GPU stage on GPUs"
    assert misfits(cfg, worker_gpus()) == [], path.name


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ("generate.num_gpus_per_replica=16", "generate: one unit needs 16 GPUs on one node"),
        ("generate.concurrency=40", "generate: 40 x 1 GPUs; the worker types hold 32"),
        ("recommender.num_workers=33", "recommender: 33 x 1 GPUs"),
        ("dpo.num_workers=16", "dpo: ZeRO-3 over 16 GPUs; the largest node holds 8"),
    ],
)
def test_a_request_beyond_the_cluster_is_caught(override, problem):
    cfg = load_config(ROOT / "configs" / "ml1m-gpu.yaml", [override])
    assert any(p.startswith(problem) for p in misfits(cfg, worker_gpus())), misfits(cfg, worker_gpus())


# --------------------------------------------------------------------------------------------------- GPU configs


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=_ids(GPU_CONFIGS))
def test_gpu_config_runs_the_reported_setting_on_every_user(path):
    cfg = load_config(path)
    assert (cfg.loop.rounds, cfg.generate.num_samples, cfg.generate.dtype) == (2, 10, "bfloat16")
    caps = {
        "data.max_train_users": cfg.data.max_train_users,
        "generate.max_users": cfg.generate.max_users,
        "loop.train_users": cfg.loop.train_users,
        "loop.eval_users": cfg.loop.eval_users,
    }
    assert caps == dict.fromkeys(caps), f"{path.name}: user caps {caps}"
    assert cfg.recommender.history_len == cfg.data.history_max  # the re-ranker reads the window it is given


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=_ids(GPU_CONFIGS))
def test_gpu_config_dry_run(path, capsys, caplog):
    """As shipped, dry-run fails here for one reason only: the cluster's data path. With a dataset of the config's
    format in its place, every stage's dry-run passes and prints the resolved config and what it would fetch."""
    from rlrf4rec.cli import _parser, main

    cfg = load_config(path)
    (commands,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    stages = sorted(commands.choices)
    rc = main(["run", "--config", str(path), "--dry-run"])
    if Path(cfg.data.path).exists():  # on a cluster node with the shared storage mounted
        assert rc == 0
    else:
        assert rc == 2 and f"data.path={cfg.data.path!r}: no such file or directory" in caplog.text
    capsys.readouterr()

    override = f"--data.path={FORMAT_FIXTURES[cfg.data.format]}"
    expected = dump_config(load_config(path, [override[2:]]))
    for stage in stages:
        rc = main([stage, "--config", str(path), "--dry-run", override])
        out = capsys.readouterr().out
        assert rc == 0, stage
        assert out.startswith(expected), stage
        report = json.loads(out[len(expected) :])
        assert report["run_dir"] == str(cfg.run_path)
        external = "external (HF id or path, not checked offline)"
        assert report["assets"]["models.llm"] == f"{cfg.models.llm}: {external}"


def _amazon_books_2018(directory: Path, names: list[str], users: int = 12, length: int = 40) -> dict:
    """Books reviews and metadata in the 2018 layout, gzipped, under `names`: (user, asin) -> rating, ratings 1-5
    in turn so that 4 and 5 stars both fall in every user's re-rank lists."""
    directory.mkdir(parents=True)
    reviews, ratings = [], {}
    for u in range(users):
        for t in range(length):
            asin = f"B{(u * 7 + t) % 60:09d}"
            rating = float(1 + (u + t) % 5)
            ratings[(f"R{u}", asin)] = rating
            reviews.append({"reviewerID": f"R{u}", "asin": asin, "overall": rating, "unixReviewTime": 10**9 + t})
    meta = [{"asin": f"B{i:09d}", "title": f"Book {i}", "category": ["Books", "Fiction"]} for i in range(60)]
    review_name, meta_name = sorted(names, key=lambda n: "meta" in n)
    for name, rows in ((review_name, reviews), (meta_name, meta)):
        with gzip.open(directory / name, "wt") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    return ratings


def test_amazon_books_config_reads_its_files_and_labels_five_stars_only(tmp_path, capsys):
    from rlrf4rec.cli import main

    path = ROOT / "configs" / "amazon-books-gpu.yaml"
    cfg = load_config(path)
    assert (cfg.data.format, cfg.generate.domain, cfg.data.history_max) == ("amazon", "products", 15)
    # The file names the header promises under data.path.
    names = re.findall(rf"^#\s+{re.escape(cfg.data.path)}/(\S+)$", path.read_text(), re.M)
    assert sorted(names) == ["Books_5.json.gz", "meta_Books.json.gz"]
    ratings = _amazon_books_2018(tmp_path / "books", names)

    rc = main(["data", "--config", str(path), f"--data.path={tmp_path / 'books'}", f"--run_dir={tmp_path / 'run'}"])
    capsys.readouterr()
    assert rc == 0
    data = tmp_path / "run" / "data"
    windows = [r["history_end"] - r["history_start"] for r in pq.read_table(data / "sequences.parquet").to_pylist()]
    assert max(windows) == 15  # half of 40 is 20: the cap binds
    labelled = {4.0: set(), 5.0: set()}
    for row in pq.read_table(data / "rerank_lists.parquet").to_pylist():
        for item, label in zip(row["candidate_items"], row["labels"]):
            rating = ratings.get((row["user_id"], item))  # None: a sampled never-interacted item
            assert label == (rating is not None and rating > 4), (row["user_id"], item, rating, label)
            if rating in labelled:
                labelled[rating].add(label)
    assert labelled == {4.0: {0}, 5.0: {1}}  # a 4-star review is a negative, a 5-star one positive


# --------------------------------------------------------------------------------------------------- GPU smoke


def test_gpu_smoke_dry_run_lists_the_gpu_tests_and_the_benchmark_and_runs_nothing():
    script = ROOT / "benchmarks" / "gpu_smoke.sh"
    assert os.access(script, os.X_OK)
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_text()
    out = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    commands = out.stdout.splitlines()
    pytest_line = next(c for c in commands if " -m pytest " in c)
    assert "tests/test_gpu.py" in pytest_line and "-m gpu" in pytest_line
    bench_line = next(c for c in commands if "benchmarks/generation.py" in c)
    assert "--gpus 1" in bench_line and "--dtype bfloat16" in bench_line
    assert all(c.startswith("timeout ") for c in (pytest_line, bench_line))  # each step killed at its limit
    limits = [int(c.split()[3]) for c in (pytest_line, bench_line)]
    assert sum(limits) + 2 * 10 < 600  # with the kill grace: under 10 minutes
    assert results.read_text() == before
    assert subprocess.run(["bash", str(script), "--bogus"], capture_output=True, timeout=60).returncode == 2


def test_every_test_in_test_gpu_is_marked_gpu():
    def collect(marker: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", marker]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run([*command, "tests/test_gpu.py"], capture_output=True, text=True, cwd=ROOT, env=env)

    gpu = collect("gpu")
    assert gpu.returncode == 0, gpu.stdout + gpu.stderr
    collected = [line for line in gpu.stdout.splitlines() if line.startswith("tests/test_gpu.py::")]
    assert len(collected) >= 5
    assert collect("not gpu").returncode == 5  # pytest: no test selected
