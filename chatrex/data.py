"""From shard rows (webdataset members) to ChatRex samples, the same way for training and evaluation."""

from __future__ import annotations

import hashlib
import io
import json
import random
from typing import Any

from PIL import Image

from chatrex.processor import ChatRexProcessor
from chatrex.tasks import sample_task
from schemas import check_version

IMAGE_KEYS = ("jpg", "png")


class ShardRowError(ValueError):
    """A shard row cannot be used (unknown schema version, no image); the message says which."""


def decode_row(row: dict[str, Any]) -> tuple[dict[str, Any], Image.Image]:
    """(record, RGB image) of a raw webdataset row read with `decoder=None` (bytes members)."""
    record = row["json"]
    if isinstance(record, bytes | bytearray | str):
        record = json.loads(record)
    problem = check_version(record)
    if problem:
        raise ShardRowError(f"{row.get('__key__')}: {problem}")
    data = next((row[k] for k in IMAGE_KEYS if row.get(k) is not None), None)
    if data is None:
        raise ShardRowError(f"{row.get('__key__')}: no jpg/png member")
    return record, Image.open(io.BytesIO(bytes(data))).convert("RGB")


def sample_seed(seed: int, epoch: int, key: str) -> int:
    """Per (run seed, epoch, record) seed: a record gets a different task each epoch, reproducibly."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def training_sample(
    row: dict[str, Any],
    processor: ChatRexProcessor,
    seed: int,
    epoch: int,
    max_boxes: int,
    weights: dict[str, float] | None = None,
    candidates: str = "mixed",
) -> dict[str, Any] | None:
    """One encoded (image, boxes, question, answer) sample of the task mix, or None if the record has none."""
    record, image = decode_row(row)
    rng = random.Random(sample_seed(seed, epoch, record["key"]))
    drawn = sample_task(record, rng, min(max_boxes, processor.num_object_tokens), weights, candidates)
    if drawn is None:
        return None
    boxes, task = drawn
    return processor.encode(image, boxes.boxes, task.question, task.answer)
