"""Pixels and targets for UPN: image preprocessing, and which boxes each granularity must propose.

Targets per granularity (paper section 3.1: the fine-grained prompt is trained on part-level annotations,
the coarse-grained prompt on whole objects):
- coarse: every object box of the record (its `regions`), excluding regions flagged as parts;
- fine: part boxes (`regions[].part` true) when the record has any; otherwise (the synthetic scenes and
  most detection data have no parts) the small objects: boxes whose side sqrt(w*h) is below
  `SMALL_SIDE` of the image's shorter side. 0.18 sits in the gap between the scene generator's "small"
  (0.10-0.17 of the shorter side) and "medium" (>= 0.185 measured) size classes.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

SMALL_SIDE = 0.18


def preprocess(
    images: Sequence[Image.Image], size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """(B, 3, size, size): each RGB image resized to a square (boxes are predicted relative to the image,
    so the aspect change is undone when they are scaled back) and normalized."""
    tensors = [TF.to_image(image.convert("RGB")) for image in images]
    resized = [TF.resize(t, [size, size], antialias=True) for t in tensors]
    batch = TF.to_dtype(torch.stack(resized), torch.float32, scale=True)
    return TF.normalize(batch, list(mean), list(std))


def is_small(box: Sequence[float], width: int, height: int, small_side: float = SMALL_SIDE) -> bool:
    """True when an xyxy box's side sqrt(w*h) is below `small_side` of the image's shorter side."""
    w, h = max(0.0, box[2] - box[0]), max(0.0, box[3] - box[1])
    return (w * h) ** 0.5 < small_side * min(width, height)


def granularity_boxes(record: dict[str, Any], small_side: float = SMALL_SIDE) -> dict[str, list[list[float]]]:
    """xyxy pixel boxes per granularity for one Rexverse record (see the module docstring)."""
    regions = record.get("regions", [])
    width, height = record["width"], record["height"]
    parts = [r["box"] for r in regions if r.get("part")]
    objects = [r["box"] for r in regions if not r.get("part")]
    fine = parts if parts else [b for b in objects if is_small(b, width, height, small_side)]
    return {"coarse": objects, "fine": fine}


def normalized_cxcywh(boxes: Sequence[Sequence[float]], width: int, height: int) -> torch.Tensor:
    """xyxy pixel boxes -> (N, 4) cxcywh in [0, 1], the form the model predicts."""
    if not boxes:
        return torch.zeros(0, 4)
    b = torch.tensor(boxes, dtype=torch.float32) / torch.tensor([width, height, width, height])
    b = b.clamp(0, 1)
    return torch.stack(
        [(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1
    )


def hflip(
    image: Image.Image, targets: dict[str, torch.Tensor]
) -> tuple[Image.Image, dict[str, torch.Tensor]]:
    """Mirror an image and its normalized cxcywh targets (the one augmentation training uses)."""
    flipped = {
        g: torch.stack([1 - t[:, 0], t[:, 1], t[:, 2], t[:, 3]], 1) if len(t) else t
        for g, t in targets.items()
    }
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), flipped


def row_image(row: dict[str, Any]) -> Image.Image:
    """The image of one webdataset row of a Rexverse shard (stored as .jpg or .png)."""
    for ext in ("jpg", "png", "jpeg"):
        data = row.get(ext)
        if data is not None and len(data):
            return Image.open(io.BytesIO(bytes(data))).convert("RGB")
    raise ValueError(f"shard row {row.get('__key__')!r} has no image member")


def training_example(
    row: dict[str, Any], granularities: Sequence[str], small_side: float, rng: np.random.Generator
) -> tuple[Image.Image, dict[str, torch.Tensor]]:
    """(image, {granularity: normalized cxcywh targets}) from one shard row, randomly mirrored."""
    import json

    record = json.loads(bytes(row["json"]))
    image = row_image(row)
    boxes = granularity_boxes(record, small_side)
    targets = {g: normalized_cxcywh(boxes[g], record["width"], record["height"]) for g in granularities}
    if rng.random() < 0.5:
        image, targets = hflip(image, targets)
    return image, targets
