"""The unit that flows between stages: one image with its growing record, or its rejection.

Across Ray the item travels as flat columns (record and trace as JSON text): nested Python structures
would make Arrow infer a different schema per block (an empty region list has no type), so the record
stays opaque to Ray and typed only in `schemas/`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

COLUMNS = ("key", "uri", "image", "record", "error_stage", "error_reason", "trace", "source", "ordinal")


@dataclass
class Item:
    key: str
    uri: str
    image: bytes
    record: dict[str, Any] | None
    error_stage: str = ""
    error_reason: str = ""
    trace: dict[str, dict[str, float]] = field(default_factory=dict)
    source: str = ""  # the work unit it came from (engine.units) and its place there, for the books
    ordinal: int = -1

    @property
    def ok(self) -> bool:
        return not self.error_stage

    def reject(self, stage: str, reason: str) -> None:
        """Mark the whole image as rejected; later stages pass it through untouched, the sink writes it."""
        self.error_stage, self.error_reason = stage, reason
        self.image = b""

    def drop(self, stage: str, what: str, reason: str) -> None:
        """Record that part of the image (a phrase, a region) was removed, and why (kept for audits)."""
        assert self.record is not None
        self.record.setdefault("dropped", []).append({"stage": stage, "what": what, "reason": reason})


def _column(values: list[Any]) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def items_to_batch(items: list[Item]) -> dict[str, np.ndarray]:
    return {
        "key": _column([i.key for i in items]),
        "uri": _column([i.uri for i in items]),
        "image": _column([i.image for i in items]),
        "record": _column([json.dumps(i.record) if i.record is not None else "" for i in items]),
        "error_stage": _column([i.error_stage for i in items]),
        "error_reason": _column([i.error_reason for i in items]),
        "trace": _column([json.dumps(i.trace) for i in items]),
        "source": _column([i.source for i in items]),
        "ordinal": np.array([i.ordinal for i in items], dtype=np.int64),
    }


def _as_bytes(value: Any) -> bytes:
    if value is None:
        return b""
    if isinstance(value, np.ndarray):  # Ray may hand binary columns back as uint8 arrays
        return value.tobytes()
    return bytes(value)


def batch_to_items(batch: dict[str, Any]) -> list[Item]:
    n = len(batch["key"])
    return [
        Item(
            key=str(batch["key"][i]),
            uri=str(batch["uri"][i]),
            image=_as_bytes(batch["image"][i]),
            record=json.loads(batch["record"][i]) if batch["record"][i] else None,
            error_stage=str(batch["error_stage"][i] or ""),
            error_reason=str(batch["error_reason"][i] or ""),
            trace=json.loads(batch["trace"][i]) if batch["trace"][i] else {},
            source=str(batch["source"][i] or "") if "source" in batch else "",
            ordinal=int(batch["ordinal"][i]) if "ordinal" in batch else -1,
        )
        for i in range(n)
    ]
