"""`ray job submit --working-dir . -- python ray_jobs/compare.py /abs/runs/a /abs/runs/b`"""

import sys

from rlrf4rec.jobs import run

if __name__ == "__main__":
    sys.exit(run("compare"))
