"""One process per source: read it, run every stage of a single fused group over it, write its parts.

For a chain that is one stage group (the pool pass: decode and collect without GPU classifiers) the usual
Ray Data chain (read task -> stage actor -> write task) moves every image's bytes through Arrow and the
object store twice, which costs more than decoding a small image. Here the group's actors take source
rows (one per tar, page or row group) and do all three in-process; only each part's commit marker goes
back to the driver. Parts are named by the source (a stable number from its name), so a source that Ray
retries after a lost actor writes the same parts again and keeps the ones already committed.
"""

from __future__ import annotations

import gc
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from engine.sink import PartWriter
from engine.stage import Stage, StageGroup
from engine.storage import Folder
from engine.units import SourceUnit, batch_units, unit_rows


def source_task_number(source: str) -> int:
    """A stable part-name number per source (48 bits of its hash: unique across any real pool)."""
    return int(hashlib.sha256(source.encode()).hexdigest()[:12], 16)


class SourceWorker:
    """A Ray Data callable class: unit rows in, the commit markers of the parts it wrote out (as JSON)."""

    def __init__(
        self,
        members: Sequence[tuple[type[Stage], dict[str, Any]]],
        torch_threads: int,
        out: Folder,
        run_id: str,
        batch_size: int,
        max_bytes: int,
        shard_size: int,
        max_pending_rejects: int,
        records: str,
    ) -> None:
        self.group = StageGroup(members, torch_threads)
        # Everything loaded so far (Ray, pyarrow, the stages) lives as long as the actor: out of the
        # collector's reach, its full collections only walk what the work itself allocates.
        gc.freeze()
        self.out, self.run_id = out, run_id
        self.batch_size, self.max_bytes = batch_size, max_bytes
        self.shard_size, self.max_pending_rejects, self.records = shard_size, max_pending_rejects, records

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        markers = [marker for unit in batch_units(batch) for marker in self.process(unit)]
        return {"marker": np.array([json.dumps(m) for m in markers], dtype=object)}

    def process(self, unit: SourceUnit) -> list[dict[str, Any]]:
        writer = PartWriter(
            self.out,
            self.run_id,
            source_task_number(unit.source),
            self.shard_size,
            self.max_pending_rejects,
            records=self.records,
        )
        rows: list[dict[str, Any]] = []
        for row in unit_rows(unit, self.max_bytes, self.out):
            rows.append(row)
            if len(rows) >= self.batch_size:
                self._write(rows, writer)
                rows = []
        if rows:
            self._write(rows, writer)
        return writer.close()

    def _write(self, rows: list[dict[str, Any]], writer: PartWriter) -> None:
        for item in self.group.run_rows(rows):
            writer.add(item)
