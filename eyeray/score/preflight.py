"""Scoring settings checked before Ray starts: every --bundle readable and valid (and combinable, or
routable: `eyeray.score.routing`), --input there (a folder or s3://; a PACS answers when listed),
--output writable. Each failure is a one-line
SettingError."""

from __future__ import annotations

from typing import Any

from eyeray.model.bundle import BundleError, read_manifest
from eyeray.preflight import SettingError, check_exists, check_writable
from eyeray.score import routing


def check(cfg) -> list[dict[str, Any]]:
    """`cfg`: a ScoreConfig. Returns the bundles' manifests (reading them only reads JSON)."""
    manifests = []
    for uri in cfg.bundles:
        try:
            manifests.append(read_manifest(uri))
        except BundleError as exc:
            raise SettingError(f"--bundle {exc}; give the bundle/ folder of a finished training run") from exc
        except OSError as exc:  # unreadable (permissions, credentials)
            raise SettingError(f"--bundle {uri} cannot be read ({' '.join(str(exc).split())})") from exc
    try:
        routing.group(manifests, cfg.decision.gate)  # one task (an ensemble), or several with gates to route by
    except BundleError as exc:
        raise SettingError(f"--bundle: {exc}; score them one at a time") from exc
    if len({m["task"] for m in manifests}) > 1 and cfg.decision.override is not None:
        raise SettingError("--thresholds overrides one task's operating point: score the tasks one at a time")
    if cfg.pacs is None:  # a PACS is checked by listing it (eyeray.score.pipeline.inputs)
        check_exists(cfg.input, "--input", "; give the folder or file to score")
    check_writable(cfg.output, "--output")
    return manifests
