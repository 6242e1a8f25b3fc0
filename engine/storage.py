"""Where a file lives: a local path or an object-store URI, and the `pyarrow.fs` filesystem that opens it.

Every location the engine carries between processes is a plain string (a local absolute path or a URI such as
`s3://bucket/key`), so a listing made on the driver can be read on any node: a worker rebuilds the filesystem
from the string. Object-store filesystems are cached per scheme and bucket, because building one resolves
credentials. Endpoint and credentials come from the standard environment (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`), which `FileSystem.from_uri` reads itself
(the `S3FileSystem()` constructor does not read `AWS_ENDPOINT_URL`, so always go through `from_uri`).
`gs://` goes through the same code; only `s3://` is tested here (against a local S3 server).
"""

from __future__ import annotations

import os
import re
import threading

import pyarrow.fs as pafs

OBJECT_SCHEMES = ("s3", "gs", "gcs")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_LOCAL = pafs.LocalFileSystem()
_CACHE: dict[tuple[str, str], pafs.FileSystem] = {}
_LOCK = threading.Lock()


class StorageError(ValueError):
    """A location that no supported filesystem can open (unknown scheme, no bucket)."""


def scheme_of(location: str) -> str:
    """The URI scheme, lower case; "" for a plain local path."""
    match = _SCHEME.match(location)
    return match.group(1).lower() if match else ""


def is_remote(location: str) -> bool:
    """True for object-store URIs; plain paths and file:// URIs are local."""
    return scheme_of(location) not in ("", "file")


def local_path(location: str) -> str:
    """The absolute local path of a plain path or a file:// URI."""
    if scheme_of(location) == "file":
        location = location[len("file://") :]
    return os.path.abspath(location)


def split_uri(uri: str) -> tuple[str, str, str]:
    """`s3://bucket/a/b/` -> ("s3", "bucket", "a/b"); the key may be empty."""
    scheme = scheme_of(uri)
    if scheme not in OBJECT_SCHEMES:
        raise StorageError(
            f"{uri}: unsupported URI scheme {scheme!r}; use a local path, file://, "
            + ", ".join(f"{s}://" for s in OBJECT_SCHEMES)
        )
    rest = uri[len(scheme) + 3 :].strip("/")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket in the URI")
    return scheme, bucket, key


def filesystem_for(location: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it for a local path, a file:// URI or an object-store URI."""
    if not is_remote(location):
        return _LOCAL, local_path(location)
    scheme, bucket, key = split_uri(location)
    with _LOCK:
        fs = _CACHE.get((scheme, bucket))
        if fs is None:
            try:
                fs = pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]
            except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError
                raise StorageError(f"{location}: cannot open a {scheme} filesystem: {exc}") from exc
            _CACHE[(scheme, bucket)] = fs
    return fs, f"{bucket}/{key}" if key else bucket


def to_uri(scheme: str, fs_path: str) -> str:
    """The URI of a path inside an object-store filesystem (the inverse of `filesystem_for`)."""
    return f"{scheme}://{fs_path}"
