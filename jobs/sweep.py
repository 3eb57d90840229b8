"""Model selection with Ray Tune: a search space of backbones and training settings, ASHA early
stopping on the task's validation metric, a leaderboard, the best bundle.

    python jobs/sweep.py --task oct --trials 8        # laptop: generated data, small models
    ray job submit --working-dir . -- python jobs/sweep.py --task glaucoma --data s3://bucket/airogs-light \
        --output s3://bucket/sweeps/glaucoma-1 --trials 48 --gpus-per-trial 1 --ensemble-top 3

Flags: python jobs/sweep.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit --working-dir .` without an install

from eyeray.cli import sweep_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(sweep_main())
