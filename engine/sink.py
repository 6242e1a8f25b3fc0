"""Write records to shards, the parquet index and rejects; commit atomically; know what is committed.

Layout of an output folder:
  shards/NNNNNN.tar        webdataset: {key}.jpg|png + {key}.json per record, members of a sample adjacent
  index/NNNNNN.parquet     one row per record of that shard (schemas.INDEX_SCHEMA)
  rejects/NNNNNN.parquet   rejects committed with that part (schemas.REJECTS_SCHEMA)
  _commits/NNNNNN.json     the commit marker, written last; a part without it never happened
  rejects.parquet          all rejects, rebuilt at the end of each run
  manifest.json            config, code version, counts per stage, timings

A part is written under _tmp/ and renamed into place; the commit marker is the single atomic switch. On
start, anything without a marker is deleted, so a killed run leaves no partial shard behind and a rerun
continues with the next part number. One writer (the driver) makes numbering and exactly-once commits
trivial; at Rexverse scale model time dominates, not the writing of bytes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from engine.items import Item
from engine.stats import RunStats
from schemas import INDEX_SCHEMA, REJECTS_SCHEMA, to_index_row, validate

log = logging.getLogger("rexverse.sink")
PART_PATTERN = re.compile(r"^(\d{6})\.(tar|parquet|json)$")
SUBDIRS = ("shards", "index", "rejects", "_commits")


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass
class Committed:
    """What earlier runs committed into an output folder."""

    parts: list[int] = field(default_factory=list)
    uris: set[str] = field(default_factory=set)
    key_owners: dict[str, str] = field(default_factory=dict)
    records: int = 0
    rejects: int = 0
    stats: RunStats = field(default_factory=RunStats)

    @property
    def next_part(self) -> int:
        return max(self.parts, default=-1) + 1


def clean_uncommitted(out: Path) -> list[str]:
    """Delete every part file without a commit marker, and the temp folder; returns what was removed."""
    committed = {p.stem for p in (out / "_commits").glob("*.json")}
    removed = []
    for sub in ("shards", "index", "rejects"):
        for path in (out / sub).glob("*"):
            match = PART_PATTERN.match(path.name)
            if match is None or match.group(1) not in committed:
                path.unlink()
                removed.append(str(path))
    shutil.rmtree(out / "_tmp", ignore_errors=True)
    return removed


def load_committed(out: Path) -> Committed:
    """Scan committed parts: uris already handled, key owners, counts and stats."""
    state = Committed()
    for marker in sorted((out / "_commits").glob("*.json")):
        info = json.loads(marker.read_text())
        part = int(marker.stem)
        state.parts.append(part)
        state.records += info["records"]
        state.rejects += info["rejects"]
        state.stats.merge(RunStats.from_dict(info["stats"]))
        state.stats.merge_tiers(info.get("tiers"))
        if info["records"]:
            index = pq.read_table(out / "index" / f"{part:06d}.parquet", columns=["key", "source_uri"])
            for key, uri in zip(index["key"].to_pylist(), index["source_uri"].to_pylist(), strict=True):
                state.uris.add(uri)
                state.key_owners[key] = uri
        if info["rejects"]:
            rejects = pq.read_table(out / "rejects" / f"{part:06d}.parquet", columns=["uri", "key"])
            for uri, key in zip(rejects["uri"].to_pylist(), rejects["key"].to_pylist(), strict=True):
                state.uris.add(uri)
                if key:
                    state.key_owners.setdefault(key, uri)
    return state


class ShardSink:
    """Consumes items (in any order) and commits parts of up to `shard_size` records."""

    def __init__(self, out: Path, shard_size: int, max_pending_rejects: int, committed: Committed) -> None:
        self.out = out
        self.shard_size = shard_size
        self.max_pending_rejects = max_pending_rejects
        self.next_part = committed.next_part
        self.committed_keys = set(committed.key_owners)
        self.run_stats = RunStats()
        self.records_written = 0
        self.rejects_written = 0
        for sub in (*SUBDIRS, "_tmp"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        self._open_part()

    def _open_part(self) -> None:
        self.tmp_tar = self.out / "_tmp" / f"{self.next_part:06d}.tar"
        self.writer = wds.TarWriter(str(self.tmp_tar))
        self.index_rows: list[dict[str, Any]] = []
        self.reject_rows: list[dict[str, Any]] = []
        self.part_stats = RunStats()

    def add(self, item: Item) -> None:
        if not item.ok:
            self._reject(item, item.error_stage, item.error_reason)
            return
        errors = validate(item.record)
        if errors:
            self._reject(item, "schema", "invalid record: " + "; ".join(errors[:3]), sink_made=True)
        elif item.key in self.committed_keys:
            self._reject(item, "sink", "duplicate: key already committed", sink_made=True)
        else:
            self._write(item)
        if len(self.index_rows) >= self.shard_size or len(self.reject_rows) >= self.max_pending_rejects:
            self.commit()

    def _reject(self, item: Item, stage: str, reason: str, sink_made: bool = False) -> None:
        self.reject_rows.append({"uri": item.uri, "key": item.key, "stage": stage, "reason": reason})
        if sink_made:
            self.part_stats.add(item, extra_reject=(stage, reason))
        else:
            self.part_stats.add(item)

    def _write(self, item: Item) -> None:
        record = item.record
        shard = f"{self.next_part:06d}.tar"
        self.writer.write(
            {
                "__key__": item.key,
                record["image_ext"]: item.image,
                "json": json.dumps(record, ensure_ascii=False).encode(),
            }
        )
        self.index_rows.append(to_index_row(record, shard))
        self.committed_keys.add(item.key)
        self.part_stats.add(item)

    def commit(self) -> None:
        """Make the current part durable and visible (marker last), then open the next one."""
        self.writer.close()
        if not self.index_rows and not self.reject_rows:
            self.tmp_tar.unlink(missing_ok=True)
            self._open_part()
            return
        name = f"{self.next_part:06d}"
        tmp = self.out / "_tmp"
        if self.index_rows:
            pq.write_table(
                pa.Table.from_pylist(self.index_rows, schema=INDEX_SCHEMA), tmp / f"{name}.parquet"
            )
            os.replace(self.tmp_tar, self.out / "shards" / f"{name}.tar")
            os.replace(tmp / f"{name}.parquet", self.out / "index" / f"{name}.parquet")
        else:
            self.tmp_tar.unlink(missing_ok=True)
        if self.reject_rows:
            rejects = pa.Table.from_pylist(self.reject_rows, schema=REJECTS_SCHEMA)
            pq.write_table(rejects, tmp / f"{name}.rejects.parquet")
            os.replace(tmp / f"{name}.rejects.parquet", self.out / "rejects" / f"{name}.parquet")
        marker = {
            "part": self.next_part,
            "records": len(self.index_rows),
            "rejects": len(self.reject_rows),
            "stats": self.part_stats.to_dict(),
            "tiers": self.part_stats.tiers_dict(),
        }
        atomic_write(self.out / "_commits" / f"{name}.json", json.dumps(marker, indent=1).encode())
        self.records_written += len(self.index_rows)
        self.rejects_written += len(self.reject_rows)
        self.run_stats.merge(self.part_stats)
        log.info(
            "committed part %s: %d records, %d rejects (this run: %d records, %d rejects)",
            name,
            len(self.index_rows),
            len(self.reject_rows),
            self.records_written,
            self.rejects_written,
        )
        self.next_part += 1
        self._open_part()

    def close(self) -> None:
        self.commit()
        self.writer.close()
        self.tmp_tar.unlink(missing_ok=True)


def merge_rejects(out: Path) -> int:
    """Rebuild `rejects.parquet` from the committed parts (atomic); returns the number of rows."""
    parts = sorted((out / "rejects").glob("*.parquet"))
    tables = [pq.read_table(p, schema=REJECTS_SCHEMA) for p in parts]
    table = pa.concat_tables(tables) if tables else REJECTS_SCHEMA.empty_table()
    tmp = out / ".rejects.parquet.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, out / "rejects.parquet")
    return table.num_rows
