"""List input images and read their bytes.

Inputs: a folder (or object-store prefix) of images, webdataset tar(s) or a glob of them, a parquet/jsonl
table with a `uri` column (and optional `dataset`), or a COCO json (`images[].file_name`). Each may be a local
path, a file:// URI or an object-store URI (`s3://bucket/prefix`, `gs://...`; see engine/storage.py).
Listing yields one `SourceItem` per image in a stable order, so `--limit N` and resume always mean the same
images. The driver only lists (a tar is listed from its member headers, never its member data); workers read
the bytes, bounded: a tar member or file bigger than the limit is never read into memory.

Untrusted archives: a tar member with an unsafe name (absolute, `..`), a link or a device, or data cut off
by a truncated file is listed with a `problem`, so it ends as a reject with that reason instead of vanishing.
Member names are never used to touch the file system: members are read by byte offset.
"""

from __future__ import annotations

import fnmatch
import glob
import io
import json
import os
import posixpath
import re
import string
import tarfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from engine.errors import RetryableError
from engine.input_text import TEXT_SUFFIXES, encode_text, from_metadata
from engine.storage import StorageError, filesystem_for, is_remote, local_path, scheme_of, split_uri, to_uri

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
TAR_SUFFIXES = (".tar",)
TABLE_SUFFIXES = (".parquet", ".jsonl")
# tarfile reads GNU long-name and pax headers into memory whole; a hostile archive could declare gigabytes.
MAX_TAR_METADATA_BYTES = 1 << 20
# Tar headers are read through a buffer of this size: tarfile makes two small reads per member, which on an
# object store are two requests each; one larger read covers the headers of every member it spans (measured
# on moto, 2000 members of 20 kB: 50.6 s unbuffered, 0.47 s at 1 MiB). Members bigger than this are skipped.
TAR_LISTING_READ_BYTES = 1 << 20
LISTING_THREADS = 8  # inputs (tar shards, tables) listed ahead at once when a spec names several

LISTING_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("dataset", pa.string()),
        ("path", pa.string()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
        ("problem", pa.string()),
        ("siblings", pa.string()),
        ("text", pa.string()),  # the input's own caption/conversation as JSON (engine/input_text.py)
    ]
)


class InputError(ValueError):
    """The --input cannot be listed; the message says what was expected."""


@dataclass(frozen=True)
class SourceItem:
    """One image to read.

    `path` is a local absolute path or an object-store URI that any node can open; it names a tar when
    `offset >= 0` (member data at `offset`, `size` bytes). `problem`, when set, is the reject reason the
    listing already knows: decode rejects the item without reading anything. `siblings` is JSON
    `{ext: [offset, size]}` of the other parts of the same sample (captions, metadata) for whoever wants
    them: members of the same webdataset sample in a tar, or, for an image in a folder or prefix, the
    files beside it with the same stem (`scene.txt` beside `scene.jpg`; offset -1, see `sidecar_path`);
    "" when there are none.
    """

    uri: str
    dataset: str
    path: str
    offset: int = -1
    size: int = -1
    problem: str = ""
    siblings: str = ""
    text: str = ""


def is_image_name(name: str) -> bool:
    """An image's file name (by suffix, as `pathlib` reads it), not a hidden file. String operations, not
    `pathlib`: this runs for every member of every tar, and a `Path` costs more than reading its header."""
    base = name.rstrip("/").rpartition("/")[2]
    suffix = base.rpartition(".")[2]
    return "." in base and not base.startswith(".") and f".{suffix.lower()}" in IMAGE_SUFFIXES


def sidecar_path(path: str, ext: str) -> str:
    """The file beside an image file or object that shares its stem: `a/scene.jpg` -> `a/scene.txt`."""
    return path[: len(path) - len(PurePosixPath(path).suffix)] + "." + ext


def _sidecars(image_path: str, sizes: dict[str, int]) -> str:
    """`siblings` JSON of an image's caption/metadata files, from the sizes of the files listed beside it.
    Only the size is noted here; a worker reads the bytes (and skips any over MAX_TEXT_BYTES)."""
    found = {}
    for suffix in TEXT_SUFFIXES:
        ext = suffix.lstrip(".")
        size = sizes.get(sidecar_path(image_path, ext))
        if size is not None:
            found[ext] = [-1, size]
    return json.dumps(found) if found else ""


# --- object-store helpers ------------------------------------------------------------------------------


def _filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    try:
        return filesystem_for(location)
    except StorageError as exc:
        raise InputError(str(exc)) from exc


def _bucket_error(fs: pafs.FileSystem, path: str, spec: str) -> InputError | None:
    """An error naming the bucket when the bucket itself is missing (buckets are never created here)."""
    bucket = path.split("/", 1)[0]
    try:
        missing = fs.get_file_info(bucket).type == pafs.FileType.NotFound
    except OSError:
        return None
    if missing:
        return InputError(
            f"--input {spec!r}: bucket {bucket!r} does not exist (the engine never creates buckets)"
        )
    return None


def _missing(fs: pafs.FileSystem, path: str, spec: str, what: str = "does not exist") -> InputError:
    """The error for a location that holds nothing."""
    return _bucket_error(fs, path, spec) or InputError(f"--input {spec!r} {what}")


def _info(fs: pafs.FileSystem, path: str, spec: str) -> pafs.FileInfo:
    try:
        info = fs.get_file_info(path)
    except OSError as exc:
        raise InputError(f"--input {spec!r}: cannot read: {exc}") from exc
    if info.type == pafs.FileType.NotFound:
        raise _missing(fs, path, spec)
    return info


def _list_objects(fs: pafs.FileSystem, path: str, spec: str, recursive: bool) -> list[pafs.FileInfo]:
    """Everything under `path`; [] when nothing is there (a missing bucket is an InputError)."""
    try:
        return fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    except OSError as exc:
        raise _bucket_error(fs, path, spec) or InputError(f"--input {spec!r}: cannot list: {exc}") from exc


def _walk_order(parts: list[str]) -> tuple[tuple[int, str], ...]:
    """Sort key that puts object keys in the order os.walk (sorted) visits a local copy of the same tree."""
    return (*((1, d) for d in parts[:-1]), (0, parts[-1]))


def _glob_remote(spec: str) -> list[str]:
    """Object-store glob: list below the first wildcard part, match part by part like glob.glob."""
    fs, pattern = _filesystem(spec)
    scheme = scheme_of(spec)
    parts = pattern.split("/")
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    if first == 0:
        raise InputError(f"--input {spec!r}: wildcards in the bucket name are not supported")
    base = "/".join(parts[:first])
    # pyarrow's GCS lists no folder it did not create itself (apache/arrow#35993), at one level or
    # recursively: list every object there and take the folders from the object names.
    gcs = scheme in ("gs", "gcs")
    infos = _list_objects(fs, base, spec, recursive=gcs or first < len(parts) - 1)
    # each listed path, cut to the pattern's depth: a file at that depth, or a folder holding deeper ones
    candidates = {"/".join(info.path.rstrip("/").split("/")[: len(parts)]) for info in infos}

    def matches(path: str) -> bool:
        names = path.split("/")
        return len(names) == len(parts) and all(
            fnmatch.fnmatchcase(name, pat) and (pat.startswith(".") or not name.startswith("."))
            for name, pat in zip(names, parts, strict=True)
        )

    found = sorted(path for path in candidates if matches(path))
    if not found:
        raise _missing(fs, base, spec, "matches nothing")
    return [to_uri(scheme, path) for path in found]


def _expand(spec: str) -> list[str]:
    """The locations one --input names: local paths (as given) or object-store URIs."""
    if is_remote(spec):
        return _glob_remote(spec) if glob.has_magic(spec) else [spec]
    if scheme_of(spec) == "file":
        spec = local_path(spec)
    matches = sorted(glob.glob(spec)) if glob.has_magic(spec) else [spec]
    if not matches:
        raise InputError(f"--input {spec!r} matches nothing")
    return matches


def _canonical(location: str) -> str:
    """The uri/path an input file gets in the listing: absolute local path, or scheme://bucket/key."""
    if not is_remote(location):
        return os.path.abspath(location)
    return to_uri(scheme_of(location), _filesystem(location)[1])


# --- listing, one kind of input at a time --------------------------------------------------------------


def list_folder(folder: Path, dataset: str) -> Iterator[SourceItem]:
    """Every image file under `folder` (recursive, sorted, hidden files and non-image suffixes skipped),
    with the `.txt` / `.json` beside it (alt text, metadata) noted in `siblings`."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        root = os.path.abspath(root)
        texts = {}
        for name in files:
            if name.endswith(TEXT_SUFFIXES):
                try:
                    texts[os.path.join(root, name)] = os.path.getsize(os.path.join(root, name))
                except OSError:
                    continue  # gone or unreadable: no caption, the image is still listed
        for name in sorted(files):
            if is_image_name(name):
                path = os.path.join(root, name)
                yield SourceItem(uri=path, dataset=dataset, path=path, siblings=_sidecars(path, texts))


def list_prefix(uri: str, dataset: str) -> Iterator[SourceItem]:
    """Every image object under an object-store prefix, in the order `list_folder` lists a local copy."""
    fs, root = _filesystem(uri)
    scheme = scheme_of(uri)
    found, texts = [], {}
    for info in _list_objects(fs, root, uri, recursive=True):
        if info.type != pafs.FileType.File:
            continue
        parts = info.path[len(root) + 1 :].split("/")
        if is_image_name(parts[-1]) and not any(part.startswith(".") for part in parts[:-1]):
            found.append((_walk_order(parts), info.path))
        elif parts[-1].endswith(TEXT_SUFFIXES):
            texts[info.path] = info.size
    for _, path in sorted(found):
        location = to_uri(scheme, path)
        yield SourceItem(uri=location, dataset=dataset, path=location, siblings=_sidecars(path, texts))


class _MetadataTooLarge(tarfile.HeaderError):
    pass


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses long-name/pax headers over MAX_TAR_METADATA_BYTES before tarfile reads them into memory.

    tarfile has no public hook for this, so the (stable since Python 3.0) `_proc_member` dispatcher is
    wrapped; if a future Python renames it, this check silently stops applying and nothing else changes.
    """

    _META_TYPES = (
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
    )

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in self._META_TYPES and self.size > MAX_TAR_METADATA_BYTES:
            raise _MetadataTooLarge(
                f"metadata header of {self.size} bytes at byte {self.offset} (limit {MAX_TAR_METADATA_BYTES})"
            )
        return super()._proc_member(tar)  # type: ignore[misc]


def unsafe_member(member: tarfile.TarInfo) -> str:
    """Why a tar member must not be used (a reject reason), or "" when it is a plain file or folder."""
    name = member.name
    drive = len(name) > 1 and name[1] == ":" and name[0] in string.ascii_letters
    if name.startswith(("/", "\\")) or drive or (".." in name and ".." in re.split(r"[\\/]", name)):
        return f"unsafe member name: {name!r} (absolute or '..' path)"
    if member.issym():
        return f"unsafe member: symlink {name!r} -> {member.linkname!r}"
    if member.islnk():
        return f"unsafe member: hard link {name!r} -> {member.linkname!r}"
    if member.ischr() or member.isblk() or member.isfifo():
        return f"unsafe member: device or fifo {name!r}"
    if member.issparse():
        return f"unsupported member: GNU sparse file {name!r}"
    if not (member.isreg() or member.isdir()):
        return f"unsupported member type {member.type!r}: {name!r}"
    return ""


def sample_key(name: str) -> tuple[str, str]:
    """Webdataset grouping: `dir/abc.seg.png` -> ("dir/abc", "seg.png")."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def _scan_tar(tar: tarfile.TarFile, handle: IO[bytes], total: int) -> tuple[list[tarfile.TarInfo], str, str]:
    """Members whose headers and data lie inside the file, then (what, why) for a truncated remainder."""
    members: list[tarfile.TarInfo] = []
    try:
        for member in tar:
            end = member.offset_data + (member.size if member.isreg() else 0)
            if end > total:
                return (
                    members,
                    member.name,
                    (
                        f"truncated tar: member {member.name!r} needs bytes up to {end} but the file ends at "
                        f"byte {total}; anything after it is lost"
                    ),
                )
            members.append(member)
    except tarfile.TarError as exc:
        return members, f"@{tar.offset}", f"corrupt tar after byte {tar.offset}: {exc}; the rest is lost"
    # tarfile stops quietly at a cut-off or garbled header after the first member: look at what stopped it
    if tar.offset < total:
        handle.seek(tar.offset)
        block = handle.read(tarfile.BLOCKSIZE)
        if block.strip(b"\0"):
            return (
                members,
                f"@{tar.offset}",
                (f"truncated tar: unreadable header at byte {tar.offset} of {total}; the rest is lost"),
            )
    return members, "", ""


def list_tar(location: str, dataset: str) -> Iterator[SourceItem]:
    """Image members of a tar, located by offset so readers seek instead of scanning the archive.

    Only the headers are read: tarfile seeks over member data (a read buffer of TAR_LISTING_READ_BYTES
    takes small members along with the headers around them, far cheaper than a request per header).
    Folders and non-image files are skipped (non-image members of a webdataset sample are recorded as
    `siblings` of its image); unsafe members and a truncated remainder become items with a `problem`
    (uri `<tar>#<member>` or `<tar>#@<byte offset>`).
    """
    fs, fs_path = _filesystem(location)
    path = _canonical(location)
    total = _info(fs, fs_path, location).size
    try:
        handle = fs.open_input_file(fs_path)
    except OSError as exc:
        raise InputError(f"{path}: cannot open: {exc}") from exc
    with handle, io.BufferedReader(handle, buffer_size=TAR_LISTING_READ_BYTES) as buffered:  # type: ignore[arg-type]
        try:
            tar = tarfile.open(fileobj=buffered, mode="r:", tarinfo=_BoundedTarInfo)
        except tarfile.TarError as exc:
            raise InputError(f"{path}: not a readable (uncompressed) tar: {exc}") from exc
        members, cut_name, cut_reason = _scan_tar(tar, buffered, total)

    samples: dict[str, dict[str, list[int]]] = {}
    for member in members:
        if member.isreg() and not unsafe_member(member):
            key, ext = sample_key(member.name)
            samples.setdefault(key, {})[ext] = [member.offset_data, member.size]
    for member in members:
        problem = unsafe_member(member)
        if problem:
            yield SourceItem(uri=f"{path}#{member.name}", dataset=dataset, path=path, problem=problem)
        elif member.isreg() and is_image_name(member.name):
            key, ext = sample_key(member.name)
            others = {e: span for e, span in samples[key].items() if e != ext}
            yield SourceItem(
                uri=f"{path}#{member.name}",
                dataset=dataset,
                path=path,
                offset=member.offset_data,
                size=member.size,
                siblings=json.dumps(others, sort_keys=True) if others else "",
            )
    if cut_reason:
        yield SourceItem(uri=f"{path}#{cut_name}", dataset=dataset, path=path, problem=cut_reason)


def _resolve_row(uri: str, table_location: str, table_name: str) -> str:
    """Where a table row's uri points: object-store URIs as given, local paths relative to the table."""
    if is_remote(uri):
        try:
            split_uri(uri)
        except StorageError as exc:
            raise InputError(f"{table_name}: {exc}") from exc
        return uri
    local = uri.removeprefix("file://")
    if os.path.isabs(local):
        return os.path.abspath(local)
    if not is_remote(table_location):
        return os.path.abspath(Path(table_location).parent / local)
    fs_path = _filesystem(table_location)[1]
    return to_uri(
        scheme_of(table_location), posixpath.normpath(posixpath.join(posixpath.dirname(fs_path), local))
    )


def list_table(location: str, dataset: str, row_group: int = -1) -> Iterator[SourceItem]:
    """Rows of a parquet/jsonl table with a `uri` column: local paths, file:// or object-store URIs.

    `row_group >= 0` reads that row group of a parquet table only (a work unit of `engine.units`)."""
    fs, fs_path = _filesystem(location)
    name = _canonical(location) if is_remote(location) else location
    try:
        if fs_path.endswith(".parquet") and row_group >= 0:
            with fs.open_input_file(fs_path) as handle:
                rows = pq.ParquetFile(handle).read_row_group(row_group).to_pylist()
        elif fs_path.endswith(".parquet"):
            rows = pq.read_table(fs_path, filesystem=fs).to_pylist()
        else:
            with fs.open_input_stream(fs_path) as stream:
                text = stream.read().decode("utf-8")
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, ValueError) as exc:  # ValueError covers bad JSON, bad UTF-8 and ArrowInvalid
        raise InputError(f"{name}: unreadable table: {exc}") from exc
    if rows and "uri" not in rows[0]:
        raise InputError(f"{name}: needs a 'uri' column, found {sorted(rows[0])}")
    for row in rows:
        uri = str(row["uri"])
        path = _resolve_row(uri, location, name)
        yield SourceItem(
            uri=uri, dataset=str(row.get("dataset") or dataset), path=path, text=from_metadata(row)
        )


def list_coco(location: str, dataset: str) -> Iterator[SourceItem]:
    """Images of a COCO-format json; `file_name` is relative to the json's folder (or to `images/`)."""
    fs, fs_path = _filesystem(location)
    try:
        with fs.open_input_stream(fs_path) as stream:
            data: dict[str, Any] = json.loads(stream.read().decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{_canonical(location)}: unreadable COCO json: {exc}") from exc
    images = sorted(data["images"], key=lambda im: im["id"])
    captions: dict[int, str] = {}  # COCO captions files: annotations[].caption, first by id per image
    for ann in sorted(data.get("annotations", []), key=lambda a: a.get("id", 0)):
        if isinstance(ann.get("caption"), str):
            captions.setdefault(ann["image_id"], ann["caption"])

    def text_of(image: dict[str, Any]) -> str:
        return encode_text(image.get("caption") or captions.get(image["id"]), image.get("conversations"))

    if not is_remote(location):
        base = Path(location).parent
        for image in images:
            name = image["file_name"]
            path = base / name
            if not path.exists() and (base / "images" / name).exists():
                path = base / "images" / name
            yield SourceItem(
                uri=os.path.abspath(path), dataset=dataset, path=os.path.abspath(path), text=text_of(image)
            )
        return
    # one listing of the json's prefix instead of one existence request per image
    scheme, base_path = scheme_of(location), posixpath.dirname(fs_path)
    present = {info.path for info in _list_objects(fs, base_path, location, recursive=True)}
    for image in images:
        path = posixpath.normpath(posixpath.join(base_path, image["file_name"]))
        in_images = posixpath.normpath(posixpath.join(base_path, "images", image["file_name"]))
        if path not in present and in_images in present:
            path = in_images
        yield SourceItem(
            uri=to_uri(scheme, path), dataset=dataset, path=to_uri(scheme, path), text=text_of(image)
        )


def describe_location(location: str) -> tuple[bool, str]:
    """(is it a folder or prefix, its last name) of one --input location; InputError if it is missing."""
    if is_remote(location):
        fs, fs_path = _filesystem(location)
        return _info(fs, fs_path, location).type == pafs.FileType.Directory, PurePosixPath(fs_path).name
    path = Path(location)
    if not path.exists():
        raise InputError(f"--input {location!r} does not exist")
    return path.is_dir(), path.name


def _list_one(location: str, dataset: str) -> Iterator[SourceItem]:
    is_dir, name = describe_location(location)
    suffix = PurePosixPath(name).suffix
    if is_dir:
        yield from (
            list_prefix(location, dataset) if is_remote(location) else list_folder(Path(location), dataset)
        )
    elif suffix in TAR_SUFFIXES:
        yield from list_tar(location, dataset)
    elif suffix in TABLE_SUFFIXES:
        yield from list_table(location, dataset)
    elif suffix == ".json":
        yield from list_coco(location, dataset)
    elif is_image_name(name):
        yield SourceItem(uri=_canonical(location), dataset=dataset, path=_canonical(location))
    else:
        raise InputError(
            f"{location}: unsupported input; give a folder or prefix, .tar file(s) or glob, "
            "a .parquet/.jsonl with a 'uri' column, or a COCO .json"
        )


def _stem(location: str) -> str:
    if is_remote(location):
        return PurePosixPath(_filesystem(location)[1]).stem
    return Path(location).stem


def _listings(locations: list[str], dataset: str) -> Iterator[Iterable[SourceItem]]:
    """The listing of each location, in order. With several (e.g. a glob of tar shards), the next few are
    listed ahead in threads: listing an object store waits on requests, not on the CPU."""
    if len(locations) == 1:  # lazily, so --limit stops a huge folder walk early
        yield _list_one(locations[0], dataset or _stem(locations[0]))
        return
    pool = ThreadPoolExecutor(LISTING_THREADS, thread_name_prefix="list")
    try:
        ahead: deque[Future[list[SourceItem]]] = deque()
        pending = iter(locations)
        for location in pending:
            ahead.append(pool.submit(lambda loc: list(_list_one(loc, dataset or _stem(loc))), location))
            if len(ahead) >= LISTING_THREADS:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def list_inputs(specs: list[str], dataset: str = "", limit: int | None = None) -> list[SourceItem]:
    """All images named by the --input specs, in stable order, de-duplicated by uri, cut at `limit`."""
    items: list[SourceItem] = []
    seen: set[str] = set()
    for spec in specs:
        for listing in _listings(_expand(spec), dataset):
            for item in listing:
                if item.uri not in seen:
                    seen.add(item.uri)
                    items.append(item)
                    if limit is not None and len(items) >= limit:
                        return items
    return items


def listing_table(items: list[SourceItem]) -> pa.Table:
    return pa.Table.from_pylist([item.__dict__ for item in items], schema=LISTING_SCHEMA)


# --- reading (in the workers) --------------------------------------------------------------------------


class ReadError(Exception):
    """Bytes could not be read; the message is the reject reason."""


class TransientReadError(RetryableError):
    """An object store kept failing for a reason that is not the object's (network, throttling, 5xx)."""


# Errors that say something about the object itself: those become rejects. Any other OSError from an
# object store (pyarrow's own retries already spent) is taken as the store's trouble, not the image's.
PERMANENT_READ_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
REMOTE_READ_ATTEMPTS = 3
RETRY_BACKOFF_S = 0.5


def _too_large(size: int, max_bytes: int) -> ReadError:
    return ReadError(f"file too large: {size} bytes > decode.max_bytes={max_bytes}")


def _read_remote(uri: str, offset: int, size: int, max_bytes: int) -> tuple[bytes, int]:
    """One object or tar member from an object store, retried with backoff when the store fails.

    A missing or forbidden object is a reject (ReadError); a store that keeps failing raises
    TransientReadError, which retries the batch instead of rejecting good images.
    """
    for attempt in range(REMOTE_READ_ATTEMPTS):
        try:
            return _read_remote_once(uri, offset, size, max_bytes)
        except TransientReadError as exc:
            if attempt + 1 == REMOTE_READ_ATTEMPTS:
                raise TransientReadError(f"{exc} ({REMOTE_READ_ATTEMPTS} attempts)") from exc
            time.sleep(RETRY_BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


def _read_remote_once(uri: str, offset: int, size: int, max_bytes: int) -> tuple[bytes, int]:
    """One object or tar member (one ranged GET once the size is known), and its size."""
    try:
        fs, fs_path = filesystem_for(uri)
        if offset >= 0 and size > max_bytes:
            raise _too_large(size, max_bytes)
        with fs.open_input_file(fs_path) as handle:  # opening learns the object size (one HEAD request)
            if offset < 0:
                offset, size = 0, handle.size()
                if size > max_bytes:
                    raise _too_large(size, max_bytes)
            return handle.read_at(size, offset), size
    except (StorageError, *PERMANENT_READ_ERRORS) as exc:
        raise ReadError(f"unreadable: {exc}") from exc
    except OSError as exc:
        raise TransientReadError(f"object store read failed: {uri}: {exc}") from exc


def read_bytes(path: str, offset: int, size: int, max_bytes: int, problem: str = "") -> bytes:
    """Bytes of a file, object or tar member, refusing anything over `max_bytes` before reading it.

    `problem` is the listing's verdict on the item (unsafe tar member, truncated archive): it is the reason.
    """
    if problem:
        raise ReadError(problem)
    if is_remote(path):
        data, size = _read_remote(path, offset, size, max_bytes)
    else:
        try:
            if offset < 0:
                size = os.path.getsize(path)
            if size > max_bytes:
                raise _too_large(size, max_bytes)
            with open(path, "rb") as handle:
                if offset >= 0:
                    handle.seek(offset)
                data = handle.read(size)
        except OSError as exc:
            raise ReadError(f"unreadable: {exc.strerror or exc}") from exc
    if len(data) != size:
        raise ReadError(f"short read: got {len(data)} of {size} bytes")
    return data
