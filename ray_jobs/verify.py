"""`ray job submit --working-dir . -- python ray_jobs/verify.py --config configs/ml100k-cpu.yaml --run_dir=/abs/run`"""

import sys

from rlrf4rec.jobs import run

if __name__ == "__main__":
    sys.exit(run("verify"))
