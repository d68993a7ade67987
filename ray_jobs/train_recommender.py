"""`ray job submit --working-dir . -- python ray_jobs/train_recommender.py --config configs/ml100k-cpu.yaml`"""

import sys

from rlrf4rec.jobs import run

if __name__ == "__main__":
    sys.exit(run("train-recommender"))
