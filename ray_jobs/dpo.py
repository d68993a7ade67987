"""`ray job submit --working-dir . -- python ray_jobs/dpo.py --config C --pairs P [--policy D] [--name N] [--a.b=c]`"""

import sys

from rlrf4rec.jobs import run

if __name__ == "__main__":
    sys.exit(run("dpo"))
