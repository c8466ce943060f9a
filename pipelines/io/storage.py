"""Where stages read and write: one resolved `Location` per `--input` / `--output` URI.

A location (`s3://bucket/prefix`, `file:///abs/dir` or a plain path, made absolute) carries the
non-secret `StorageOptions` (endpoint, region), so one pickled to a Ray worker reaches the same
server. Credentials never live here: s3fs takes them from the AWS chain in whichever process
opens the filesystem, and `redact` scrubs them from text we print. `Location.fs` (fsspec) and
`Location.pyarrow_fs()` (pyarrow, Ray Data) wrap one s3fs: pyarrow's own S3 client ignores
`AWS_ENDPOINT_URL` and sends upload checksums that S3-compatible servers reject (HTTP 411).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import posixpath
import re
import shutil
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

_T = TypeVar("_T")

# botocore retries a request this many times (connection refused, 5xx, throttling) with
# exponential back-off, which rides out an object-store restart of several seconds.
S3_MAX_ATTEMPTS = 10
S3_CONNECT_TIMEOUT_S = 10
S3_READ_TIMEOUT_S = 60
# Whole-operation retries on top of botocore's: an interrupted multipart upload cannot be
# resumed (the server may have forgotten it), so the whole put is sent again.
WRITE_ATTEMPTS = 3

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,253}[a-z0-9]$")


@dataclass(frozen=True)
class StorageOptions:
    """Non-secret settings of the object store. Credentials are never fields."""

    # S3-compatible server, e.g. http://127.0.0.1:9000 (--storage-endpoint); None:
    # AWS_ENDPOINT_URL if set, else AWS itself
    endpoint_url: str | None = None
    region: str | None = None  # signing region; None: AWS_REGION / AWS_DEFAULT_REGION
    max_attempts: int = S3_MAX_ATTEMPTS  # botocore's attempts per request (standard mode)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")

    def with_env_defaults(self) -> StorageOptions:
        """The same options with unset fields taken from the environment of this process."""
        env = os.environ.get
        endpoint = self.endpoint_url or env("AWS_ENDPOINT_URL") or None
        region = self.region or env("AWS_REGION") or env("AWS_DEFAULT_REGION") or None
        if endpoint is not None:
            _check_endpoint(endpoint)
        return StorageOptions(endpoint_url=endpoint, region=region, max_attempts=self.max_attempts)


@dataclass(frozen=True)
class Location:
    """A resolved storage directory (or file) and how to reach it."""

    uri: str  # normalised, no trailing slash: s3://bucket/prefix or file:///abs/dir
    path: str  # the same place as a filesystem path: bucket/prefix or /abs/dir
    options: StorageOptions = field(default_factory=StorageOptions)  # environment applied

    @property
    def is_local(self) -> bool:
        """True for `file://` and plain paths (visible only on this node)."""
        return self.uri.startswith("file://")

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The fsspec filesystem for this location (cached per process and options)."""
        return _local_fs() if self.is_local else _s3_fs(self.options)

    def pyarrow_fs(self) -> pafs.FileSystem:
        """A picklable pyarrow filesystem for Ray Data, for `Location.path`-style paths."""
        if self.is_local:
            return pafs.LocalFileSystem()
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))

    def child(self, *parts: str) -> Location:
        """The location of a relative path below this one (parts joined as `safe_relpath`)."""
        rel = safe_relpath(*parts)
        if self.is_local:
            path = posixpath.join(self.path, rel)
            return Location(uri=Path(path).as_uri(), path=path, options=self.options)
        return Location(uri=f"{self.uri}/{rel}", path=f"{self.path}/{rel}", options=self.options)

    def join(self, *parts: str) -> str:
        """Filesystem path (for `self.fs`) of a relative path below this location."""
        return self.child(*parts).path

    def __repr__(self) -> str:
        endpoint = f", endpoint={self.options.endpoint_url}" if self.options.endpoint_url else ""
        return f"Location({self.uri}{endpoint})"


def resolve(uri: str, options: StorageOptions | None = None) -> Location:
    """Parse a `--input`/`--output` value (`s3://bucket[/prefix]`, `file:///abs/dir` or a plain
    path) into a `Location`; unset `options` fields fall back to the environment.

    Raises:
        ValueError: empty URI, unsupported scheme, credentials in the URI, bad bucket name,
            `..` or empty segments in an S3 key, or a `file://` URI naming a remote host.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError("storage location is empty")
    opts = (options or StorageOptions()).with_env_defaults()
    parsed = urllib.parse.urlsplit(uri)
    scheme = parsed.scheme.lower()
    if scheme == "s3":
        return _resolve_s3(uri, parsed, opts)
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file:// URI names a remote host: {redact(uri)}")
        if parsed.query or parsed.fragment:
            raise ValueError(f"file:// URI must not have a query or fragment: {redact(uri)}")
        return _local_location(urllib.parse.unquote(parsed.path), opts)
    if scheme and "://" in uri:
        raise ValueError(
            f"unsupported storage scheme {scheme!r} in {redact(uri)}: "
            "use s3://bucket/prefix, file:///abs/dir or a plain path"
        )
    return _local_location(uri, opts)


def safe_relpath(*parts: str) -> str:
    """Join relative path parts with `/`, refusing anything that could leave the directory.

    Raises:
        ValueError: no parts, an absolute part, `.`/`..`/empty segments, backslashes or NUL.
    """
    if not parts:
        raise ValueError("empty relative path")
    segments: list[str] = []
    for part in parts:
        if not isinstance(part, str):
            raise ValueError(f"path part must be a string, got {type(part).__name__}")
        if part.startswith("/"):
            raise ValueError(f"absolute path where a relative one is required: {part!r}")
        if "\\" in part or "\x00" in part:
            raise ValueError(f"backslash or NUL in path: {part!r}")
        for segment in part.split("/"):
            if segment in ("", ".", ".."):
                raise ValueError(f"unsafe relative path {'/'.join(parts)!r}")
            segments.append(segment)
    return "/".join(segments)


def read_bytes(loc: Location, rel: str | None = None, *, max_bytes: int | None = None) -> bytes:
    """Read a whole file: `loc` itself, or `rel` below it.

    Raises:
        FileNotFoundError: the file does not exist (message has the URI, never credentials).
        ValueError: the file is larger than `max_bytes`.
    """
    target = loc.child(rel) if rel else loc
    try:
        if max_bytes is not None:
            size = target.fs.size(target.path)
            if size is not None and size > max_bytes:
                raise ValueError(f"{target.uri} is {size} bytes, more than {max_bytes} allowed")
        return target.fs.cat_file(target.path)
    except FileNotFoundError:
        raise FileNotFoundError(f"not found: {target.uri}") from None


def write_bytes_atomic(loc: Location, rel: str, data: bytes) -> None:
    """Write a file so readers see nothing or all of it: local, a hidden temporary file then
    `os.replace`; S3, one put (retried whole if the store drops the connection)."""
    target = loc.child(rel)
    if target.is_local:
        with _local_atomic(target.path) as f:
            f.write(data)
        return
    retry_io(lambda: target.fs.pipe_file(target.path, data), what=f"write {target.uri}")


@contextlib.contextmanager
def open_atomic(loc: Location, rel: str) -> Iterator[Any]:
    """A binary file to stream a large object into; readers see all of it or nothing.

    Local: as `write_bytes_atomic`. S3: a local spool file uploaded on success (retried whole:
    a multipart upload streamed to the store is lost if the server restarts), dropped on failure.
    """
    target = loc.child(rel)
    if target.is_local:
        with _local_atomic(target.path) as f:
            yield f
        return
    with tempfile.NamedTemporaryFile(prefix="weakclip-upload-") as spool:
        yield spool
        spool.flush()
        upload_file(loc, rel, spool.name)


def upload_file(loc: Location, rel: str, local_path: str) -> int:
    """Copy a large local file to `rel` below `loc` atomically (as `write_bytes_atomic`);
    returns its size in bytes."""
    target = loc.child(rel)
    size = os.path.getsize(local_path)
    if target.is_local:
        with _local_atomic(target.path) as f, open(local_path, "rb") as source:
            shutil.copyfileobj(source, f, length=16 * 1024 * 1024)
    else:
        retry_io(lambda: target.fs.put_file(local_path, target.path), what=f"upload {target.uri}")
    return size


@contextlib.contextmanager
def _local_atomic(path: str) -> Iterator[Any]:
    """A temporary file beside `path`, fsynced and renamed onto it on success, else removed."""
    directory = posixpath.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = posixpath.join(directory, f".{posixpath.basename(path)}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def exists(loc: Location, rel: str | None = None) -> bool:
    """Whether `loc` (or `rel` below it) exists as a file or non-empty directory."""
    target = loc.child(rel) if rel else loc
    return bool(target.fs.exists(target.path))


def remove_tree(loc: Location) -> None:
    """Delete everything under `loc` (the directory itself too, where that means anything)."""
    fs = loc.fs
    if fs.exists(loc.path):
        retry_io(lambda: fs.rm(loc.path, recursive=True), what=f"delete {loc.uri}")


def retry_io(fn: Callable[[], _T], *, what: str, attempts: int = WRITE_ATTEMPTS) -> _T:
    """Run `fn`, retrying transient storage errors (lost connections, forgotten uploads).

    Missing files and permission errors are not transient and are raised at once.
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
            # s3fs maps an upload the server forgot (NoSuchUpload) to FileNotFoundError.
            if "NoSuchUpload" not in str(e) or attempt == attempts:
                raise
        except OSError:
            if attempt == attempts:
                raise
        time.sleep(min(2.0**attempt, 10.0))
    raise AssertionError(f"unreachable: {what}")


_SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_SECRET_PATTERNS = (
    # key=value / key: value pairs whose name says secret, token, password, signature, credential
    re.compile(
        r"(?i)\b([\w.\-]*(?:secret|token|passw(?:or)?d|signature|credential|"
        r"access[_-]?key|auth[_-]?key|api[_-]?key)[\w.\-]*)(\s*[=:]\s*)(\"[^\"]*\"|'[^']*'|[^\s,;&\"']+)"
    ),
    # x-amz-* headers / query parameters carrying signatures or tokens
    re.compile(r"(?i)(x-amz-(?:signature|credential|security-token))(=|:\s*)([^\s&,;]+)"),
    # user:password@host in URLs
    re.compile(r"(?i)(\w+://[^/\s:@]+)(:)([^/\s@]+)(?=@)"),
)


def redact(text: str) -> str:
    """Scrub credentials from `text`: the values of the secret AWS variables, `name=value`
    pairs whose name says secret/token/password/key/signature, URL passwords."""
    out = str(text)
    for name in _SECRET_ENV_VARS:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            out = out.replace(value, "***")
    for pattern in _SECRET_PATTERNS:
        out = pattern.sub(r"\1\2***", out)
    return out


def _local_location(raw: str, opts: StorageOptions) -> Location:
    if "\x00" in raw:
        raise ValueError("NUL in path")
    path = os.path.abspath(os.path.expanduser(raw))
    if path != "/":
        path = path.rstrip("/")
    return Location(uri=Path(path).as_uri(), path=path, options=opts)


def _resolve_s3(uri: str, parsed: urllib.parse.SplitResult, opts: StorageOptions) -> Location:
    if "@" in parsed.netloc:
        raise ValueError(
            "credentials in storage URIs are not supported; use the AWS credential chain "
            "(environment, profile or instance role)"
        )
    if parsed.query or parsed.fragment:
        raise ValueError(f"s3:// URI must not have a query or fragment: {redact(uri)}")
    bucket = parsed.netloc
    if not _BUCKET_RE.match(bucket):
        raise ValueError(f"invalid S3 bucket name {bucket!r} in {redact(uri)}")
    key = parsed.path.strip("/")
    if key:
        try:
            key = safe_relpath(key)
        except ValueError as e:
            raise ValueError(f"invalid S3 key in {redact(uri)}: {e}") from None
    path = f"{bucket}/{key}" if key else bucket
    return Location(uri=f"s3://{path}", path=path, options=opts)


def _check_endpoint(endpoint: str) -> None:
    parsed = urllib.parse.urlsplit(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"storage endpoint must be an http(s) URL, got {redact(endpoint)!r}")
    if parsed.username or parsed.password:
        raise ValueError("storage endpoint must not contain credentials")


@functools.cache
def _local_fs() -> fsspec.AbstractFileSystem:
    return LocalFileSystem(auto_mkdir=True)


@functools.lru_cache(maxsize=16)
def _s3_fs(options: StorageOptions) -> fsspec.AbstractFileSystem:
    from pipelines.io.s3 import S3FileSystem  # s3fs takes 0.5 s to import: only when needed

    client_kwargs: dict[str, Any] = {}
    if options.region:
        client_kwargs["region_name"] = options.region
    config_kwargs: dict[str, Any] = {
        "retries": {"max_attempts": options.max_attempts, "mode": "standard"},
        "connect_timeout": S3_CONNECT_TIMEOUT_S,
        "read_timeout": S3_READ_TIMEOUT_S,
        # Checksums only where S3 requires them: S3-compatible servers reject the SDK's newer
        # default (aws-chunked uploads, full-object checksums on ranged reads).
        "request_checksum_calculation": "when_required",
        "response_checksum_validation": "when_required",
    }
    return S3FileSystem(
        endpoint_url=options.endpoint_url,
        client_kwargs=client_kwargs,
        config_kwargs=config_kwargs,
        # Other processes (Ray workers) write here; a cached listing would hide their files.
        use_listings_cache=False,
    )


def read_many(loc: Location, rels: Iterable[str]) -> dict[str, bytes | FileNotFoundError]:
    """Files below `loc` in one batched read (s3fs overlaps the GETs): relative path -> bytes,
    or a FileNotFoundError for a file that does not exist. Any other error is a storage
    error, never a missing file: that file is read again (`retry_io`) and the error raised
    when it persists."""
    paths = {loc.join(rel): rel for rel in rels}
    got = loc.fs.cat(list(paths), on_error="return") if paths else {}
    found: dict[str, bytes | FileNotFoundError] = {}
    for path, rel in paths.items():
        value = got.get(path, FileNotFoundError(path))
        if isinstance(value, BaseException) and not isinstance(value, FileNotFoundError):
            try:
                value = retry_io(lambda path=path: loc.fs.cat_file(path), what=f"read {rel}")
            except FileNotFoundError as missing:
                value = missing
        found[rel] = value
    return found


def read_json_objects(loc: Location, rels: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Small JSON files below `loc` (`rels`: key -> relative path) in one batched read:
    key -> parsed object of those that exist and hold one (missing or torn ones left out)."""
    found = read_many(loc, rels.values())
    objects: dict[str, dict[str, Any]] = {}
    for key, rel in rels.items():
        value = found[rel]
        with contextlib.suppress(UnicodeDecodeError, json.JSONDecodeError):
            parsed = json.loads(value) if isinstance(value, bytes) else None
            if isinstance(parsed, dict):
                objects[key] = parsed
    return objects
