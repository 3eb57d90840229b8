"""A small DICOMweb client: QIDO-RS to list a PACS's instances, WADO-RS to read one, STOW-RS to
write results back.

Why its own module, at the bottom: scoring reads instances inside Ray Data CPU tasks and writing back
runs in Ray tasks too, so everything here is picklable, keeps no secret in memory longer than one
request, and sorts failures into `PacsError` (permanent: fix the setting or the data) and
`PacsUnavailable` (transient: down, slow, overloaded), so Ray can be told to retry the second only.
There is deliberately no retry loop here: Ray retries tasks, and a re-run resumes by SOP Instance UID.
STOW-RS is idempotent by UID (instances the study already holds are not sent again), so a retried
write-back never creates duplicates.

Tested against a real Orthanc 1.10 with its DICOMweb plugin 1.7 (tests/test_dicomweb.py).
"""

from __future__ import annotations

import base64
import functools
import http.client
import io
import json
import os
import re
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import pydicom
import requests

# Tags as DICOM JSON keys (PS3.18 F.2): the attributes this client reads from QIDO-RS and STOW-RS answers.
STUDY_DATE, MODALITY, SOP_UID = "00080020", "00080060", "00080018"
STUDY_UID, SERIES_UID = "0020000D", "0020000E"
FAILED_SOP_SEQUENCE, REFERENCED_SOP_UID, FAILURE_REASON = "00081198", "00081155", "00081197"

# Ask for the file as stored: `transfer-syntax=*` stops the PACS from transcoding (a DICOMweb server
# otherwise transcodes to Explicit VR Little Endian, losing nothing but time and bandwidth).
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
DICOM_JSON = "application/dicom+json"

# STOW-RS failure reasons (PS3.4 Table GG.4-1 and PS3.18 Table 10.5.3-2) worth a name in an error.
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such SOP instance",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
    0xC122: "transfer syntax not supported",
}
TRANSIENT_STATUS = {408, 429}  # request timeout, too many requests; and every 5xx

_DATE_RANGE = re.compile(r"^(\d{8})?(-)?(\d{8})?$")
_MODALITY = re.compile(r"^[A-Z0-9_ ]{1,16}$")
# Anything shaped like a DICOM UID (digits, at least three dot-separated components): a PACS's own error
# text can quote one, and messages reach logs, which must not hold identifiers (issue 26).
_UID_LIKE = re.compile(r"\b\d+(?:\.\d+){2,}\b")
_INSTANCE_URI = re.compile(
    r"^(?P<root>https?://.+)/studies/(?P<study>[^/]+)/series/(?P<series>[^/]+)/instances/(?P<sop>[^/]+)$"
)


def is_dicomweb(uri: str) -> bool:
    """An http(s):// URI: a DICOMweb root or instance (eyeray reads no other web addresses)."""
    return str(uri).startswith(("http://", "https://"))


class PacsError(Exception):
    """The PACS refused or cannot serve a request, and asking again will not help (wrong URL,
    credentials, a missing instance, refused data). The message is one line naming the URL."""


class PacsUnavailable(PacsError):
    """The PACS is down, slow or overloaded (connection refused, timeout, 5xx, 408, 429): worth
    retrying later. Ray tasks retry on this class only."""


@dataclass(frozen=True)
class Pacs:
    """Where a DICOMweb service is and how to authenticate to it.

    Secrets live in files (a mounted Kubernetes secret, say), never in this object: each request reads
    them afresh, so a rotated token is picked up without restarting, and the repr, pickles sent to Ray
    workers and logs hold only the file paths. `timeout_s` bounds connecting and each wait for data.
    """

    url: str  # the DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web
    token_file: str | None = None  # bearer token (Authorization: Bearer ...)
    user: str | None = None  # HTTP basic auth, with the password in `password_file`
    password_file: str | None = None
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"PACS url must be an http:// or https:// DICOMweb root, got {self.url!r}")
        if parts.username is not None or parts.password is not None:
            raise ValueError("PACS url must not carry credentials: use token_file, or user and password_file")
        if parts.query or parts.fragment:
            raise ValueError(f"PACS url must be the DICOMweb root, without a query or fragment: {self.url!r}")
        object.__setattr__(self, "url", self.url.rstrip("/"))
        if self.token_file is not None and (self.user is not None or self.password_file is not None):
            raise ValueError("PACS authentication: give either token_file (bearer) or user and password_file (basic)")
        if (self.user is None) != (self.password_file is None):
            raise ValueError("PACS basic authentication needs both user and password_file")
        if self.user is not None and (":" in self.user or not self.user):
            raise ValueError("PACS user must be non-empty and must not contain ':' (HTTP basic authentication)")
        if not self.timeout_s > 0:
            raise ValueError(f"PACS timeout_s must be positive, got {self.timeout_s}")

    def auth_header(self) -> dict[str, str]:
        """The Authorization header for one request, read from the secret files now; {} without auth."""
        if self.token_file is not None:
            return {"Authorization": f"Bearer {_read_secret(self.token_file, 'token file').strip()}"}
        if self.user is not None and self.password_file is not None:
            # Only line endings are stripped: a password may end in a space, a file written by `echo` ends in \n.
            password = _read_secret(self.password_file, "password file").rstrip("\r\n")
            credentials = base64.b64encode(f"{self.user}:{password}".encode()).decode("ascii")
            return {"Authorization": f"Basic {credentials}"}
        return {}


def _read_secret(path: str, what: str) -> str:
    try:
        value = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise PacsError(f"cannot read the PACS {what} {path}: {e.strerror or type(e).__name__}") from None
    if not value.strip():
        raise PacsError(f"the PACS {what} {path} is empty")
    return value


@dataclass(frozen=True)
class Instance:
    """One SOP instance on a PACS. `uri` is its WADO-RS URL, the stable id eyeray rows store as `path`
    (and `Instance.from_uri` reads back, for a resumed run)."""

    pacs_url: str
    study_uid: str
    series_uid: str
    sop_uid: str
    modality: str = ""

    @property
    def uri(self) -> str:
        return _instance_url(self.pacs_url, self.study_uid, self.series_uid, self.sop_uid)

    @classmethod
    def from_uri(cls, uri: str) -> Instance:
        match = _INSTANCE_URI.match(uri)
        if match is None:
            raise ValueError(f"not a DICOMweb instance URI (.../studies/S/series/S/instances/I): {uri!r}")
        return cls(match["root"], unquote(match["study"]), unquote(match["series"]), unquote(match["sop"]), modality="")


@dataclass(frozen=True)
class StoreResult:
    """What one `store_instances` call did, by SOP Instance UID (each sorted)."""

    stored: tuple[str, ...]
    already_present: tuple[str, ...]


def _instance_url(root: str, study: str, series: str, sop: str) -> str:
    study, series, sop = (quote(uid, safe="") for uid in (study, series, sop))
    return f"{root.rstrip('/')}/studies/{study}/series/{series}/instances/{sop}"


# ---------------------------------------------------------------------------------------------- HTTP

_local = threading.local()


def _session() -> requests.Session:
    """One connection pool per thread and process (a forked or Ray worker process starts its own)."""
    session = getattr(_local, "session", None)
    if session is None or getattr(_local, "pid", None) != os.getpid():
        session = _local.session = requests.Session()
        _local.pid = os.getpid()
    return session


def _request(
    pacs: Pacs,
    method: str,
    url: str,
    *,
    what: str,
    params: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
    accept_status: tuple[int, ...] = (),
) -> requests.Response:
    """One HTTP request, its failures turned into one-line PacsError/PacsUnavailable messages.
    `what` finishes the sentence ("for an instance (WADO-RS)") and must hold no identifier. Messages
    name only the DICOMweb root `pacs.url`, never the request URL (its path holds UIDs, and messages
    reach logs); the Authorization header is never logged or put in a message."""
    try:
        response = _session().request(
            method,
            url,
            params=params,
            headers={**(headers or {}), **pacs.auth_header()},
            data=data,
            timeout=(pacs.timeout_s, pacs.timeout_s),
        )
    except requests.exceptions.SSLError as e:
        raise PacsError(f"PACS {pacs.url}: TLS failed {what} ({_reason(e)})") from e
    except requests.exceptions.ConnectTimeout as e:
        raise PacsUnavailable(
            f"PACS {pacs.url} did not accept a connection within the timeout of {pacs.timeout_s:g} s {what}"
        ) from e
    except requests.exceptions.ReadTimeout as e:
        raise PacsUnavailable(
            f"PACS {pacs.url} did not answer within the timeout of {pacs.timeout_s:g} s {what}"
        ) from e
    except (
        requests.exceptions.ConnectionError,
        requests.exceptions.ChunkedEncodingError,
        requests.exceptions.ContentDecodingError,
    ) as e:
        raise PacsUnavailable(f"PACS {pacs.url} unreachable {what}: {_reason(e)}") from e
    except requests.exceptions.RequestException as e:
        raise PacsError(f"PACS {pacs.url}: request failed {what}: {_reason(e)}") from e
    status = response.status_code
    if 200 <= status < 300 or status in accept_status:
        return response
    message = f"PACS {pacs.url} answered {status} {response.reason or ''}".rstrip() + f" {what}"
    if status in (401, 403):
        message += " (check eyeray's PACS credentials: the token file, or the user and password file)"
    detail = _error_detail(response)
    if detail:
        message += f": {detail}"
    if status >= 500 or status in TRANSIENT_STATUS:
        raise PacsUnavailable(message)
    raise PacsError(message)


def _error_detail(response: requests.Response, limit: int = 200) -> str:
    """A short one-line reason from an error body: Orthanc's JSON "Details"/"Message", or plain text,
    with anything that looks like a DICOM UID replaced by "<uid>" (Orthanc's 404 quotes the SOP UID)."""
    text = response.text.strip() if response.content else ""
    if not text:
        return ""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        text = str(body.get("Details") or body.get("Message") or body.get("message") or body.get("error") or "")
    elif body is not None or text.lstrip().startswith("<"):
        return ""  # DICOM JSON or an HTML page: nothing short to quote
    text = _UID_LIKE.sub("<uid>", " ".join(text.split()))  # before cutting, so no UID prefix survives
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reason(exc: BaseException) -> str:
    """The root cause of a requests/urllib3 exception in a few words (their own messages are long
    and name internal objects)."""
    stack, seen = [exc], set()
    while stack:
        e = stack.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, http.client.RemoteDisconnected):
            return "the server closed the connection without answering"
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, ConnectionResetError):
            return "connection reset"
        if isinstance(e, socket.gaierror):
            return "host name not found"
        if isinstance(e, http.client.IncompleteRead):
            return "the answer was cut short"
        if isinstance(e, OSError) and e.strerror:
            return e.strerror.lower()
        nested = [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]
        nested += [x for x in (getattr(e, "reason", None), e.__cause__, e.__context__) if isinstance(x, BaseException)]
        stack.extend(nested)
    return type(exc).__name__


def _json(response: requests.Response, url: str, what: str) -> Any:
    if response.status_code == 204 or not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        parts = urlsplit(url)  # the server, not the path: paths hold UIDs, and messages reach logs
        raise PacsError(
            f"PACS {parts.scheme}://{parts.netloc} answered {what} with something that is not JSON"
        ) from None


# ---------------------------------------------------------------------------------------------- QIDO-RS


def _qido(
    pacs: Pacs, url: str, params: dict[str, str], page_size: int, what: str, *, missing_is_empty: bool = False
) -> list[dict[str, Any]]:
    """Every result of one QIDO-RS query, page by page with `limit`/`offset`.

    Stops at an empty page, or at a page shorter than an earlier one: a server may cap `limit` below
    what was asked (DICOMweb allows that), so a first page shorter than `page_size` costs one more
    request rather than silently losing the rest. A server that ignores `limit` (a page longer than
    asked) is taken as having answered everything; one that ignores `offset` is an error.
    `missing_is_empty`: a 404 means no results (a study the PACS does not hold)."""
    if page_size < 1:
        raise ValueError(f"page_size must be at least 1, got {page_size}")
    results: list[dict[str, Any]] = []
    offset, longest, seen = 0, 0, set()
    while True:
        response = _request(
            pacs,
            "GET",
            url,
            what=what,
            params={**params, "limit": str(page_size), "offset": str(offset)},
            headers={"Accept": DICOM_JSON},
            accept_status=(404,) if missing_is_empty else (),
        )
        if response.status_code == 404:
            return results
        page = _json(response, url, what) or []
        if not isinstance(page, list) or not all(isinstance(item, dict) for item in page):
            raise PacsError(f"PACS {pacs.url} answered {what} with JSON that is not a list of DICOM JSON datasets")
        keys = {_value(item, SOP_UID) or json.dumps(item, sort_keys=True) for item in page}
        if page and keys <= seen:
            raise PacsError(
                f"PACS {pacs.url} returned the same results again at offset {offset} {what}: it ignores `offset`"
            )
        seen |= keys
        results += page
        if not page or len(page) > page_size or len(page) < longest:
            return results
        longest = max(longest, len(page))
        offset += len(page)


def _value(item: dict[str, Any], tag: str) -> str | None:
    """The first value of `tag` in a DICOM JSON dataset, as a stripped string, or None."""
    values = (item.get(tag) or {}).get("Value") or []
    return str(values[0]).strip() if values and values[0] is not None else None


def _date_bounds(study_date: str) -> tuple[str | None, str | None]:
    """(first, last) day of a DICOM date range: "20260101-20261231", "20260101-", "-20261231" or one day.
    Checked here because Orthanc answers a malformed date ("2026") with no results rather than an error."""
    match = _DATE_RANGE.match(study_date.strip())
    if match is None or not (match[1] or match[3]) or (match[2] is None and match[3] is not None):
        raise ValueError(
            "study_date must be a DICOM date or range (YYYYMMDD, YYYYMMDD-YYYYMMDD, YYYYMMDD-, -YYYYMMDD): "
            f"{study_date!r}"
        )
    first, dash, last = match[1], match[2], match[3]
    if dash is None:
        return first, first
    if first and last and first > last:
        raise ValueError(f"study_date range ends before it starts: {study_date!r}")
    return first, last


def _date_matches(value: str | None, bounds: tuple[str | None, str | None]) -> bool:
    digits = re.sub(r"\D", "", value or "")
    if len(digits) != 8:
        return True  # not returned or not a plain date: the server's own match stands
    first, last = bounds
    return (first is None or digits >= first) and (last is None or digits <= last)


def search_instances(
    pacs: Pacs, *, study_date: str | None = None, modalities: tuple[str, ...] = (), page_size: int = 1000
) -> list[Instance]:
    """The PACS's instances whose study falls in `study_date` (a DICOM date range) and whose series
    Modality is one of `modalities` (all when empty), sorted by (study, series, SOP instance UID).

    One instance-level QIDO-RS query (`/instances?StudyDate=..&Modality=..`) per modality: Orthanc
    1.10 matches study- and series-level attributes at instance level, and asking once per modality
    avoids relying on comma-separated value lists, which not every server supports (Orthanc silently
    matches nothing for a backslash-separated one). Results are checked again here against the
    filters, so a server that ignores a filter cannot widen the run."""
    bounds = _date_bounds(study_date) if study_date is not None else None
    wanted = sorted({m.strip().upper() for m in modalities})
    for modality in wanted:
        if not _MODALITY.match(modality):
            raise ValueError(f"not a DICOM Modality code: {modality!r}")
    url = f"{pacs.url}/instances"
    found: dict[str, Instance] = {}
    for modality in wanted or [None]:
        params = {"includefield": f"{STUDY_DATE},{MODALITY}"}
        if study_date is not None:
            params["StudyDate"] = study_date.strip()
        if modality is not None:
            params["Modality"] = modality
        what = "for the QIDO-RS instance search" + (
            f" ({', '.join(f'{k}={v}' for k, v in params.items() if k != 'includefield')})" if len(params) > 1 else ""
        )
        for item in _qido(pacs, url, params, page_size, what):
            study, series, sop = _value(item, STUDY_UID), _value(item, SERIES_UID), _value(item, SOP_UID)
            if not (study and series and sop):
                raise PacsError(f"PACS {pacs.url} returned a result without Study, Series or SOP Instance UID {what}")
            found_modality = _value(item, MODALITY) or ""
            if modality is not None and found_modality and found_modality.upper() != modality:
                continue
            if bounds is not None and not _date_matches(_value(item, STUDY_DATE), bounds):
                continue
            found[sop] = Instance(pacs.url, study, series, sop, found_modality)
    return sorted(found.values(), key=lambda i: (i.study_uid, i.series_uid, i.sop_uid))


def _study_sop_uids(pacs: Pacs, study_uid: str, page_size: int = 1000) -> set[str]:
    """SOP Instance UIDs the PACS holds in one study (empty for an unknown study: Orthanc answers
    200 with [], other servers 404)."""
    url = f"{pacs.url}/studies/{quote(study_uid, safe='')}/instances"
    what = "for the listing of a study's instances"
    items = _qido(pacs, url, {"includefield": SOP_UID}, page_size, what, missing_is_empty=True)
    return {uid for item in items if (uid := _value(item, SOP_UID))}


# ---------------------------------------------------------------------------------------------- WADO-RS


def split_multipart(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart (RFC 2046) body as (headers with lower-case names, content).

    Written here because WADO-RS answers multipart/related and neither requests nor the standard
    library splits binary multipart bodies. The boundary comes from `content_type`; the delimiter
    is CRLF + "--" + boundary (the first may open the body), the close delimiter ends with "--".
    Raises ValueError on a malformed body (the message says "truncated" when the end is missing)."""
    header = Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise ValueError(f"no multipart boundary in Content-Type {content_type!r}")
    delimiter = b"--" + boundary.encode("latin-1")
    if body.startswith(delimiter):
        position = 0
    else:
        position = body.find(b"\r\n" + delimiter)
        if position < 0:
            raise ValueError("multipart body has no delimiter (truncated or not multipart)")
        position += 2
    parts = []
    while True:
        position += len(delimiter)
        if body[position : position + 2] == b"--":
            return parts
        line_end = body.find(b"\r\n", position)
        if line_end < 0:
            raise ValueError("multipart body truncated after a delimiter")
        if body[position:line_end].strip(b" \t"):
            raise ValueError("multipart delimiter followed by unexpected text")
        headers_end = body.find(b"\r\n\r\n", line_end)
        if headers_end < 0:
            raise ValueError("multipart body truncated in a part's headers")
        headers = {}
        for raw in body[line_end + 2 : headers_end].split(b"\r\n"):
            name, colon, value = raw.partition(b":")
            if colon:
                headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        start = headers_end + 4
        end = body.find(b"\r\n" + delimiter, start)
        if end < 0:
            raise ValueError("multipart body truncated: a part has no closing delimiter")
        parts.append((headers, body[start:end]))
        position = end + 2


def retrieve_instance(pacs: Pacs, instance: Instance) -> bytes:
    """The instance's DICOM file (WADO-RS), as the PACS stores it: no transcoding, so compressed pixel
    data stays compressed and eyeray's decoder sees the original. The part may lack the 128-byte
    preamble; eyeray's decoder reads such data."""
    url = _instance_url(pacs.url, instance.study_uid, instance.series_uid, instance.sop_uid)
    what = "for an instance (WADO-RS)"
    response = _request(pacs, "GET", url, what=what, headers={"Accept": WADO_ACCEPT})
    content_type = response.headers.get("Content-Type", "")
    media_type = content_type.split(";")[0].strip().lower()
    if media_type == "application/dicom":
        return response.content
    if media_type != "multipart/related":
        raise PacsError(
            f"PACS {pacs.url} answered {what} with {media_type or 'no Content-Type'}, not multipart/related"
        )
    try:
        parts = split_multipart(response.content, content_type)
    except ValueError as e:
        error = PacsUnavailable if "truncated" in str(e) else PacsError
        raise error(f"PACS {pacs.url} answered {what} with a malformed multipart body: {e}") from None
    files = [
        content
        for headers, content in parts
        if headers.get("content-type", "application/dicom").split(";")[0].strip().lower() == "application/dicom"
    ]
    if len(files) != 1:
        raise PacsError(f"PACS {pacs.url} answered {what} with {len(files)} DICOM parts, expected 1")
    return files[0]


def read(pacs: Pacs, uri: str) -> bytes:
    """The DICOM file an instance URI (`Instance.uri`, a scoring row's `path`) names, from `pacs`."""
    return retrieve_instance(pacs, Instance.from_uri(uri))


def reader(pacs: Pacs) -> Callable[[str], bytes]:
    """`read` bound to `pacs`: what eyeray's decode reads a PACS's files with (picklable, no secret)."""
    return functools.partial(read, pacs)


# ---------------------------------------------------------------------------------------------- STOW-RS


def _file_uids(data: bytes, index: int) -> tuple[str, str]:
    """(SOP Instance UID, Study Instance UID) of a Part-10 file, read without its pixel data."""
    if data[128:132] != b"DICM":
        raise ValueError(
            f"file {index} is not a DICOM Part-10 file (no 'DICM' after the preamble), which STOW-RS requires: "
            "write it with pydicom's save_as(..., enforce_file_format=True)"
        )
    try:
        ds = pydicom.dcmread(
            io.BytesIO(data), stop_before_pixels=True, specific_tags=["SOPInstanceUID", "StudyInstanceUID"]
        )
        sop, study = str(ds.SOPInstanceUID).strip(), str(ds.StudyInstanceUID).strip()
    except Exception as e:  # any parse failure means the same thing here
        raise ValueError(f"file {index} is not a readable DICOM instance with SOP and Study Instance UIDs: {e}") from e
    if not sop or not study:
        raise ValueError(f"file {index} lacks a SOP or Study Instance UID")
    return sop, study


def _failures(body: Any) -> list[tuple[str, int | None]]:
    """(SOP Instance UID, failure reason) for each entry of a STOW-RS answer's FailedSOPSequence."""
    if not isinstance(body, dict):
        return []
    items = (body.get(FAILED_SOP_SEQUENCE) or {}).get("Value") or []
    failures = []
    for item in items:
        if isinstance(item, dict):
            reason = _value(item, FAILURE_REASON)
            failures.append(
                (_value(item, REFERENCED_SOP_UID) or "?", int(reason) if reason and reason.isdigit() else None)
            )
    return failures


def _describe(reason: int | None) -> str:
    if reason is None:
        return "no reason given"
    name = FAILURE_REASONS.get(reason) or ("out of resources" if 0xA700 <= reason <= 0xA7FF else "")
    return f"failure reason 0x{reason:04X}" + (f" {name}" if name else "")


def store_instances(pacs: Pacs, files: list[bytes], study_uid: str) -> StoreResult:
    """Store DICOM Part-10 files into study `study_uid` over STOW-RS, idempotently by SOP Instance UID.

    First lists the study's instances (QIDO-RS) and sends only those it lacks, so a retried Ray task
    never creates duplicates (a PACS may keep both copies of a re-sent instance; Orthanc ignores it).
    After sending, lists the study again: Orthanc's STOW-RS reports success even for an instance its
    own filters dropped, so success here means the PACS lists every instance sent. One not listed yet
    is `PacsUnavailable` (a PACS may index with a delay; a retry sends nothing already there).
    Files for another study, or not Part-10, are a ValueError before anything is sent; an instance the
    PACS refuses (its FailedSOPSequence) is a PacsError naming it and the reason."""
    by_uid: dict[str, bytes] = {}
    for index, data in enumerate(files):
        sop, study = _file_uids(data, index)
        if study != study_uid:
            raise ValueError(f"file {index} belongs to another study than the one it is stored into")
        by_uid.setdefault(sop, data)
    present = _study_sop_uids(pacs, study_uid)
    todo = {sop: data for sop, data in by_uid.items() if sop not in present}
    already = tuple(sorted(set(by_uid) & present))
    if not todo:
        return StoreResult(stored=(), already_present=already)

    boundary = uuid.uuid4().hex
    while any(boundary.encode() in data for data in todo.values()):
        boundary = uuid.uuid4().hex
    body = b"".join(
        b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (boundary.encode(), data) for data in todo.values()
    )
    body += b"--%s--\r\n" % boundary.encode()
    url = f"{pacs.url}/studies/{quote(study_uid, safe='')}"
    what = f"for STOW-RS of {len(todo)} instance(s)"
    response = _request(
        pacs,
        "POST",
        url,
        what=what,
        data=body,
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": DICOM_JSON,
        },
        accept_status=(409,),  # "conflict": some or all refused, with a FailedSOPSequence saying which
    )
    try:
        answer = _json(response, url, what)
    except PacsError:
        answer = None  # a success without a readable body: the listing below is the proof
    failures = _failures(answer)
    if failures or response.status_code == 409:
        reasons = sorted({_describe(reason) for _, reason in failures})
        error = (
            PacsUnavailable
            if failures and all(r is not None and 0xA700 <= r <= 0xA7FF for _, r in failures)
            else PacsError
        )
        if not failures:
            raise error(
                f"PACS {pacs.url} answered 409 Conflict {what}, without a FailedSOPSequence saying which failed"
            )
        others = len(todo) - len(failures)
        raise error(
            f"PACS {pacs.url} refused {len(failures)} of {len(todo)} instance(s) sent by STOW-RS: "
            + "; ".join(reasons)
            + (f"; the other {others} were stored (a retry sends only the refused)" if others else "")
        )
    missing = sorted(set(todo) - _study_sop_uids(pacs, study_uid))
    if missing:
        raise PacsUnavailable(
            f"PACS {pacs.url} accepted {what} but does not list {len(missing)} of them afterwards: "
            "still indexing, or a filter on the PACS dropped them"
        )
    return StoreResult(stored=tuple(sorted(todo)), already_present=already)
