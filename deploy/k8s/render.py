"""Write jobs/serve_config.yaml into the RayService's `serveConfigV2`, so Kubernetes serves exactly
the Serve config that `serve run` and `serve deploy` use (one source of truth).

    python deploy/k8s/render.py            # rewrite the block in deploy/k8s/rayservice.yaml
    python deploy/k8s/render.py --check    # exit 1 if the block is out of date (CI)

Only the `serveConfigV2: |` block changes; the rest of the manifest (comments included) is kept.
The config is written as plain YAML (anchors and merge keys expanded), so KubeRay's parser sees
the same values as Ray's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SERVE_CONFIG = REPO / "jobs" / "serve_config.yaml"
RAYSERVICE = REPO / "deploy" / "k8s" / "rayservice.yaml"
KEY = "serveConfigV2: |"


class _PlainDumper(yaml.SafeDumper):
    """Writes shared values out in full instead of as &anchors and *aliases."""

    def ignore_aliases(self, data) -> bool:
        return True


def serve_config_block(config_path: Path = SERVE_CONFIG) -> str:
    """The Serve config as plain YAML text (no anchors, keys in the file's order)."""
    config = yaml.safe_load(config_path.read_text())
    return yaml.dump(config, Dumper=_PlainDumper, sort_keys=False, default_flow_style=False, width=1000)


def render(manifest: str, block: str) -> str:
    """`manifest` with the literal block under `serveConfigV2: |` replaced by `block`."""
    lines = manifest.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == KEY), None)
    if start is None:
        raise ValueError(f"no line '{KEY}' in the RayService manifest")
    indent = len(lines[start]) - len(lines[start].lstrip()) + 2
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) >= indent):
        end += 1
    body = [(" " * indent + line if line.strip() else "\n") for line in block.splitlines(keepends=True)]
    return "".join(lines[: start + 1] + body + lines[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if the manifest is out of date")
    args = parser.parse_args(argv)
    current = RAYSERVICE.read_text()
    wanted = render(current, serve_config_block())
    if current == wanted:
        print(f"{RAYSERVICE.relative_to(REPO)} is up to date with {SERVE_CONFIG.relative_to(REPO)}")
        return 0
    if args.check:
        print(
            f"{RAYSERVICE.relative_to(REPO)} differs from {SERVE_CONFIG.relative_to(REPO)}: "
            "run python deploy/k8s/render.py",
            file=sys.stderr,
        )
        return 1
    RAYSERVICE.write_text(wanted)
    print(f"wrote serveConfigV2 of {RAYSERVICE.relative_to(REPO)} from {SERVE_CONFIG.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
