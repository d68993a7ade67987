"""Importing the package loads no heavy framework: Ray, vLLM, TRL, DeepSpeed, transformers and PEFT load inside the
functions that use them. Every module of every layer is checked, found by folder, so a new module is covered."""

import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rlrf4rec"
HEAVY = ["ray", "vllm", "trl", "deepspeed", "transformers", "peft"]
# serve.py defines Ray Serve deployments at import time; it is only imported where Serve runs.
IMPORTS_RAY = {"rlrf4rec.serving.serve"}


def _modules(folder: str) -> list[str]:
    return sorted(
        "rlrf4rec." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)
        for p in (PACKAGE / folder).glob("*.py")
        if p.name != "__init__.py"
    )


def test_every_layer_is_found():
    assert {"rlrf4rec.core.schema", "rlrf4rec.core.layout", "rlrf4rec.core.models"} <= set(_modules("core"))
    assert {"rlrf4rec.stages.generate", "rlrf4rec.stages.reward", "rlrf4rec.stages.loop"} <= set(_modules("stages"))
    assert "rlrf4rec.serving.online" in _modules("serving")


def test_modules_load_no_heavy_framework():
    modules = ["rlrf4rec", *_modules("."), *_modules("core"), *_modules("stages"), *_modules("serving")]
    modules = [m for m in modules if m not in IMPORTS_RAY]
    code = (
        f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]"
