#!/usr/bin/env bash
# GPU smoke check on one CUDA GPU, in under 10 minutes: the gpu tests (tests/test_gpu.py: vLLM bf16 replica, GPU
# re-ranker training, ZeRO-3 bf16 DPO, Serve with a GPU re-ranker, one round of the loop) and the generation
# benchmark (vLLM on Ray Data on the GPU vs transformers on CUDA, bf16); then one dated section with their figures
# is appended to benchmarks/RESULTS.md, whether they passed or not (the exit status says which).
#
#   benchmarks/gpu_smoke.sh [--dry-run]     --dry-run: print each command it would run, run nothing
#
# Needs the GPU dependency set (pip install -e ".[gpu,dev]") and the embedded assets (`rlrf4rec assets`, or a
# copied $RLRF4REC_HOME). Environment: PYTHON (default .venv/bin/python), RESULTS (default benchmarks/RESULTS.md),
# TESTS_LIMIT_S and BENCH_LIMIT_S (420 + 150 s: each step is killed at its limit, so the whole stays under 10 min).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
RESULTS=${RESULTS:-benchmarks/RESULTS.md}
TESTS_LIMIT_S=${TESTS_LIMIT_S:-420}
BENCH_LIMIT_S=${BENCH_LIMIT_S:-150}

dry_run=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry_run=1 ;;
        *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
    esac
done

if [[ $dry_run == 1 ]]; then
    scratch='$SCRATCH'
elif "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    scratch=$(mktemp -d "${TMPDIR:-/tmp}/rlrf4rec-gpu-smoke-XXXXXX")
else
    echo "gpu_smoke: no CUDA GPU visible to $PYTHON; run it on a GPU machine" >&2
    exit 1
fi
tests=(timeout -k 10 "$TESTS_LIMIT_S" "$PYTHON" -m pytest tests/test_gpu.py -m gpu -rs -q -p no:cacheprovider
       "--junitxml=$scratch/gpu-tests.xml")
# 16 users x N=4, 128 new tokens, bf16: the CPU sections' work, on the GPU. Its section goes to scratch first and
# into RESULTS.md inside this script's section.
bench=(timeout -k 10 "$BENCH_LIMIT_S" "$PYTHON" benchmarks/generation.py --users 16 --samples 4 --max-new-tokens 128
       --batch-size 32 --dtype bfloat16 --gpus 1 --results "$scratch/generation.md")

if [[ $dry_run == 1 ]]; then
    echo "${tests[*]}"
    echo "${bench[*]}"
    echo "then: append a dated 'GPU smoke' section with both steps' figures to $RESULTS"
    exit 0
fi

run_step() {  # name, command...: runs it, records exit status and seconds in $scratch/<name>.{rc,s,log}
    local name=$1 start rc
    shift
    echo "gpu_smoke: $name: $*"
    start=$(date +%s)
    set +e
    "$@" 2>&1 | tee "$scratch/$name.log"
    rc=${PIPESTATUS[0]}
    set -e
    echo "$rc" >"$scratch/$name.rc"
    echo $(($(date +%s) - start)) >"$scratch/$name.s"
}

started=$(date +%s)
run_step tests "${tests[@]}"
run_step generation "${bench[@]}"

"$PYTHON" - "$scratch" "$RESULTS" "$(($(date +%s) - started))" <<'EOF'
"""Appends the smoke section: machine, each step's status and seconds, per-test outcomes, the benchmark's table."""

import datetime
import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

scratch, results, total_s = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]


def status(name: str) -> str:
    rc = int((scratch / f"{name}.rc").read_text())
    verdict = {0: "passed", 124: "timed out", 137: "killed at its limit"}.get(rc, f"failed (exit {rc})")
    return f"{verdict}, {(scratch / f'{name}.s').read_text().strip()} s"


def version(package: str) -> str:
    try:
        return f"{package} {metadata.version(package)}"
    except metadata.PackageNotFoundError:
        return f"{package} not installed"


def gpu() -> str:
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    try:
        return subprocess.run(query, capture_output=True, text=True, check=True).stdout.strip().splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "unknown GPU (nvidia-smi failed)"


commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
lines = [
    f"\n## {stamp} GPU smoke: gpu tests and generation benchmark (benchmarks/gpu_smoke.sh)\n",
    f"- Machine: {gpu()}; {', '.join(version(p) for p in ('torch', 'vllm', 'ray', 'deepspeed', 'trl'))}; "
    f"rlrf4rec at {commit or 'unknown commit'}.",
    f"- tests/test_gpu.py: {status('tests')}; benchmarks/generation.py: {status('generation')}; "
    f"{total_s} s in all.",
    "",
]
report = scratch / "gpu-tests.xml"
if report.is_file():
    lines += ["| gpu test | outcome | seconds |", "|---|---|---|"]
    for case in ET.parse(report).getroot().iter("testcase"):
        outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        lines.append(f"| {case.get('name')} | {outcome} | {float(case.get('time', 0)):.1f} |")
else:
    lines.append("- No per-test report: pytest did not finish (see the status above).")
section = scratch / "generation.md"
if section.is_file() and "\n## " in section.read_text():
    body = section.read_text().split("\n## ", 1)[1].split("\n", 1)[1]  # without the benchmark's own header
    lines += ["", "Generation benchmark (benchmarks/generation.py, its section):", body.rstrip()]
else:
    lines.append("- No generation figures: the benchmark did not finish (see the status above).")
with open(results, "a") as fh:
    fh.write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF

echo "gpu_smoke: appended to $RESULTS; logs in $scratch"
[[ $(cat "$scratch/tests.rc") == 0 && $(cat "$scratch/generation.rc") == 0 ]]
