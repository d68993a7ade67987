import subprocess
import sys

PURE = [
    "rlrf4rec",
    "rlrf4rec.schema",
    "rlrf4rec.config",
    "rlrf4rec.formats",
    "rlrf4rec.protocol",
    "rlrf4rec.artifacts",
    "rlrf4rec.assets",
    "rlrf4rec.data",
    "rlrf4rec.pipeline",
    "rlrf4rec.cli",
    "rlrf4rec.metrics",
    "rlrf4rec.cluster",
    "rlrf4rec.prompts",
    "rlrf4rec.generate",
    "rlrf4rec.dpo",
    "rlrf4rec.dpo_trainer",
    "rlrf4rec.charts",
    "rlrf4rec.report",
]
HEAVY = ["ray", "vllm", "trl", "deepspeed", "transformers", "peft"]


def test_pure_modules_load_no_heavy_framework():
    code = (
        f"import importlib, sys\nfor m in {PURE!r}: importlib.import_module(m)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
