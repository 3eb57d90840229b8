"""The end-to-end demo: train on generated data, score a generated archive with the bundle, and
serve it over HTTP for a few requests.

No dataset, no cluster, no download. The archive holds fresh synthetic images (another seed than
training) and a few deliberately broken files, to show that they become error rows.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from eyeray import storage
from eyeray.data import synthetic
from eyeray.tasks import get_task

log = logging.getLogger(__name__)

BROKEN_FILES = {
    "truncated.jpg": b"\xff\xd8\xff\xe0\x00\x10JFIF truncated",
    "empty.png": b"",
    "not-an-image.tiff": b"a text file with an image extension",
}


def make_archive(task: str, root: str | Path, *, images_per_class: int = 10, seed: int = 1) -> Path:
    """A small 'hospital export': synthetic images of the task plus the broken files above."""
    root = Path(root)
    synthetic.make_dataset(get_task(task), root / "export", images_per_class=images_per_class, seed=seed)
    for name, data in BROKEN_FILES.items():
        (root / "export" / name).write_bytes(data)
    return root / "export"


def run(train_config, serve_port: int = 8000) -> dict[str, Any]:
    """Train (eyeray.train.run), score the archive, then serve the bundle and post a few of the
    archive's files to it (one broken); returns all three results for printing."""
    from eyeray import score, train

    result = train.run(train_config)
    base = result.output if not storage.is_remote(result.output) else None
    archive = make_archive(train_config.task, Path(base or ".") / "demo_archive", seed=train_config.seed + 1)
    summary = score.run(
        score.ScoreConfig(bundles=[result.bundle], input=str(archive), output=storage.join(result.output, "scores"))
    )
    images = sorted(p for p in archive.rglob("*") if p.is_file() and p.parent != archive)
    first_per_class = list({p.parent: p for p in reversed(images)}.values())
    posted = (first_per_class + [p for p in images if p not in first_per_class])[:3]  # every class, then more
    answers = serve_images(result.bundle, [*posted, archive / next(iter(BROKEN_FILES))], port=serve_port)
    return {"train": result, "score": summary, "scores": storage.join(result.output, "scores"), "serve": answers}


def serve_images(
    bundle_uri: str, images: list[Path], port: int = 8000, route_prefix: str = "/"
) -> list[dict[str, Any]]:
    """Start the service on `bundle_uri`, post each image as the raw body, print and return the
    answers (with `file` and `status` added), then shut the application down. A plain urllib client:
    what any caller of the HTTP API would do, nothing of the service's own code."""
    from eyeray.model import bundle
    from eyeray.serve import ServeArgs, start, stop

    task = bundle.read_manifest(bundle_uri)["task"]
    url = start(ServeArgs(bundles=[bundle_uri]), port=port, name="eyeray-demo", route_prefix=route_prefix)
    answers = []
    try:
        for path in images:
            req = urllib.request.Request(
                f"{url}/v1/{task}/predict",
                data=Path(path).read_bytes(),
                method="POST",
                headers={"Content-Type": "application/octet-stream"},
            )
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    status, body = resp.status, json.load(resp)
            except urllib.error.HTTPError as exc:
                status, body = exc.code, json.load(exc)
            answers.append({**body, "file": Path(path).name, "status": status})  # status: the HTTP one
            declined = body.get("status") == "declined"
            shown = f"declined: {body['gate']['reason']}" if declined else body.get("labels", body.get("detail"))
            log.info(f"POST {Path(path).name} -> {status} {shown}")
    finally:
        stop("eyeray-demo")
    return answers
