"""List input images and read their bytes.

Inputs: a folder of images, webdataset tar(s) or a glob of them, a parquet/jsonl table with a `uri` column
(and optional `dataset`), or a COCO json (`images[].file_name`). Listing yields one `SourceItem` per image in
a stable order, so `--limit N` and resume always mean the same images. Reading is bounded: a tar member or
file bigger than the limit is never read into memory.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from engine.input_text import encode_text, from_metadata, sample_key, tar_texts

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
TAR_SUFFIXES = (".tar",)
TABLE_SUFFIXES = (".parquet", ".jsonl")

LISTING_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("dataset", pa.string()),
        ("path", pa.string()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
        ("text", pa.string()),  # the input's own caption/conversation as JSON (engine/input_text.py)
    ]
)


class InputError(ValueError):
    """The --input cannot be listed; the message says what was expected."""


@dataclass(frozen=True)
class SourceItem:
    """One image to read: `path` is a file, or a tar when `offset >= 0` (member at offset, size bytes)."""

    uri: str
    dataset: str
    path: str
    offset: int = -1
    size: int = -1
    text: str = ""


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES and not Path(name).name.startswith(".")


def list_folder(folder: Path, dataset: str) -> Iterator[SourceItem]:
    """Every image file under `folder` (recursive, sorted, hidden files and non-image suffixes skipped)."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if is_image_name(name):
                path = os.path.join(root, name)
                caption = Path(path).with_suffix(".txt")  # alt text beside the image, if any
                text = encode_text(caption.read_text(errors="replace")) if caption.is_file() else ""
                yield SourceItem(
                    uri=os.path.abspath(path), dataset=dataset, path=os.path.abspath(path), text=text
                )


def list_tar(tar_path: Path, dataset: str) -> Iterator[SourceItem]:
    """Image members of a tar, located by offset so readers seek instead of scanning the archive.

    Only regular files count (links, devices and folders are skipped), so member names are never used to
    touch the file system.
    """
    path = os.path.abspath(tar_path)
    try:
        with tarfile.open(path, mode="r:") as tar:
            members = tar.getmembers()
            texts = tar_texts(tar, members)  # a sample's .txt/.json: its own caption or conversation
            for member in members:
                if member.isfile() and is_image_name(member.name):
                    yield SourceItem(
                        uri=f"{path}#{member.name}",
                        dataset=dataset,
                        path=path,
                        offset=member.offset_data,
                        size=member.size,
                        text=texts.get(sample_key(member.name), ""),
                    )
    except tarfile.TarError as exc:
        raise InputError(f"{path}: not a readable (uncompressed) tar: {exc}") from exc


def list_table(table_path: Path, dataset: str) -> Iterator[SourceItem]:
    """Rows of a parquet/jsonl table with a `uri` column (local paths or file:// URIs)."""
    if table_path.suffix == ".parquet":
        table = pq.read_table(table_path)
        rows = table.to_pylist()
    else:
        rows = [json.loads(line) for line in table_path.read_text().splitlines() if line.strip()]
    if rows and "uri" not in rows[0]:
        raise InputError(f"{table_path}: needs a 'uri' column, found {sorted(rows[0])}")
    base = table_path.parent
    for row in rows:
        uri = str(row["uri"])
        local = uri.removeprefix("file://")
        if "://" in local:
            raise InputError(f"{table_path}: only local paths are supported in v1, got {uri!r}")
        path = Path(local) if os.path.isabs(local) else base / local
        yield SourceItem(
            uri=uri,
            dataset=str(row.get("dataset") or dataset),
            path=os.path.abspath(path),
            text=from_metadata(row),
        )


def list_coco(json_path: Path, dataset: str) -> Iterator[SourceItem]:
    """Images of a COCO-format json; `file_name` is relative to the json's folder (or to `images/`)."""
    data = json.loads(json_path.read_text())
    base = json_path.parent
    captions: dict[int, str] = {}  # COCO captions files: annotations[].caption, first by id per image
    for ann in sorted(data.get("annotations", []), key=lambda a: a.get("id", 0)):
        if isinstance(ann.get("caption"), str):
            captions.setdefault(ann["image_id"], ann["caption"])
    for image in sorted(data["images"], key=lambda im: im["id"]):
        name = image["file_name"]
        path = base / name
        if not path.exists() and (base / "images" / name).exists():
            path = base / "images" / name
        text = encode_text(image.get("caption") or captions.get(image["id"]), image.get("conversations"))
        yield SourceItem(uri=os.path.abspath(path), dataset=dataset, path=os.path.abspath(path), text=text)


def _list_one(path: Path, dataset: str) -> Iterator[SourceItem]:
    if path.is_dir():
        yield from list_folder(path, dataset)
    elif path.suffix in TAR_SUFFIXES:
        yield from list_tar(path, dataset)
    elif path.suffix in TABLE_SUFFIXES:
        yield from list_table(path, dataset)
    elif path.suffix == ".json":
        yield from list_coco(path, dataset)
    elif is_image_name(path.name):
        yield SourceItem(uri=os.path.abspath(path), dataset=dataset, path=os.path.abspath(path))
    else:
        raise InputError(
            f"{path}: unsupported input; give a folder, .tar file(s) or glob, a .parquet/.jsonl with a "
            "'uri' column, or a COCO .json"
        )


def list_inputs(specs: list[str], dataset: str = "", limit: int | None = None) -> list[SourceItem]:
    """All images named by the --input specs, in stable order, de-duplicated by uri, cut at `limit`."""
    items: list[SourceItem] = []
    seen: set[str] = set()
    for spec in specs:
        matches = sorted(glob.glob(spec)) if glob.has_magic(spec) else [spec]
        if not matches:
            raise InputError(f"--input {spec!r} matches nothing")
        for match in matches:
            path = Path(match)
            if not path.exists():
                raise InputError(f"--input {match!r} does not exist")
            for item in _list_one(path, dataset or path.stem):
                if item.uri not in seen:
                    seen.add(item.uri)
                    items.append(item)
                    if limit is not None and len(items) >= limit:
                        return items
    return items


def listing_table(items: list[SourceItem]) -> pa.Table:
    return pa.Table.from_pylist([item.__dict__ for item in items], schema=LISTING_SCHEMA)


class ReadError(Exception):
    """Bytes could not be read; the message is the reject reason."""


def read_bytes(path: str, offset: int, size: int, max_bytes: int) -> bytes:
    """Bytes of a file or tar member, refusing anything over `max_bytes` before reading it."""
    try:
        if offset < 0:
            size = os.path.getsize(path)
        if size > max_bytes:
            raise ReadError(f"file too large: {size} bytes > decode.max_bytes={max_bytes}")
        with open(path, "rb") as handle:
            if offset >= 0:
                handle.seek(offset)
            data = handle.read(size)
    except OSError as exc:
        raise ReadError(f"unreadable: {exc.strerror or exc}") from exc
    if len(data) != size:
        raise ReadError(f"short read: got {len(data)} of {size} bytes")
    return data
