"""One place for file I/O of releases, behind `pyarrow.fs`, so local folders and s3:// / gs:// work alike.

Inputs and the release folder are addressed as a `Location` (a filesystem and a root path in it); every
reader and writer of the release goes through it. Writes go to a temporary name and are moved into place,
so a killed build never leaves a half-written file under its final name (on object stores a move is a
copy, which is still whole-object).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs


@dataclass(frozen=True)
class Location:
    """A folder on some filesystem: `fs` plus a root path inside it, and the URI the user gave."""

    fs: pafs.FileSystem
    root: str
    uri: str

    @classmethod
    def parse(cls, uri: str | Path) -> Location:
        text = str(uri)
        if "://" not in text:
            text = str(Path(text).resolve())
            return cls(pafs.LocalFileSystem(), text, str(uri))
        fs, root = pafs.FileSystem.from_uri(text)
        return cls(fs, root.rstrip("/"), text)

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def exists(self, rel: str = "") -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def is_file(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File

    def list(self, rel: str = "", suffix: str = "", recursive: bool = False) -> list[str]:
        """Relative paths of the files under `rel` ending in `suffix`, sorted; [] if the folder is absent."""
        if not self.exists(rel):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), recursive=recursive))
        base = self.root.rstrip("/") + "/"
        out = [
            info.path[len(base) :] if info.path.startswith(base) else info.path
            for info in infos
            if info.type == pafs.FileType.File and info.path.endswith(suffix)
        ]
        return sorted(out)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def open_input(self, rel: str) -> Any:
        """A seekable file (range reads on object stores)."""
        return self.fs.open_input_file(self.path(rel))

    def size(self, rel: str) -> int:
        return self.fs.get_file_info(self.path(rel)).size

    def _parent(self, rel: str) -> None:
        parent = posixpath.dirname(self.path(rel))
        if parent:
            self.fs.create_dir(parent, recursive=True)

    @contextmanager
    def open_output(self, rel: str) -> Iterator[Any]:
        """A write stream to `rel` that only appears under its name once the block finishes."""
        self._parent(rel)
        tmp = posixpath.join(posixpath.dirname(self.path(rel)), f".{posixpath.basename(rel)}.partial")
        stream = self.fs.open_output_stream(tmp)
        try:
            yield stream
        except BaseException:
            stream.close()
            self.fs.delete_file(tmp)
            raise
        stream.close()
        self.fs.move(tmp, self.path(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.open_output(rel) as stream:
            stream.write(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def delete(self, rel: str) -> None:
        if self.is_file(rel):
            self.fs.delete_file(self.path(rel))

    def delete_dir(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.delete_dir(self.path(rel))

    def clear(self) -> None:
        """Delete everything in the folder (callers check first that it is a release)."""
        if self.exists():
            self.fs.delete_dir_contents(self.path(""))
