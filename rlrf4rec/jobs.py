"""Entry points of `ray job submit`: `ray_jobs/<stage>.py` calls `run(<subcommand>)`.

A submitted job runs with whatever `python` the head's `ray start` found on PATH, not the submitter's. Without the
project's environment the first import fails deep inside the CLI (e.g. `No module named 'pyarrow'`); here it fails
first, naming the interpreter and the fix. Standard library only, so the check itself always runs.
"""

from __future__ import annotations

import importlib.util
import sys

REQUIRED = ("pyarrow", "yaml", "numpy", "ray")  # what any stage imports before its own work


def missing_modules(names: tuple[str, ...] = REQUIRED) -> list[str]:
    return [name for name in names if importlib.util.find_spec(name) is None]


def environment_error(missing: list[str], script: str) -> str:
    return (
        f"{script}: {', '.join(missing)} not importable by {sys.executable}. A submitted job runs with the Python "
        "that `ray start` found on PATH: activate the project's environment (`source .venv/bin/activate`) before "
        "`ray start --head` on every node, or install the project there (`pip install -e .`)."
    )


def run(subcommand: str) -> int:
    missing = missing_modules()
    if missing:
        print(environment_error(missing, sys.argv[0]), file=sys.stderr)
        return 2
    from rlrf4rec.cli import main

    return main([subcommand, *sys.argv[1:]])
