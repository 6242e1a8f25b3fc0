"""Read engine outputs (the `--from` folders) without modifying them: manifest, committed parts, records.

Only parts with a commit marker count (a crashed run can leave unmarked part files; the engine deletes them
on its next start, but a release must not ship them). Which tar holds a record is read from the index's
`shard` column, not derived from part names. Record bytes are located inside the input tars once
(member offsets via `tarfile`), then read by range, so repacking in key order needs no local copy of the
input shards and no image in memory beyond the one being copied.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from engine.storage import Folder
from schemas import final_rejects, is_retried


class InputError(ValueError):
    """An --from folder is not a usable engine output; the message says what to do."""


@dataclass(frozen=True)
class Member:
    """Where one record's files sit: input number, shard path, and (offset, size) per extension."""

    source: int
    shard: str
    parts: tuple[tuple[str, int, int], ...]  # (ext, offset, size), ext sorted


@dataclass
class EngineOutput:
    """One --from folder: its manifest, committed parts and (optional) audit."""

    loc: Folder
    number: int
    manifest: dict[str, Any]
    manifest_bytes: bytes
    commit_markers: dict[str, bytes]
    audit: dict[str, Any] | None
    parts: list[str] = field(default_factory=list)  # committed part names, e.g. "000000"

    @property
    def uri(self) -> str:
        return self.loc.uri


def open_output(uri: str, number: int) -> EngineOutput:
    loc = Folder(uri)
    if not loc.is_file("manifest.json"):
        raise InputError(
            f"{uri} has no manifest.json: --from must be an engine output folder "
            "(written by pipelines/rexverse2m.py and finished at least once)"
        )
    manifest_bytes = loc.read_bytes("manifest.json")
    markers = {rel.split("/")[-1][:-5]: loc.read_bytes(rel) for rel in loc.files("_commits", ".json")}
    audit = json.loads(loc.read_text("audit.json")) if loc.is_file("audit.json") else None
    out = EngineOutput(loc, number, json.loads(manifest_bytes), manifest_bytes, markers, audit)
    index_parts = [rel.split("/")[-1][: -len(".parquet")] for rel in loc.files("index", ".parquet")]
    # a part counts once its commit marker exists (an output without markers counts every index file)
    out.parts = [p for p in index_parts if p in markers or not markers]
    return out


def index_keys(out: EngineOutput) -> pa.Table:
    """(key, image_ext, shard) of every committed record of `out`; shard relative to the output folder."""
    tables = []
    for part in out.parts:
        table = pq.read_table(
            out.loc.open_input(f"index/{part}.parquet"), columns=["key", "image_ext", "shard"]
        )
        shard = pa.array([f"shards/{name}" for name in table["shard"].to_pylist()], pa.string())
        tables.append(table.select(["key", "image_ext"]).append_column("shard", shard))
    if not tables:
        return pa.table({"key": pa.array([], pa.string()), "image_ext": [], "shard": []})
    return pa.concat_tables(tables)


def rejects(out: EngineOutput) -> pa.Table:
    """The committed rejects of `out`: per committed part, else the merged rejects.parquet."""
    parts = [
        (rel.split("/")[-1][: -len(".parquet")], pq.read_table(out.loc.open_input(rel)))
        for rel in out.loc.files("rejects", ".parquet")
        if rel.split("/")[-1][: -len(".parquet")] in out.commit_markers or not out.commit_markers
    ]
    if not parts and out.loc.is_file("rejects.parquet"):
        return pq.read_table(out.loc.open_input("rejects.parquet"))
    if not parts:
        return pa.table({c: pa.array([], pa.string()) for c in ("uri", "key", "stage", "reason")})
    record_uris: set[str] = set()
    if any(is_retried(reason) for _, table in parts for reason in table["reason"].to_pylist()):
        for part in out.parts:  # a stage-error reject retried into a record no longer stands
            index = pq.read_table(out.loc.open_input(f"index/{part}.parquet"), columns=["source_uri"])
            record_uris.update(index["source_uri"].to_pylist())
    return final_rejects(parts, record_uris)


def locate_members(out: EngineOutput, shard: str) -> dict[str, dict[str, tuple[int, int]]]:
    """key -> {ext: (data offset, size)} for every member of one input tar (headers only are read)."""
    found: dict[str, dict[str, tuple[int, int]]] = {}
    with out.loc.open_input(shard) as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, ext = info.name.partition(".")
            found.setdefault(key, {})[ext] = (info.offset_data, info.size)
    return found


def read_member(out: EngineOutput, shard: str, offset: int, size: int) -> bytes:
    with out.loc.open_input(shard) as f:
        f.seek(offset)
        return f.read(size)
