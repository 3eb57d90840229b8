"""Fail fast: `SettingError`, and the checks of settings that every route shares.

A route's driver checks what it can before Ray starts (eyeray.train.preflight,
eyeray.score.preflight, eyeray.sweep.preflight), so a wrong flag costs seconds, not a cluster
start and a traceback from every worker. A `SettingError` is a setting the user must change: its
message is one line that names the flag and says what to change; the command line prints it
and exits with status 2 (eyeray.cli).
"""

from __future__ import annotations

import os
import posixpath
import uuid

from eyeray import storage

PROBE = ".eyeray-write-probe"


class SettingError(ValueError):
    """A setting the user must change. The message is one line that names the flag (`--image-size
    64 is too small for xception ...; use ...`)."""


def check_exists(uri: str, flag: str, what: str = "") -> None:
    """`uri` (local or s3://) exists and can be read with these credentials."""
    try:
        fs, path = storage.filesystem(uri)
        found = fs.exists(path)
    except Exception as exc:  # no credentials, no such bucket, endpoint unreachable
        raise SettingError(f"{flag} {uri}: cannot be read ({_reason(exc)}){what}") from exc
    if not found:
        raise SettingError(f"{flag} {uri} does not exist (or is not readable with these credentials){what}")


def check_writable(uri: str, flag: str = "--output") -> None:
    """`uri` is a folder (local or s3://) this process can write into: a probe file is written
    and removed. A local folder that does not exist yet is created and removed again, so a
    refused run leaves nothing behind."""
    if storage.is_remote(uri):
        _check_remote_writable(uri, flag)
        return
    _, path = storage.filesystem(uri)
    missing = []  # folders to create, the deepest first
    existing = path
    while not os.path.exists(existing):
        missing.append(existing)
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "is a file" if existing == path else f"is inside {existing}, which is a file"
        raise SettingError(f"{flag} {uri} {where}; choose a folder")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f"{PROBE}-{uuid.uuid4().hex[:8]}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise SettingError(f"{flag} {uri} is not writable ({_reason(exc)}); choose another {flag}") from exc
    finally:
        for folder in missing:
            try:
                os.rmdir(folder)
            except OSError:
                break


def _check_remote_writable(uri: str, flag: str) -> None:
    try:
        fs, path = storage.filesystem(uri)
        if fs.isfile(path):
            raise SettingError(f"{flag} {uri} is a file; choose a folder")
        probe = posixpath.join(path, f"{PROBE}-{uuid.uuid4().hex[:8]}")
        fs.pipe(probe, b"")
        fs.rm(probe)
    except SettingError:
        raise
    except Exception as exc:  # no credentials, no such bucket, access denied, endpoint unreachable
        raise SettingError(f"{flag} {uri} is not writable ({_reason(exc)}); choose another {flag}") from exc


def _reason(exc: BaseException) -> str:
    """An exception as a few words on one line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def one_line(exc: BaseException) -> str:
    """An error message on one line (a multi-line one joined with '; ')."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines) or type(exc).__name__
