#!/usr/bin/env bash
# Create benchmarks/.recbole-venv: RecBole 1.2.1 and what its lower-level API imports, for sasrec_vs_recbole.py.
#
# RecBole is a benchmark-only dependency with pins that clash with the project (ray<=2.6.3, numpy<2 through
# np.float_), so it gets its own venv. It is installed with --no-deps and its imports are satisfied by hand:
#   numpy<2 (np.float_), hence pandas<2.3, scipy<1.14, scikit-learn<1.6;
#   pyyaml, colorlog, colorama, tensorboard, texttable, tqdm: imported by recbole.config / data / model / trainer
#   (colorlog and colorama at the exact versions RecBole 1.2.1 declares).
# Not installed: ray (only recbole.quick_start imports ray.tune; the benchmark uses Config, create_dataset,
# data_preparation, SASRec and Trainer directly), plotly, psutil, tabulate, thop (quick_start / hyper-tuning only).
#
# Usage: bash benchmarks/setup_recbole.sh [--force]    (PYTHON=python3.11 to pick the interpreter)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.recbole-venv"
PYTHON="${PYTHON:-python3}"
MARKER="$VENV/.installed"

if [[ "${1:-}" == "--force" ]]; then
    rm -rf "$VENV"
elif [[ -f "$MARKER" ]]; then
    echo "recbole venv ready: $VENV"
    exit 0
fi

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" --no-deps "recbole==1.2.1"
# pip then reports recbole's unmet requirements (ray, thop, ...): expected, they are left out on purpose.
"${PIP[@]}" "numpy<2" "pandas<2.3" "scipy<1.14" "scikit-learn<1.6" \
    pyyaml "colorlog==4.7.2" "colorama==0.4.4" tensorboard texttable tqdm

# RecBole reloads its best checkpoint with torch.load on a pickled config; the runner sets this too.
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 "$VENV/bin/python" - <<'PY'
import torch
from recbole.config import Config  # noqa: F401
from recbole.data import create_dataset, data_preparation  # noqa: F401
from recbole.model.sequential_recommender import SASRec  # noqa: F401
from recbole.trainer import Trainer  # noqa: F401
import recbole, numpy
print(f"recbole {recbole.__version__}, torch {torch.__version__}, numpy {numpy.__version__}")
PY
"$VENV/bin/python" -m pip freeze --disable-pip-version-check > "$MARKER"
echo "recbole venv ready: $VENV"
