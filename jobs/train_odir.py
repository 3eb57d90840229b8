"""Fine-tune the odir classifier with Ray Train.

    python jobs/train_odir.py                      # demo: generated data, small model, local Ray
    ray job submit --working-dir . -- python jobs/train_odir.py --data s3://bucket/dataset --workers 4 --use-gpu

Flags: python jobs/train_odir.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit --working-dir .` without an install

from eyeray.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main("odir"))
