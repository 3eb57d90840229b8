"""A real Orthanc PACS for tests: started on 127.0.0.1 with free ports and its own storage folder,
with the DICOMweb plugin, and stopped by its own process id.

Not a test module. `running_orthanc(tmp_dir)` is a context manager (and `http_server`, a real HTTP
server in a thread, puts faults or a gateway in front of it); the `Orthanc` binary comes from
the Debian packages `orthanc orthanc-dicomweb` that `.ci/run` installs.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class OrthancServer:
    url: str  # REST root, e.g. http://127.0.0.1:8042
    dicomweb: str  # DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web
    pid: int
    auth: tuple[str, str] | None  # (user, password) of the first registered user, for the test's own REST calls
    log: Path

    def rest(self, method: str, path: str, **kwargs) -> requests.Response:
        """A call to Orthanc's own REST API (not DICOMweb), failing the test on an error status."""
        response = requests.request(method, self.url + path, auth=self.auth, timeout=30, **kwargs)
        response.raise_for_status()
        return response

    def upload(self, data: bytes) -> str:
        """Store one DICOM file through Orthanc's REST `POST /instances`; returns Orthanc's instance id."""
        answer = self.rest("POST", "/instances", data=data, headers={"Content-Type": "application/dicom"}).json()
        if answer.get("Status") not in ("Success", "AlreadyStored"):
            raise AssertionError(f"Orthanc did not store the file: {answer}")
        return answer["ID"]

    def instance_count(self) -> int:
        return len(self.rest("GET", "/instances").json())

    def clear(self) -> None:
        """Delete every patient (and so every study and instance), for tests that need an empty PACS."""
        for patient in self.rest("GET", "/patients").json():
            self.rest("DELETE", f"/patients/{patient}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def orthanc_binary() -> str:
    """The Orthanc executable; without it the PACS tests are skipped and say what to install (as the
    model card's Chromium test does). `.ci/run` installs it, so CI always runs them."""
    binary = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
    if binary is None or not DICOMWEB_PLUGIN.exists():
        pytest.skip(
            "Orthanc or its DICOMweb plugin is missing: install them as .ci/run's apt step does "
            "(apt-get update && apt-get install -y orthanc orthanc-dicomweb)"
        )
    return binary


def _config(tmp_dir: Path, http_port: int, dicom_port: int, users: dict[str, str] | None, extra: dict) -> dict:
    return {
        "Name": "eyeray-test",
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomServerEnabled": False,  # DICOMweb only: no DIMSE listener
        "StorageDirectory": str(tmp_dir / "storage"),
        "IndexDirectory": str(tmp_dir / "index"),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": bool(users),
        "RegisteredUsers": dict(users or {}),
        "SaveJobs": False,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        **extra,
    }


def _wait_until_up(process: subprocess.Popen, url: str, auth: tuple[str, str] | None, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {process.returncode} while starting; log {log}:\n{_tail(log)}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(url + "/system", auth=auth, timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"Orthanc did not answer {url}/system within {START_TIMEOUT_S:.0f} s; log {log}:\n{_tail(log)}")


def _tail(log: Path, lines: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no log)"


def _stop(process: subprocess.Popen) -> None:
    """Stop this Orthanc by its own process id. SIGKILL, not SIGTERM: a clean shutdown waits 2 s for
    its HTTP server, and the storage is a throwaway temporary folder."""
    if process.poll() is None:
        process.kill()
    process.wait(timeout=15)


@contextlib.contextmanager
def running_orthanc(
    tmp_dir: str | Path, users: dict[str, str] | None = None, *, config: dict | None = None
) -> Iterator[OrthancServer]:
    """Start Orthanc with storage under `tmp_dir`, listening on 127.0.0.1 only, with basic-auth `users`
    ({name: password}) when given and further configuration options `config` (e.g. "LuaScripts");
    yield an `OrthancServer`; stop it on exit. A port that another process took between choosing and
    binding gets a second try with fresh ports."""
    binary = orthanc_binary()
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    auth = next(iter(users.items())) if users else None
    for attempt in range(3):
        http_port, dicom_port = free_port(), free_port()
        config_file = tmp_dir / "orthanc.json"
        config_file.write_text(json.dumps(_config(tmp_dir, http_port, dicom_port, users, config or {}), indent=2))
        log = tmp_dir / f"orthanc-{attempt}.log"
        url = f"http://127.0.0.1:{http_port}"
        with open(log, "wb") as log_file:
            process = subprocess.Popen(
                [binary, "--no-jobs", str(config_file)], stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp_dir
            )
        try:
            _wait_until_up(process, url, auth, log)
        except RuntimeError:
            _stop(process)
            if attempt == 2:
                raise
            continue
        try:
            yield OrthancServer(url=url, dicomweb=url + "/dicom-web", pid=process.pid, auth=auth, log=log)
        finally:
            _stop(process)
        return


@contextlib.contextmanager
def http_server(handle: Callable[[BaseHTTPRequestHandler, bytes], tuple[int, dict[str, str], bytes]]) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 answering every GET/POST with handle(request, body) -> (status,
    headers, body); yields its root URL and shuts down (its own thread) on exit."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            status, headers, payload = handle(self, self.rfile.read(length) if length else b"")
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        do_GET = do_POST = serve

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads, server.block_on_close = True, False
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def forward(target: str, request: BaseHTTPRequestHandler, body: bytes, path: str | None = None):
    """Pass one request on to Orthanc (`target` is its REST root) and its answer back."""
    headers = {k: v for k, v in request.headers.items() if k.lower() in ("accept", "content-type")}
    answer = requests.request(request.command, target + (path or request.path), headers=headers, data=body, timeout=30)
    return answer.status_code, {k: v for k, v in answer.headers.items() if k.lower() == "content-type"}, answer.content
