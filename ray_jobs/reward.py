"""`ray job submit --working-dir . -- python ray_jobs/reward.py --config configs/ml100k-cpu.yaml [--a.b=c ...]`"""

import sys

from rlrf4rec.jobs import run

if __name__ == "__main__":
    sys.exit(run("reward"))
