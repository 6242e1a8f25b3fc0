"""One way to reach files everywhere: local paths and object-store URIs (s3://, gs://) through pyarrow.fs.

Endpoint and credentials come from the standard environment variables (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, or Google's), which pyarrow reads itself.
`Folder` is an output folder on any of them: relative paths, atomic-enough writes (local: write then
rename; object stores: one PUT per object, which is atomic per object), listing and deletion.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

import pyarrow.fs as pafs


def is_uri(text: str) -> bool:
    return "://" in text and not text.startswith("file://")


def filesystem_for(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path, a file:// URI or an object-store URI."""
    if is_uri(location):
        fs, path = pafs.FileSystem.from_uri(location)
        return fs, path.rstrip("/")
    local = location.removeprefix("file://")
    return pafs.LocalFileSystem(), os.path.abspath(local)


class Folder:
    """A folder on a local disk or an object store, addressed by paths relative to it."""

    def __init__(self, location: str | os.PathLike[str]) -> None:
        self.location = str(location)
        self.fs, self.root = filesystem_for(self.location)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def __reduce__(self) -> tuple:  # rebuilt from its location in each worker (credentials from env)
        return (Folder, (self.location,))

    def path(self, relative: str) -> str:
        return posixpath.join(self.root, relative) if relative else self.root

    def uri(self, relative: str = "") -> str:
        """A location string for users (a local path, or the object-store URI)."""
        if self.local:
            return os.path.join(self.root, relative) if relative else self.root
        return posixpath.join(self.location.rstrip("/"), relative) if relative else self.location

    def exists(self, relative: str = "") -> bool:
        return self.fs.get_file_info(self.path(relative)).type != pafs.FileType.NotFound

    def is_empty(self) -> bool:
        return not self.exists() or not self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False))

    def mkdirs(self, relative: str = "") -> None:
        if self.local:  # object stores have no folders; creating a "bucket" is never the engine's job
            self.fs.create_dir(self.path(relative), recursive=True)

    def list(self, relative: str) -> list[str]:
        """Names of the files directly in `relative` (sorted); empty when it does not exist."""
        selector = pafs.FileSelector(self.path(relative), allow_not_found=True, recursive=False)
        infos = self.fs.get_file_info(selector)
        return sorted(info.base_name for info in infos if info.type == pafs.FileType.File)

    def read_bytes(self, relative: str) -> bytes:
        with self.fs.open_input_stream(self.path(relative)) as handle:
            return handle.read()

    def write_bytes(self, relative: str, data: bytes) -> None:
        with self.open_write(relative) as handle:
            handle.write(data)

    @contextmanager
    def open_write(self, relative: str) -> Iterator[IO[bytes]]:
        """Write a file so that readers see all of it or nothing (local: temp + rename; object: one PUT)."""
        final = self.path(relative)
        if self.local:
            os.makedirs(posixpath.dirname(final), exist_ok=True)
            tmp = posixpath.join(posixpath.dirname(final), f".{posixpath.basename(final)}.tmp")
            with open(tmp, "wb") as handle:
                yield handle
            os.replace(tmp, final)
        else:
            with self.fs.open_output_stream(final) as handle:
                yield handle

    def delete(self, relative: str) -> None:
        self.fs.delete_file(self.path(relative))

    def delete_all(self) -> None:
        """Delete everything under the folder (for --overwrite)."""
        if self.local:
            self.fs.delete_dir(self.root)
        else:
            self.fs.delete_dir_contents(self.root, missing_dir_ok=True)
