"""eyeray's own lines: every module logs to a child of the "eyeray" logger, and each entry point
(the CLI, the jobs, a Ray Train worker) calls `setup` once, so a user reads eyeray's progress and
results in one format, apart from library output."""

from __future__ import annotations

import logging
import sys

NAME = "eyeray"
FORMAT = "[eyeray] %(message)s"


def setup(verbose: bool = False) -> logging.Logger:
    """Show eyeray's INFO lines (DEBUG with `verbose`) on stdout; idempotent."""
    logger = logging.getLogger(NAME)
    if not any(h.get_name() == NAME for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.set_name(NAME)
        handler.setFormatter(logging.Formatter(FORMAT))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False  # one line per message, whatever the application does with the root logger
    return logger
