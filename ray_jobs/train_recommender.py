"""`ray job submit --working-dir . -- python ray_jobs/train_recommender.py --config configs/ml100k-cpu.yaml`"""

import sys

from rlrf4rec.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-recommender", *sys.argv[1:]]))
