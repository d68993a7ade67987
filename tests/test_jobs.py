"""The `ray job submit` entry points: each names a real subcommand, and without the project's environment the job
fails at once with the interpreter and the fix named, not with an import error deep in a stage."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rlrf4rec.cli import _parser
from rlrf4rec.pipeline import STAGES

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "ray_jobs").glob("*.py"))


def test_entry_points_match_the_stage_table():
    """ray_jobs/<name>.py runs subcommand <name> (dashes as underscores), and every stage but `serve` (which runs as
    `serve run serve_config.yaml`) has one; the CLI's subcommands are the table's."""
    assert set(_parser()._subparsers._group_actions[0].choices) == {s.name for s in STAGES}
    called = {p.name: re.search(r'run\("([a-z-]+)"\)', p.read_text()) for p in SCRIPTS}
    assert all(called.values()), called
    assert {name: m.group(1) for name, m in called.items()} == {
        s.job_script: s.name for s in STAGES if s.name != "serve"
    }


def test_entry_point_without_the_environment_names_the_fix():
    # -S: no site-packages, as when `ray start` ran under a Python without the project's packages.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-S", "ray_jobs/data.py", "--config", "configs/ml100k-cpu.yaml", "--dry-run"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "pyarrow" in out.stderr and sys.executable in out.stderr and "source .venv/bin/activate" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("script", ["data.py", "run.py"])
def test_entry_point_in_the_environment_runs_the_stage(script, tmp_path):
    out = subprocess.run(
        [sys.executable, f"ray_jobs/{script}", "--config", "configs/ml100k-cpu.yaml", "--dry-run",
         f"--run_dir={tmp_path}/run"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "history_max" in out.stdout  # the resolved config, printed by --dry-run


def test_each_stage_reads_only_stages_before_it_and_every_stage_module_ends_with_its_record():
    import ast
    import importlib

    from rlrf4rec.pipeline import RUN, STEPS

    names = [s.name for s in STAGES]
    for step in STEPS:  # run inside a stage of the table, never as a subcommand
        assert step.inside in names and set(step.upstream) <= set(names) and step.name not in names, step.name
        with pytest.raises(TypeError, match=f"`rlrf4rec {step.inside}` runs it"):
            step.run(None, None)
    for i, stage in enumerate(STAGES):
        assert set(stage.upstream) <= set(names[:i]), stage.name
    run = [s.name for s in RUN]
    assert run == ["assets", "data", "sft", "encode", "train-recommender", "loop", "evaluate", "report"]
    assert all(set(s.upstream) <= set(run[:i]) for i, s in enumerate(RUN))
    folder = Path(__file__).resolve().parents[1] / "rlrf4rec" / "stages"
    declared = []
    for path in sorted(p for p in folder.glob("*.py") if p.stem != "__init__"):
        last = ast.parse(path.read_text()).body[-1]
        assert isinstance(last, ast.Assign) and last.targets[0].id == "STAGE", f"{path.name} does not end with it"
        declared.append(importlib.import_module(f"rlrf4rec.stages.{path.stem}").STAGE)
    assert all(any(d is s for s in (*STAGES, *STEPS)) for d in declared)
    assert len(declared) == len(STAGES) - 5 + len(STEPS)  # the tools: run, verify, track, compare, serve (commands.py)
