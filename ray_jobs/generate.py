"""`rlrf4rec generate` as a Ray job: N preference texts per user, on the cluster the job runs in.

ray job submit --working-dir . -- python ray_jobs/generate.py --config configs/ml1m-gpu.yaml [--a.b=c ...]
"""

import sys

from rlrf4rec.jobs import run

if __name__ == "__main__":
    sys.exit(run("generate"))
