"""Where a file lives: a local path or an object-store URI, and the `pyarrow.fs` filesystem that opens it.

Every location the engine carries between processes is a plain string (a local absolute path or a URI such as
`s3://bucket/key`), so a listing made on the driver can be read on any node: a worker rebuilds the filesystem
from the string. Object-store filesystems are cached per scheme and bucket, because building one resolves
credentials. Endpoint and credentials come from the standard environment (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`), which `FileSystem.from_uri` reads itself
(the `S3FileSystem()` constructor does not read `AWS_ENDPOINT_URL`, so always go through `from_uri`).
`gs://` uses Google's default credentials, or, when `STORAGE_EMULATOR_HOST` is set (the variable Google's
own storage clients honour), that endpoint without credentials: the tests run both `s3://` and `gs://`
against local servers (moto, gcp-storage-emulator).

`Folder` is an output folder on any of them: relative paths, atomic-enough writes (local: write then rename;
object stores: one PUT per object, atomic per object), listing and deletion.
"""

from __future__ import annotations

import os
import posixpath
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

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
                fs = _emulated_gcs() if scheme in ("gs", "gcs") else None
                fs = fs or pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]
            except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError
                raise StorageError(f"{location}: cannot open a {scheme} filesystem: {exc}") from exc
            _CACHE[(scheme, bucket)] = fs
    return fs, f"{bucket}/{key}" if key else bucket


def _emulated_gcs() -> pafs.FileSystem | None:
    """A GCS filesystem on `STORAGE_EMULATOR_HOST` (e.g. `http://127.0.0.1:9023`), anonymous; None when unset.

    pyarrow's own GCS client does not read that variable (it would ask the metadata server for credentials
    and wait), so it is passed explicitly.
    """
    host = os.environ.get("STORAGE_EMULATOR_HOST", "").strip()
    if not host:
        return None
    scheme, _, address = host.rpartition("://")
    return pafs.GcsFileSystem(
        anonymous=True,
        endpoint_override=address.rstrip("/"),
        scheme=scheme or "http",
        project_id=os.environ.get("GOOGLE_CLOUD_PROJECT", "emulator"),
    )


def to_uri(scheme: str, fs_path: str) -> str:
    """The URI of a path inside an object-store filesystem (the inverse of `filesystem_for`)."""
    return f"{scheme}://{fs_path}"


class Folder:
    """A folder on a local disk or an object store, addressed by paths relative to it.

    Writes are whole or absent: locally a temp file renamed into place, on object stores one streamed
    upload that only becomes an object when it completes (and is deleted if the writer fails).
    """

    def __init__(self, location: str | os.PathLike[str]) -> None:
        self.location = str(location)
        self.fs, self.root = filesystem_for(self.location)
        self.local = not is_remote(self.location)

    def __reduce__(self) -> tuple:  # rebuilt from its location in each worker (credentials from env)
        return (Folder, (self.location,))

    @property
    def uri(self) -> str:
        """Where it is, for users: the local absolute path or the object-store URI."""
        return self.root if self.local else self.location.rstrip("/")

    def path(self, relative: str) -> str:
        return posixpath.join(self.root, relative) if relative else self.root

    def exists(self, relative: str = "") -> bool:
        return self.fs.get_file_info(self.path(relative)).type != pafs.FileType.NotFound

    def is_file(self, relative: str) -> bool:
        return self.fs.get_file_info(self.path(relative)).type == pafs.FileType.File

    def size(self, relative: str) -> int:
        return self.fs.get_file_info(self.path(relative)).size

    def is_empty(self) -> bool:
        if not self.exists():
            return True
        if self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True, recursive=False)):
            return False
        if self.local:
            return True
        # pyarrow's GCS lists a sub-folder non-recursively only if Arrow itself wrote a marker object for it
        # (apache/arrow#35993): a folder holding only nested objects looks empty at one level.
        return not self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True, recursive=True))

    def mkdirs(self, relative: str = "") -> None:
        if self.local:  # object stores have no folders; creating a "bucket" is never the engine's job
            self.fs.create_dir(self.path(relative), recursive=True)

    def list(self, relative: str) -> list[str]:
        """Names of the files directly in `relative` (sorted); empty when it does not exist."""
        selector = pafs.FileSelector(self.path(relative), allow_not_found=True, recursive=False)
        infos = self.fs.get_file_info(selector)
        return sorted(info.base_name for info in infos if info.type == pafs.FileType.File)

    def files(self, relative: str = "", suffix: str = "", recursive: bool = False) -> list[str]:
        """Paths relative to the folder of the files under `relative` ending in `suffix`, sorted."""
        selector = pafs.FileSelector(self.path(relative), allow_not_found=True, recursive=recursive)
        base = self.root.rstrip("/") + "/"
        return sorted(
            info.path.removeprefix(base)
            for info in self.fs.get_file_info(selector)
            if info.type == pafs.FileType.File and info.path.endswith(suffix)
        )

    def read_bytes(self, relative: str) -> bytes:
        with self.fs.open_input_stream(self.path(relative)) as handle:
            return handle.read()

    def read_text(self, relative: str) -> str:
        return self.read_bytes(relative).decode("utf-8")

    def open_input(self, relative: str) -> Any:
        """A seekable file (ranged reads on object stores)."""
        return self.fs.open_input_file(self.path(relative))

    def write_bytes(self, relative: str, data: bytes) -> None:
        with self.open_write(relative) as handle:
            handle.write(data)

    def write_text(self, relative: str, text: str) -> None:
        self.write_bytes(relative, text.encode("utf-8"))

    @contextmanager
    def open_write(self, relative: str) -> Iterator[IO[bytes]]:
        """Write a file so that readers see all of it or nothing."""
        final = self.path(relative)
        if self.local:
            os.makedirs(posixpath.dirname(final), exist_ok=True)
            tmp = posixpath.join(posixpath.dirname(final), f".{posixpath.basename(final)}.tmp")
            try:
                with open(tmp, "wb") as handle:
                    yield handle
            except BaseException:
                os.unlink(tmp)
                raise
            os.replace(tmp, final)
        else:
            stream = self.fs.open_output_stream(final)
            try:
                yield stream
            except BaseException:
                stream.close()
                self.fs.delete_file(final)
                raise
            stream.close()

    def delete(self, relative: str) -> None:
        if self.is_file(relative):
            self.fs.delete_file(self.path(relative))

    def delete_dir(self, relative: str) -> None:
        if self.exists(relative):
            self.fs.delete_dir(self.path(relative))

    def delete_all(self) -> None:
        """Delete everything in the folder (callers check first that it is theirs)."""
        if self.exists():
            self.fs.delete_dir_contents(self.root)
