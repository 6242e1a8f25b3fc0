"""Work units: the driver lists sources, the workers read them.

A unit is one tar file, one page of loose files (a folder or object-store prefix, `sources.page_files` per
page), one row group of a parquet table, one jsonl table or one COCO json. The driver never opens a tar or an
image: it lists file names and sizes only. A worker reads its unit front to back (a tar in one sequential
streaming read, members in archive order, never a request per member) and emits one row per image member
with its bytes, under the same bounds as item-level reading (`engine.sources`): unsafe member names, links
and devices, truncated or corrupt archives, oversized members and unreadable files become rows with a
`problem`, which decode turns into rejects with that reason.

Members get ordinals in the order a worker emits them (deterministic for the same source), which is what
commit markers and resume count (`engine.ledger`). When a worker has read a whole source it records how many
members it holds in `_sources/` of the output, so the run can check that every member came back.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from engine.input_text import MAX_TEXT_BYTES, TEXT_SUFFIXES, sample_text
from engine.ledger import Ranges, contains
from engine.sources import (
    LISTING_SCHEMA,
    TABLE_SUFFIXES,
    TAR_SUFFIXES,
    InputError,
    ReadError,
    SourceItem,
    _BoundedTarInfo,
    _canonical,
    _expand,
    _filesystem,
    _info,
    _stem,
    describe_location,
    is_image_name,
    list_coco,
    list_folder,
    list_prefix,
    list_table,
    list_tar,
    read_bytes,
    sample_key,
    sidecar_path,
    unsafe_member,
)
from engine.storage import Folder, is_remote

SOURCES_DIR = "_sources"
# Rows a worker reads per output batch: a few MB of images, so a unit streams through the stages in pieces.
STREAM_READ_BYTES = 8 << 20  # one sequential read of a tar is buffered in pieces of this size

UNIT_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("kind", pa.string()),
        ("location", pa.string()),
        ("dataset", pa.string()),
        ("entries", pa.string()),  # files pages: JSON [[path, siblings], ...]
        ("row_group", pa.int64()),
        ("skip", pa.string()),  # JSON [[start, end], ...]: ordinals committed for good
        ("max_members", pa.int64()),  # -1: all; else read ordinals below this only (--limit)
    ]
)

# A listing row (the stages' input contract) plus the bytes and where the member stands in its source.
ROW_SCHEMA = pa.schema(
    [
        *LISTING_SCHEMA,
        pa.field("data", pa.binary()),  # the bytes, read by the unit's worker (null when `problem` is set)
        pa.field("source", pa.string()),
        pa.field("ordinal", pa.int64()),
    ]
)


@dataclass
class SourceUnit:
    source: str
    kind: str  # tar | files | table | coco
    location: str
    dataset: str
    entries: str = ""
    row_group: int = -1
    skip: str = ""
    max_members: int = -1


# --- listing (the driver) ---------------------------------------------------------------------------------


def _pages(items: Iterator[SourceItem], root: str, dataset: str, page_files: int) -> Iterator[SourceUnit]:
    page: list[list[str]] = []
    n = 0
    for item in items:
        page.append([item.path, item.siblings])
        if len(page) >= page_files:
            yield SourceUnit(f"{root}#files{n:06d}", "files", root, dataset, json.dumps(page))
            page, n = [], n + 1
    if page:
        yield SourceUnit(f"{root}#files{n:06d}", "files", root, dataset, json.dumps(page))


def _units_of(location: str, dataset: str, page_files: int) -> Iterator[SourceUnit]:
    """The units of one input location (a folder, prefix, tar, table, COCO json or single image)."""
    is_dir, name = describe_location(location)
    suffix = PurePosixPath(name).suffix
    canonical = _canonical(location)
    if is_dir:
        items = (
            list_prefix(location, dataset) if is_remote(location) else list_folder(Path(location), dataset)
        )
        yield from _pages(items, canonical.rstrip("/"), dataset, page_files)
    elif suffix in TAR_SUFFIXES:
        yield SourceUnit(canonical, "tar", canonical, dataset)
    elif suffix == ".parquet":
        fs, fs_path = _filesystem(location)
        try:
            groups = pq.ParquetFile(fs.open_input_file(fs_path)).num_row_groups
        except (OSError, ValueError) as exc:
            raise InputError(f"{canonical}: unreadable table: {exc}") from exc
        for group in range(groups):
            yield SourceUnit(f"{canonical}#rowgroup{group}", "table", location, dataset, row_group=group)
    elif suffix in TABLE_SUFFIXES:
        yield SourceUnit(canonical, "table", location, dataset)
    elif suffix == ".json":
        yield SourceUnit(canonical, "coco", location, dataset)
    elif is_image_name(name):
        yield SourceUnit(canonical, "files", canonical, dataset, json.dumps([[canonical, ""]]))
    else:
        raise InputError(
            f"{location}: unsupported input; give a folder or prefix, .tar file(s) or glob, "
            "a .parquet/.jsonl with a 'uri' column, or a COCO .json"
        )


def list_units(specs: list[str], dataset: str = "", page_files: int = 1000) -> Iterator[SourceUnit]:
    """Every source named by the --input specs, in stable order, each once. Reads no image and no tar."""
    seen: set[str] = set()
    for spec in specs:
        for location in _expand(spec):
            for unit in _units_of(location, dataset or _stem(location), page_files):
                if unit.source not in seen:
                    seen.add(unit.source)
                    yield unit


def count_members(unit: SourceUnit) -> int:
    """How many members a unit holds, by listing it (tar headers included): only for --limit, which must
    know where the first N images end."""
    return sum(1 for _ in _unit_items(unit))


def units_table(units: list[SourceUnit]) -> pa.Table:
    return pa.Table.from_pylist([asdict(u) for u in units], schema=UNIT_SCHEMA)


# --- reading (the workers) --------------------------------------------------------------------------------


class _ForwardReader(io.RawIOBase):
    """A sequential stream that tarfile may `seek` forward on (skipping by reading), and back by at most
    the last `KEEP` bytes it returned (to look at a header again), never further.

    tarfile's `r:` mode seeks between headers and data; over one streaming read of the archive every such
    seek is forward, so the archive is read once, front to back, in one request on an object store.
    """

    KEEP = 1 << 16

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream, self.position = stream, 0
        self.tail = b""  # the last bytes returned, for a short look back
        self.replay = b""  # bytes to return again after a seek back

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer: Any) -> int:
        if self.replay:
            data, self.replay = self.replay[: len(buffer)], self.replay[len(buffer) :]
        else:
            data = self.stream.read(len(buffer))
            self._keep(data)
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)

    def _keep(self, data: bytes) -> None:
        self.tail = data[-self.KEEP :] if len(data) >= self.KEEP else (self.tail + data)[-self.KEEP :]

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset if whence == io.SEEK_SET else self.position + offset
        if whence == io.SEEK_END:
            raise io.UnsupportedOperation("a streamed tar has no known end")
        if target < self.position:
            if self.position - target > len(self.tail) - len(self.replay):
                raise io.UnsupportedOperation("a streamed tar is read forward only")
            end = len(self.tail) - len(self.replay)
            self.replay = self.tail[end - (self.position - target) : end] + self.replay
            self.position = target
            return target
        while self.position < target:
            if self.replay:
                step = min(len(self.replay), target - self.position)
                self.replay, self.position = self.replay[step:], self.position + step
                continue
            chunk = self.stream.read(min(STREAM_READ_BYTES, target - self.position))
            if not chunk:
                break
            self._keep(chunk)
            self.position += len(chunk)
        return self.position


def _open_stream(location: str) -> tuple[IO[bytes], int]:
    fs, fs_path = _filesystem(location)
    total = _info(fs, fs_path, location).size
    try:
        return fs.open_input_stream(fs_path), total
    except OSError as exc:
        raise InputError(f"{location}: cannot open: {exc}") from exc


def _tar_rows(unit: SourceUnit, max_bytes: int) -> Iterator[dict[str, Any]]:
    """Image members of a tar, in archive order, with their bytes and their sample's caption text.

    Members of a webdataset sample lie next to each other (webdataset's own convention); a sample's
    images are emitted when the next sample starts, with its `.txt`/`.json` members as input text.
    """
    path, dataset = unit.source, unit.dataset
    raw, total = _open_stream(unit.location)
    sample_name, images, texts = "", [], {}

    def flush() -> Iterator[dict[str, Any]]:
        text = sample_text(texts) if texts else ""
        for row in images:
            row["text"] = text
            yield row

    def row(name: str, data: bytes | None, problem: str = "", size: int = -1) -> dict[str, Any]:
        return {
            "uri": f"{path}#{name}",
            "dataset": dataset,
            "path": path,
            "offset": -1,
            "size": size,
            "problem": problem,
            "siblings": "",
            "text": "",
            "data": data,
        }

    with raw, io.BufferedReader(_ForwardReader(raw), buffer_size=STREAM_READ_BYTES) as stream:
        try:
            tar = tarfile.open(fileobj=stream, mode="r:", tarinfo=_BoundedTarInfo)
        except tarfile.TarError as exc:
            raise InputError(f"{path}: not a readable (uncompressed) tar: {exc}") from exc
        cut: tuple[str, str] | None = None
        while True:
            try:
                member = tar.next()
            except tarfile.TarError as exc:
                cut = f"@{tar.offset}", f"corrupt tar after byte {tar.offset}: {exc}; the rest is lost"
                break
            if member is None:
                break
            tar.members.clear()  # tarfile keeps every header it read; one source's worth is all we need
            end = member.offset_data + (member.size if member.isreg() else 0)
            if end > total:
                cut = (
                    member.name,
                    (
                        f"truncated tar: member {member.name!r} needs bytes up to {end} but the file ends at "
                        f"byte {total}; anything after it is lost"
                    ),
                )
                break
            problem = unsafe_member(member)
            key, ext = sample_key(member.name) if not problem else ("", "")
            if key != sample_name and (images or texts):
                yield from flush()
                images, texts = [], {}
            sample_name = key or sample_name
            if problem:
                yield row(member.name, None, problem)
            elif not member.isreg():
                continue
            elif is_image_name(member.name):
                if member.size > max_bytes:
                    reason = f"file too large: {member.size} bytes > sources.max_member_bytes={max_bytes}"
                    images.append(row(member.name, None, reason, member.size))
                else:
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    images.append(row(member.name, data, "", member.size))
            elif "." + ext.rsplit(".", 1)[-1] in TEXT_SUFFIXES and member.size <= MAX_TEXT_BYTES:
                texts[ext.rsplit(".", 1)[-1]] = tar.extractfile(member).read()  # type: ignore[union-attr]
        if not cut and tar.offset < total:  # tarfile stops quietly at a cut-off or garbled header
            try:
                stream.seek(tar.offset)  # back within the read buffer at most: the stream never rewinds
                rest = stream.read(tarfile.BLOCKSIZE)
            except (io.UnsupportedOperation, OSError):
                rest = b""
            if rest.strip(b"\0"):
                cut = (
                    f"@{tar.offset}",
                    f"truncated tar: unreadable header at byte {tar.offset} of {total}; the rest is lost",
                )
    yield from flush()
    if cut:
        yield row(cut[0], None, cut[1])


def _unit_items(unit: SourceUnit) -> Iterator[SourceItem]:
    """The items of a non-tar unit (or of a tar, by its headers: --limit only), in their stable order."""
    if unit.kind == "files":
        for path, siblings in json.loads(unit.entries):
            yield SourceItem(uri=path, dataset=unit.dataset, path=path, siblings=siblings)
    elif unit.kind == "table" and unit.row_group >= 0:
        yield from list_table(unit.location, unit.dataset, row_group=unit.row_group)
    elif unit.kind == "table":
        yield from list_table(unit.location, unit.dataset)
    elif unit.kind == "coco":
        yield from list_coco(unit.location, unit.dataset)
    elif unit.kind == "tar":
        yield from list_tar(unit.location, unit.dataset)
    else:
        raise ValueError(f"unknown unit kind {unit.kind!r}")


def _sidecar_text(item: SourceItem) -> str:
    siblings = json.loads(item.siblings or "{}")
    members = {}
    for ext in ("txt", "json"):
        if ext in siblings and siblings[ext][1] <= MAX_TEXT_BYTES:
            try:
                members[ext] = read_bytes(sidecar_path(item.path, ext), -1, -1, MAX_TEXT_BYTES)
            except ReadError:
                continue  # an unreadable caption is no caption; the image itself was fine
    return sample_text(members) if members else ""


def _file_rows(unit: SourceUnit, max_bytes: int) -> Iterator[dict[str, Any]]:
    """Rows of a page of files, a table or a COCO json: each file read whole, bounded by `max_bytes`."""
    for item in _unit_items(unit):
        row = asdict(item)
        try:
            row["data"], row["problem"] = read_bytes(item.path, -1, -1, max_bytes, item.problem), ""
        except ReadError as exc:
            row["data"], row["problem"] = None, str(exc)
        if not row["text"] and item.siblings:
            row["text"] = _sidecar_text(item)
        row["siblings"] = ""
        yield row


def unit_rows(unit: SourceUnit, max_bytes: int, out: Folder | None = None) -> Iterator[dict[str, Any]]:
    """The rows of one unit, each with its `source` and `ordinal`, skipping ordinals committed for good.

    When the whole source was read, its member count is recorded in `out/_sources/` (same value on a
    retried or resumed read; a different one means the input changed and resume cannot be trusted).
    """
    skip: Ranges = [(int(a), int(b)) for a, b in json.loads(unit.skip or "[]")]
    rows = _tar_rows(unit, max_bytes) if unit.kind == "tar" else _file_rows(unit, max_bytes)
    members = 0
    for row in rows:
        if 0 <= unit.max_members <= members:
            return  # --limit: the rest of this source is not this run's
        if not contains(skip, members):
            yield row | {"source": unit.source, "ordinal": members}
        members += 1
    if out is not None:
        record_members(out, unit.source, members)


def source_file(source: str) -> str:
    return f"{SOURCES_DIR}/{hashlib.sha256(source.encode()).hexdigest()[:24]}.json"


def record_members(out: Folder, source: str, members: int) -> None:
    relative = source_file(source)
    if out.exists(relative):
        known = json.loads(out.read_bytes(relative))
        if known["members"] != members:
            raise InputError(
                f"source {source} held {known['members']} members when first read and {members} now: an "
                "input changed under a resumed output; restore it, or write to a new --output"
            )
        return
    out.write_bytes(relative, json.dumps({"source": source, "members": members}).encode())


def recorded_members(out: Folder) -> dict[str, int]:
    """source -> member count, for every source a worker has read to its end."""
    counts = {}
    for name in out.list(SOURCES_DIR):
        if name.endswith(".json"):
            info = json.loads(out.read_bytes(f"{SOURCES_DIR}/{name}"))
            counts[info["source"]] = int(info["members"])
    return counts


def rows_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def read_units_batches(
    batch: dict[str, Any], max_bytes: int, block_rows: int, out: Folder | None
) -> Iterator[pa.Table]:
    """Ray Data generator UDF: unit rows in, tables of `block_rows` member rows out, as the source is read
    (a source streams through the stages in pieces, never whole in memory)."""
    for unit in batch_units(batch):
        pending: list[dict[str, Any]] = []
        for row in unit_rows(unit, max_bytes, out):
            pending.append(row)
            if len(pending) >= block_rows:
                yield rows_table(pending)
                pending = []
        if pending:
            yield rows_table(pending)


def batch_units(batch: dict[str, Any]) -> Iterator[SourceUnit]:
    """The units of a batch of listing rows (`UNIT_SCHEMA` columns, as Ray Data passes them)."""
    for i in range(len(batch["source"])):
        yield SourceUnit(**{name: _plain(batch[name][i]) for name in UNIT_SCHEMA.names})


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
