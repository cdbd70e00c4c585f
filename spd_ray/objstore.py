"""Object-store roots: parsing, filesystems, reachability, single objects.

A root may instead be a URI: `s3://bucket/prefix` (AWS or any S3-compatible
server) or `gs://bucket/prefix` (`gcs://` is the same). `is_uri` tells them apart; `file:///abs`
is a local path (`is_uri` is False, `local_path` strips the scheme); any other `scheme://` is
refused with a ValueError naming the flag. Keep URIs as `str`: `Path("s3://b/x")` mangles them.
Bucket and key segments must be plain names (letters, digits, `.`, `_`, `-`), so every URI maps
to a safe local folder; a URI holding credentials (`s3://key:secret@bucket`) or a query is refused.

Configuration comes from the environment only, so no secret is ever written to a config, a log or
a file. S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN (or ~/.aws, or an
instance role), AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (`http(s)://host:port`: MinIO, Ceph, R2,
moto), AWS_REGION or AWS_DEFAULT_REGION. GCS: Application Default Credentials
(GOOGLE_APPLICATION_CREDENTIALS). Errors name the URI and the variable to check, never a value.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from spd_ray.errors import InputError, NotFoundError
from spd_ray.io import check_name

PROBE_PREFIX = ".spd-ray-probe-"  # a probe object or file: written, read back, deleted

if TYPE_CHECKING:
    import pyarrow.fs as pafs


SCHEMES = {"s3": "s3", "gs": "gs", "gcs": "gs"}  # as written -> as stored
_URI = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+)://(.*)", re.S)
_MANGLED = re.compile(r"(s3|gs|gcs):/[^/]")  # what Path() leaves of a URI
ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # the first one set wins
_SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 30.0  # on Linux a stall limit (no byte for this long), not a total
RETRY_ATTEMPTS = 4
CHECK_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class RemoteURI:
    """A parsed object-store URI: `scheme` ("s3" or "gs"), `bucket`, and `key` (the prefix in
    the bucket, "" for the bucket itself)."""

    scheme: str
    bucket: str
    key: str

    @property
    def path(self) -> str:
        """The path pyarrow's filesystem takes: `bucket/key`."""
        return f"{self.bucket}/{self.key}" if self.key else self.bucket

    def __str__(self) -> str:
        return f"{self.scheme}://{self.path}"


def _is_file_uri(root: str) -> bool:
    return root[:7].lower() == "file://"


def is_uri(root: str | Path) -> bool:
    """True for an object-store root (`scheme://...`, also unsupported schemes, which
    `parse_uri` refuses); False for local paths and `file://` URIs."""
    text = str(root)
    if isinstance(root, Path) and _MANGLED.match(text):
        raise ValueError(f"{text!r} is a URI turned into a Path (which drops a '/'); pass a str")
    return bool(_URI.fullmatch(text)) and not _is_file_uri(text)


def local_path(root: str | Path) -> Path:
    """A local root as a Path: `~` expanded, `file:///abs` accepted. A URI is an error."""
    text = str(root)
    if _is_file_uri(text):
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise InputError(f"{text}: a file:// URI must name this machine (file:///abs/path)")
        return Path(unquote(parts.path))
    if is_uri(text):
        raise InputError(f"{text} is an object-store URI, not a local path")
    return Path(text).expanduser()


def parse_uri(uri: str | RemoteURI, flag: str = "--out") -> RemoteURI:
    """Split an object-store URI; a ValueError naming `flag` for anything this module cannot store
    to safely (other schemes, credentials or a query in the URI, `.`/`..`/empty segments)."""
    if isinstance(uri, RemoteURI):
        return uri
    match = _URI.fullmatch(uri)
    if not match or _is_file_uri(uri):
        raise InputError(f"{flag} {uri!r} is not an object-store URI (s3://bucket/prefix)")
    scheme, rest = match.group(1).lower(), match.group(2)
    if "@" in rest.split("/", 1)[0]:
        raise InputError(
            f"{flag} {scheme}://***@...: credentials do not belong in a URI (it is written into "
            "configs); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY instead"
        )
    if scheme not in SCHEMES:
        raise InputError(
            f"{flag} {uri}: unsupported scheme {scheme}://; use s3://bucket/prefix, "
            "gs://bucket/prefix or a local path"
        )
    if "?" in rest or "#" in rest:
        raise InputError(
            f"{flag} {uri}: a query or fragment is not supported; configure the endpoint and "
            f"region with {ENDPOINT_VARS[1]} and AWS_DEFAULT_REGION"
        )
    segments = rest.rstrip("/").split("/")
    for segment in segments:
        check_name(segment, f"{flag} {uri}: path segment")
    return RemoteURI(SCHEMES[scheme], segments[0], "/".join(segments[1:]))


def join(uri: str | RemoteURI, *names: str) -> str:
    """`uri/name/...` for checked names (one path segment each)."""
    u = parse_uri(uri, "uri")
    checked = [check_name(n, f"{u}: name") for n in names]
    key = "/".join(([u.key] if u.key else []) + checked)
    return str(RemoteURI(u.scheme, u.bucket, key))


def _endpoint(flag: str) -> tuple[str, str, str] | None:
    """(variable, scheme, host:port) of the S3 endpoint the environment names, or None (AWS)."""
    for var in ENDPOINT_VARS:
        value = os.environ.get(var, "")
        if not value:
            continue
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
            raise InputError(
                f"{flag}: {var} must be http(s)://host[:port] without credentials "
                f"(it is {len(value)} characters, not shown)"
            )
        return var, parts.scheme, parts.netloc
    return None


def _where(u: RemoteURI) -> tuple[str, str]:
    """(the endpoint in words, the variables that pick it) - for error messages."""
    if u.scheme == "gs":
        return "Google Cloud Storage", "GOOGLE_APPLICATION_CREDENTIALS"
    endpoint = _endpoint("uri")
    if endpoint is None:
        return "AWS S3", f"{ENDPOINT_VARS[1]} (unset: AWS itself)"
    var, scheme, netloc = endpoint
    return f"{scheme}://{netloc}", var


def remote_fs(
    uri: str | RemoteURI, flag: str = "--out", fast: bool = False
) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for an object-store URI. `fast` drops the retries and
    shortens the timeouts (for `check_reachable`); otherwise network calls are retried a few times
    with backoff."""
    import pyarrow.fs as pafs

    u = parse_uri(uri, flag)
    if u.scheme == "gs":
        limit = timedelta(seconds=CONNECT_TIMEOUT_S if fast else REQUEST_TIMEOUT_S)
        return pafs.GcsFileSystem(retry_time_limit=limit), u.path
    endpoint = _endpoint(flag)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region is None and endpoint is None:
        try:
            region = pafs.resolve_s3_region(u.bucket)
        except OSError as err:
            raise InputError(_explain(err, u, flag)) from None
    return pafs.S3FileSystem(
        region=region,
        scheme=endpoint[1] if endpoint else None,
        endpoint_override=endpoint[2] if endpoint else None,
        connect_timeout=2.0 if fast else CONNECT_TIMEOUT_S,
        request_timeout=3.0 if fast else REQUEST_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1 if fast else RETRY_ATTEMPTS),
    ), u.path


def _redact(text: str) -> str:
    for var in _SECRET_VARS:
        value = os.environ.get(var, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    return " ".join(text.split())


def _explain(err: OSError, u: RemoteURI, flag: str) -> str:
    """One line naming the URI, what went wrong and the variable to check."""
    text = _redact(str(err))
    code_match = re.search(r"AWS Error (\w+)", text)
    code = code_match.group(1) if code_match else ""
    detail = text.split("Details: ", 1)[-1] if "Details: " in text else (code or text)
    where, var = _where(u)
    if code == "NETWORK_CONNECTION" or "curlCode" in text:
        return f"{flag} {u}: cannot reach {where} ({detail[:160]}); check {var} and the network"
    if code in ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH") or re.search(
        r"\b(403|Forbidden|Unauthorized|EXPIRED_TOKEN|PERMISSION_DENIED)\b", text
    ):
        creds = var if u.scheme == "gs" else "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
        return f"{flag} {u}: access denied by {where} ({code or 'forbidden'}); check {creds}"
    if code == "NO_SUCH_BUCKET":
        return f"{flag} {u}: bucket {u.bucket!r} does not exist at {where}"
    return f"{flag} {u}: {text[:200]}"


def _probe(u: RemoteURI, flag: str, write: bool) -> None:
    import pyarrow.fs as pafs

    fs, _ = remote_fs(u, flag, fast=True)
    try:
        info = fs.get_file_info(u.bucket)
        if info.type == pafs.FileType.NotFound:
            where, var = _where(u)
            raise InputError(
                f"{flag} {u}: bucket {u.bucket!r} does not exist at {where} (check {var}); "
                "create it or fix the URI"
            )
        if write:
            probe = f"{u.path}/{PROBE_PREFIX}{secrets.token_hex(8)}"
            _put(fs, probe, b"")
            fs.delete_file(probe)
    except OSError as err:
        raise InputError(_explain(err, u, flag)) from None


def check_reachable(
    uri: str, flag: str = "--out", write: bool = False, timeout_s: float = CHECK_TIMEOUT_S
) -> None:
    """Fail in seconds, with a one-line ValueError naming `uri` and the variable to check, when the
    endpoint cannot be reached, the bucket does not exist or the credentials are refused (`write`:
    also when an object cannot be written under the prefix). Whatever the SDK does (credential
    lookups, retries), the check gives up after `timeout_s`."""
    u = parse_uri(uri, flag)
    if u.scheme == "s3":
        _endpoint(flag)  # a malformed endpoint variable is reported as such
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            _probe(u, flag, write)
            outcome.append(None)
        except BaseException as err:  # handed to the caller's thread
            outcome.append(err)

    thread = threading.Thread(target=run, name="spd-ray-storage-check", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        where, var = _where(u)
        raise InputError(f"{flag} {u}: no answer from {where} in {timeout_s:g} s; check {var}")
    if outcome[0] is not None:
        raise outcome[0]


def _put(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as out:
        out.write(data)


def exists(uri: str) -> bool:
    """Whether an object, or any object under the prefix, exists at `uri`."""
    import pyarrow.fs as pafs

    fs, path = remote_fs(uri, "uri")
    return bool(fs.get_file_info(path).type != pafs.FileType.NotFound)


def read_bytes(uri: str) -> bytes:
    """The object at `uri`; FileNotFoundError naming it when there is none."""
    import pyarrow.fs as pafs

    fs, path = remote_fs(uri, "uri")
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise NotFoundError(f"{uri}: no such object")
    with fs.open_input_stream(path) as f:
        return bytes(f.read())


def write_bytes(uri: str, data: bytes) -> None:
    """Replace the object at `uri` with `data` (whole: readers see the old or the new object)."""
    fs, path = remote_fs(uri, "uri")
    _put(fs, path, data)


def delete(uri: str) -> None:
    """Delete the object at `uri` (none there is fine)."""
    import pyarrow.fs as pafs

    fs, path = remote_fs(uri, "uri")
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)
