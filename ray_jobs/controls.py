"""`rlrf4rec controls` as a Ray job: baselines, knowledge variants and controls on valid users, several seeds.

ray job submit --working-dir . -- python ray_jobs/controls.py --config configs/ml100k-cpu.yaml --seeds 3 [--a.b=c ...]
"""

import sys

from rlrf4rec.jobs import run

if __name__ == "__main__":
    sys.exit(run("controls"))
