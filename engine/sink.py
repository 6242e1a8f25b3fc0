"""Write records to shards, the parquet index and rejects; commit atomically; know what is committed.

Layout of an output folder (a local path or an object-store URI, see `engine.storage.Folder`):
  shards/PART.tar        webdataset: {key}.jpg|png + {key}.json per record, members of a sample adjacent
  index/PART.parquet     one row per record of that shard (schemas.INDEX_SCHEMA)
  rejects/PART.parquet   rejects committed with that part (schemas.REJECTS_SCHEMA)
  _commits/PART.json     the commit marker, written last; a part without it never happened
  _sources/HASH.json     how many members a source holds, written by the worker that read it to its end
  rejects.parquet        all rejects, rebuilt at the end of a run while there are at most
                         `sink.merge_rejects_max` of them (else absent: read rejects/)
  manifest.json          config, code version, counts per stage, timings

PART is `{run id}-{write task:05d}-{n:03d}`: the run id keeps parts of later runs after earlier ones in
sorted order, the write task index keeps concurrent writers apart and is the same when Ray retries a task,
so a retried task finds its own markers and never writes a record twice. Outputs of older versions used
`NNNNNN` part names; they are read and resumed the same way.

Writers run in the workers (`ShardDatasink`, Ray Data's Datasink API) or in-process (`PartWriter` used by
`--no-ray` and the COCO converter). The driver only receives per-part counts, stats and per-source ranges.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from engine.items import Item, batch_to_items
from engine.ledger import Ledger, marker_sources
from engine.stats import RunStats
from engine.storage import Folder
from engine.tar_writer import TarAppender
from schemas import (
    INDEX_SCHEMA,
    REJECTS_SCHEMA,
    final_rejects,
    is_retried,
    to_index_row,
    validate,
    validate_image,
)

log = logging.getLogger("rexverse.sink")
# Records as shard members: UTF-8 text as is. One encoder for every record (json.dumps with options
# builds a new one per call).
RECORD_JSON = json.JSONEncoder(ensure_ascii=False)

PART_DIRS = ("shards", "index", "rejects")
SUBDIRS = (*PART_DIRS, "_commits")


def part_name(run_id: str, task: int, n: int) -> str:
    return f"{run_id}-{task:05d}-{n:03d}"


@dataclass
class Committed:
    """What earlier runs committed into an output folder: per-source books, counts and stats (nothing per
    image: the key owners are loaded by the dedupe partitions themselves, from the parts named here)."""

    parts: list[str] = field(default_factory=list)
    ledger: Ledger = field(default_factory=Ledger)
    records: int = 0
    rejects: int = 0  # rejects that still stand (superseded `stage error` rows are not counted)
    stats: RunStats = field(default_factory=RunStats)  # every attempt, superseded ones included
    retry: set[str] = field(default_factory=set)  # uris whose latest outcome is a `stage error` reject

    @property
    def effective_rejects(self) -> int:
        """Rejects that stand: stage-error rejects a later part replaced do not count."""
        return self.rejects - self.ledger.superseded


class OldOutputError(ValueError):
    """An output written by an engine that resumed by image, not by source; the message says what to do."""


def clean_uncommitted(out: Folder) -> list[str]:
    """Delete every part file without a commit marker, and temp files; returns what was removed."""
    committed = {name.rsplit(".", 1)[0] for name in out.list("_commits") if name.endswith(".json")}
    removed = []
    for sub in PART_DIRS:
        for name in out.list(sub):
            if name.split(".", 1)[0] not in committed or name.startswith("."):
                out.delete(f"{sub}/{name}")
                removed.append(f"{sub}/{name}")
    for name in out.list("_commits"):
        if not name.endswith(".json"):
            out.delete(f"_commits/{name}")
            removed.append(f"_commits/{name}")
    return removed


def load_committed(out: Folder) -> Committed:
    """Read every commit marker (in commit order): per-source coverage, counts and stats."""
    state = Committed()
    for marker_name in sorted(out.list("_commits")):
        if not marker_name.endswith(".json"):
            continue
        info = json.loads(out.read_bytes(f"_commits/{marker_name}"))
        add_marker(state, info)
    return state


def add_marker(state: Committed, info: dict[str, Any]) -> None:
    """Count one commit marker (or a part's result) into `state`."""
    if "sources" not in info:
        raise OldOutputError(
            f"part {info.get('part')} was written by engine v2, which resumed image by image; this engine "
            "resumes source by source and cannot tell which members of a source that part covers. Finish "
            "or extend that output with the Rexverse version that wrote it, or write to a new --output "
            "(its shards, index and rejects still read as they are)"
        )
    state.parts.append(info["part"])
    state.ledger.add_marker(info)
    state.records += info["records"]
    state.rejects += info["rejects"]
    state.stats.merge(RunStats.from_dict(info["stats"]))
    state.stats.merge_tiers(info.get("tiers"))


def _read_parquet(out: Folder, relative: str, columns: list[str] | None = None, **kwargs: Any) -> pa.Table:
    return pq.read_table(out.path(relative), columns=columns, filesystem=out.fs, **kwargs)


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


class PartWriter:
    """Writes items (in any order) as committed parts of up to `shard_size` records.

    `known_keys` (optional) are keys already committed: a record with one becomes a reject. Engine runs
    do not need it: the run's key registry rejects such images at decode, before any model sees them.
    Each part's marker names the sources and member ordinals it covers (`engine.ledger`).
    """

    def __init__(
        self,
        out: Folder,
        run_id: str,
        task: int,
        shard_size: int,
        max_pending_rejects: int = 5000,
        known_keys: set[str] | None = None,
        records: str = "full",
    ) -> None:
        self.out = out
        self.run_id, self.task = run_id, task
        self.shard_size = shard_size
        self.max_pending_rejects = max_pending_rejects
        self.known_keys = known_keys if known_keys is not None else set()
        # "image": a pass that stops before captioning (the pool pass) writes image records only
        self.validate = validate_image if records == "image" else validate
        self.results: list[dict[str, Any]] = []
        self._n = 0
        self._open_part()

    def _open_part(self) -> None:
        # Parts can hold thousands of images: spill to a local temp file past 64 MiB, not to memory.
        self.tar_buffer = tempfile.SpooledTemporaryFile(max_size=64 * 1024 * 1024)
        self.tar = TarAppender(self.tar_buffer)  # webdataset: members of a sample one after another
        self.index_rows: list[dict[str, Any]] = []
        self.reject_rows: list[dict[str, Any]] = []
        self.items = 0
        self.ordinals: dict[str, list[int]] = {}
        self.stage_errors: dict[str, list[int]] = {}
        self.part_stats = RunStats()

    @property
    def name(self) -> str:
        return part_name(self.run_id, self.task, self._n)

    def add(self, item: Item) -> None:
        self.items += 1
        if item.source:
            self.ordinals.setdefault(item.source, []).append(item.ordinal)
            if not item.ok and is_retried(item.error_reason):
                self.stage_errors.setdefault(item.source, []).append(item.ordinal)
        if not item.ok:
            self._reject(item, item.error_stage, item.error_reason)
        else:
            errors = self.validate(item.record)
            if errors:
                self._reject(item, "schema", "invalid record: " + "; ".join(errors[:3]), sink_made=True)
            elif item.key in self.known_keys:
                self._reject(item, "sink", "duplicate: key already committed", sink_made=True)
            else:
                self._write(item)
        if len(self.index_rows) >= self.shard_size or len(self.reject_rows) >= self.max_pending_rejects:
            self.commit()

    def _reject(self, item: Item, stage: str, reason: str, sink_made: bool = False) -> None:
        self.reject_rows.append({"uri": item.uri, "key": item.key, "stage": stage, "reason": reason})
        self.part_stats.add(item, extra_reject=(stage, reason) if sink_made else None)

    def _write(self, item: Item) -> None:
        record = item.record
        self.tar.add(f"{item.key}.{record['image_ext']}", item.image)
        self.tar.add(f"{item.key}.json", RECORD_JSON.encode(record).encode())
        self.index_rows.append(to_index_row(record, f"{self.name}.tar"))
        self.known_keys.add(item.key)
        self.part_stats.add(item)

    def commit(self) -> None:
        """Make the current part durable and visible (marker last), then open the next one.

        A marker that already exists means an earlier attempt of this same task committed this part
        (Ray retried the task after the commit): keep that one and report it, write nothing twice.
        """
        self.tar.close()
        if not self.items:
            self.tar_buffer.close()
            self._open_part()
            return
        name = self.name
        marker_path = f"_commits/{name}.json"
        if self.out.exists(marker_path):
            marker = json.loads(self.out.read_bytes(marker_path))
            log.warning("part %s was already committed by an earlier attempt; keeping it", name)
        else:
            if self.index_rows:
                self.tar_buffer.seek(0)
                with self.out.open_write(f"shards/{name}.tar") as handle:
                    shutil.copyfileobj(self.tar_buffer, handle, 8 * 1024 * 1024)
                index = pa.Table.from_pylist(self.index_rows, schema=INDEX_SCHEMA)
                self.out.write_bytes(f"index/{name}.parquet", _parquet_bytes(index))
            if self.reject_rows:
                rejects = pa.Table.from_pylist(self.reject_rows, schema=REJECTS_SCHEMA)
                self.out.write_bytes(f"rejects/{name}.parquet", _parquet_bytes(rejects))
            marker = {
                "part": name,
                "records": len(self.index_rows),
                "rejects": len(self.reject_rows),
                "stats": self.part_stats.to_dict(),
                "tiers": self.part_stats.tiers_dict(),
                "sources": marker_sources(self.ordinals, self.stage_errors),
            }
            self.out.write_bytes(marker_path, json.dumps(marker, indent=1).encode())
            log.info("committed part %s: %d records, %d rejects", name, marker["records"], marker["rejects"])
        self.results.append(marker)
        self.tar_buffer.close()
        self._n += 1
        self._open_part()

    def close(self) -> list[dict[str, Any]]:
        """Commit what is pending; returns one result per part (its marker's fields)."""
        self.commit()
        self.tar.close()
        self.tar_buffer.close()
        return self.results


def make_datasink(
    out: Folder, run_id: str, shard_size: int, max_pending_rejects: int, records: str = "full"
) -> Any:
    """A `ray.data.Datasink`: each write task (in a worker) writes and commits its own parts.

    Defined inside a function so that importing the sink never imports Ray. `on_write_complete` runs on
    the driver and keeps only each part's marker (counts, stats, per-source ranges).
    """
    from ray.data import Datasink

    class ShardDatasink(Datasink):
        def __init__(self) -> None:
            self.results: list[dict[str, Any]] = []

        @property
        def min_rows_per_write(self) -> int:
            return shard_size

        def write(self, blocks: Iterable[Any], ctx: Any) -> list[dict[str, Any]]:
            from ray.data.block import BlockAccessor

            writer = PartWriter(out, run_id, ctx.task_idx, shard_size, max_pending_rejects, records=records)
            for block in blocks:
                batch = BlockAccessor.for_block(block).to_numpy()
                for item in batch_to_items(batch):
                    writer.add(item)
            return writer.close()

        def on_write_complete(self, write_result: Any) -> None:
            for task_results in write_result.write_returns:
                self.results.extend(task_results)

        def get_name(self) -> str:
            return "ShardWrite"

    return ShardDatasink()


def merge_rejects(out: Folder, max_rows: int) -> int | None:
    """Rebuild `rejects.parquet` from the committed parts when they hold at most `max_rows` rejects (small
    outputs, for convenience); returns its rows, or None when the output is past that size: then readers
    read `rejects/` (one file per part) and no merged file is left to go stale.

    Only the rejects that still stand (`schemas.final_rejects`: a stage-error row that a later attempt of
    its uri replaced is left out).
    """
    committed = {name.removesuffix(".json") for name in out.list("_commits") if name.endswith(".json")}
    names = sorted(n.removesuffix(".parquet") for n in out.list("rejects") if n.endswith(".parquet"))
    names = [n for n in names if n in committed]
    total = sum(pq.ParquetFile(out.open_input(f"rejects/{n}.parquet")).metadata.num_rows for n in names)
    if total > max_rows:
        if out.exists("rejects.parquet"):
            out.delete("rejects.parquet")
        return None
    parts = [
        (n, pq.read_table(out.path(f"rejects/{n}.parquet"), schema=REJECTS_SCHEMA, filesystem=out.fs))
        for n in names
    ]
    record_uris: set[str] = set()
    if any(is_retried(r) for _, table in parts for r in table["reason"].to_pylist()):
        for part in committed:
            if out.exists(f"index/{part}.parquet"):
                index = _read_parquet(out, f"index/{part}.parquet", ["source_uri"])
                record_uris.update(index["source_uri"].to_pylist())
    table = final_rejects(parts, record_uris)
    out.write_bytes("rejects.parquet", _parquet_bytes(table))
    return table.num_rows
