"""Local paths and `s3://` URIs behind one fsspec interface.

S3 goes through s3fs with the standard AWS credential chain. An S3-compatible store (MinIO,
a test server) is reached by setting `AWS_ENDPOINT_URL` (or `EYERAY_S3_ENDPOINT`), which
s3fs and pyarrow both read, so Ray workers see the same store as the driver.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import Any

import fsspec


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def s3_endpoint() -> str | None:
    return os.environ.get("EYERAY_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return (filesystem, path inside it) for a local path or a URI."""
    uri = str(uri)
    if uri.startswith("s3://"):
        import s3fs

        endpoint = s3_endpoint()
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint} if endpoint else {})
        return fs, uri[len("s3://") :].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return fsspec.filesystem("file"), os.path.abspath(uri)


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The inverse of `filesystem`: a path inside `fs` as the URI users pass around."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file (local or s3://), making its folder first where folders exist."""
    fs, path = filesystem(uri)
    fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
    fs.pipe(path, data)


def pyarrow_filesystem(uri: str):
    """A pyarrow view of the same s3fs filesystem, for Ray Train's `storage_filesystem`, or None
    for local paths. Going through s3fs keeps one S3 client (credentials, endpoint override) for
    everything eyeray writes."""
    if not is_remote(uri):
        return None
    import pyarrow.fs as pafs

    fs, _ = filesystem(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def ray_storage(uri: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for a Ray Train or Tune RunConfig writing under `uri`:
    the bucket path and a pyarrow view of s3fs for s3://, or an absolute local path and None."""
    fs = pyarrow_filesystem(uri)
    return (filesystem(uri)[1] if fs is not None else os.path.abspath(uri)), fs


def local_copy(uri: str) -> tuple[str, tempfile.TemporaryDirectory | None]:
    """A local path for `uri` (a file or a directory), downloading it when it is remote.

    Returns the path and the temporary directory that holds it (None when nothing was copied);
    keep the latter alive as long as the path is used.
    """
    if not is_remote(uri):
        return os.path.abspath(uri.removeprefix("file://")), None
    fs, path = filesystem(uri)
    tmp = tempfile.TemporaryDirectory(prefix="eyeray-")
    target = os.path.join(tmp.name, posixpath.basename(path.rstrip("/")))
    fs.get(path, target, recursive=fs.isdir(path))
    return target, tmp


def publish_dir(local_dir: str | Path, uri: str, commit_file: str | None = None) -> None:
    """Copy a finished local directory to `uri` so readers never see a half-written one.

    Locally: copy beside the target, then rename into place (atomic on one filesystem).
    Remote object stores have no rename: upload every file, and `commit_file` last, so a
    reader that requires `commit_file` never sees a partial directory.
    """
    local_dir = Path(local_dir)
    if not is_remote(uri):
        target = Path(uri.removeprefix("file://")).absolute()
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        shutil.rmtree(staging)
        shutil.copytree(local_dir, staging)
        staging.chmod(0o755)  # copytree keeps the 0700 of a temporary source directory
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(target)
        return
    fs, path = filesystem(uri)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    if commit_file is not None:
        files.sort(key=lambda p: p.name == commit_file)
    for p in files:
        fs.put_file(str(p), posixpath.join(path, p.relative_to(local_dir).as_posix()))
