"""`ray job submit --working-dir . -- python ray_jobs/arms.py --config C [--pairs 50,250] [--flips 0.5] [--a.b=c]`"""

import sys

from rlrf4rec.jobs import run

if __name__ == "__main__":
    sys.exit(run("arms"))
