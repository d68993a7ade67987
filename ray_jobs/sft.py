"""`ray job submit --working-dir . -- python ray_jobs/sft.py --config C [--force] [--a.b=c]`"""

import sys

from rlrf4rec.jobs import run

if __name__ == "__main__":
    sys.exit(run("sft"))
