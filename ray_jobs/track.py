"""`ray job submit --working-dir . -- python ray_jobs/track.py --config configs/ml100k-cpu.yaml --run_dir=/abs/run --tracking-uri=http://mlflow:5000`"""

import sys

from rlrf4rec.jobs import run

if __name__ == "__main__":
    sys.exit(run("track"))
