"""Score every image of an archive with a model bundle (Ray Data): one Parquet row per file.

    python jobs/score_archive.py --bundle runs/oct-1/bundle --input /archive --output /results
    ray job submit --working-dir . -- python jobs/score_archive.py --bundle s3://models/oct-1/bundle \
        --input s3://pacs-export/2026-11-21/ --output s3://results/2026-11-21/ --gpus-per-actor 1 --actors 8

Re-running with the same --output scores only the files not yet scored by that bundle version.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit --working-dir .` without an install

from eyeray.cli import score_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(score_main())
