"""Candidate boxes for evaluation that never hold the answer verbatim, and their COCO-results exchange format.

ChatRex answers by naming input boxes, so whatever supplies those boxes decides how hard the question is. In
the paper the candidates come from a proposal network (never from the annotations) and carry its
confidence. This module gives three honest sources:

- the `proposals` a Rexverse record carries (the engine's proposal stage, or a detections file);
- a COCO detection-results file (`load_proposals`, and `export_proposals` writes one from shards);
- `synthetic_proposals`, a documented stand-in proposal model for the synthetic benchmark scenes only.

The synthetic model, per image:

- every object yields 1-2 jittered copies of its box, each with IoU to the object's box drawn in
  `JITTER_IOU` (0.55-0.95), so the candidate that best covers an object is good but never exact;
- `distractors` more boxes, alternating between background patches (IoU < 0.2 with every object) and
  partial boxes (IoU 0.2-0.45 with one object, < 0.5 with every object); both take their width and height
  from a real object of the same image (each side scaled by 0.8-1.25), so shape alone tells nothing;
- every candidate's score is drawn from one uniform distribution, independent of what the box is, so the
  score carries no information about correctness;
- candidates are shuffled; a box equal to an annotated box (within 1e-3 px) is never emitted.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torchvision.ops import box_iou

JITTER_IOU = (0.55, 0.95)
PARTIAL_IOU = (0.2, 0.45)
BACKGROUND_MAX_IOU = 0.2
VERBATIM_TOLERANCE = 1e-3  # px: a candidate this close to an annotated box on every side *is* that box

Box = list[float]


def iou_matrix(a: Sequence[Box], b: Sequence[Box]) -> torch.Tensor:
    """(len(a), len(b)) IoU; empty shapes when either side is empty."""
    if not a or not b:
        return torch.zeros(len(a), len(b))
    return box_iou(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))


def is_verbatim(box: Box, gt_boxes: Iterable[Box], tolerance: float = VERBATIM_TOLERANCE) -> bool:
    """Whether `box` equals one of `gt_boxes` on all four coordinates (to `tolerance` pixels)."""
    return any(
        all(abs(float(x) - float(y)) <= tolerance for x, y in zip(box, gt, strict=True)) for gt in gt_boxes
    )


def drop_verbatim(candidates: list[dict[str, Any]], gt_boxes: list[Box]) -> tuple[list[dict[str, Any]], int]:
    """Candidates without the ones that repeat an annotated box verbatim, and how many were dropped."""
    kept = [c for c in candidates if not is_verbatim(c["box"], gt_boxes)]
    return kept, len(candidates) - len(kept)


def _clip(box: Box, width: float, height: float) -> Box:
    x0, y0, x1, y1 = box
    return [
        round(min(max(0.0, x0), width), 2),
        round(min(max(0.0, y0), height), 2),
        round(min(max(0.0, x1), width), 2),
        round(min(max(0.0, y1), height), 2),
    ]


def _valid(box: Box) -> bool:
    return box[2] - box[0] >= 2 and box[3] - box[1] >= 2


def jittered_box(
    rng: random.Random, gt: Box, width: float, height: float, iou_range: tuple[float, float] = JITTER_IOU
) -> Box | None:
    """A box around `gt` with IoU in `iou_range` (rejection sampling of per-side offsets), or None."""
    w, h = gt[2] - gt[0], gt[3] - gt[1]
    for _ in range(200):
        spread = rng.uniform(0.02, 0.25)
        box = _clip(
            [
                gt[0] + rng.gauss(0, spread) * w,
                gt[1] + rng.gauss(0, spread) * h,
                gt[2] + rng.gauss(0, spread) * w,
                gt[3] + rng.gauss(0, spread) * h,
            ],
            width,
            height,
        )
        if not _valid(box) or is_verbatim(box, [gt]):
            continue
        iou = float(iou_matrix([box], [gt])[0, 0])
        if iou_range[0] <= iou <= iou_range[1]:
            return box
    return None


def _sized_like(rng: random.Random, objects: Sequence[Box]) -> tuple[float, float]:
    ref = rng.choice(objects)
    return (ref[2] - ref[0]) * rng.uniform(0.8, 1.25), (ref[3] - ref[1]) * rng.uniform(0.8, 1.25)


def background_box(rng: random.Random, objects: Sequence[Box], width: float, height: float) -> Box | None:
    """A box shaped like a real object, placed where it overlaps no object by IoU >= 0.2; or None."""
    for _ in range(200):
        w, h = _sized_like(rng, objects)
        w, h = min(w, width - 1), min(h, height - 1)
        x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        box = _clip([x0, y0, x0 + w, y0 + h], width, height)
        if _valid(box) and float(iou_matrix([box], list(objects)).max()) < BACKGROUND_MAX_IOU:
            return box
    return None


def partial_box(rng: random.Random, objects: Sequence[Box], width: float, height: float) -> Box | None:
    """A box shaped like a real object that covers part of one (IoU 0.2-0.45, < 0.5 with all); or None."""
    for _ in range(300):
        target = rng.choice(objects)
        w, h = _sized_like(rng, objects)
        cx = rng.uniform(target[0], target[2])
        cy = rng.uniform(target[1], target[3])
        box = _clip([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], width, height)
        if not _valid(box):
            continue
        ious = iou_matrix([box], list(objects))[0]
        iou_target = float(iou_matrix([box], [target])[0, 0])
        if PARTIAL_IOU[0] <= iou_target <= PARTIAL_IOU[1] and float(ious.max()) < 0.5:
            return box
    return None


def synthetic_proposals(
    objects: Sequence[Box], width: float, height: float, distractors: int, rng: random.Random
) -> list[dict[str, Any]]:
    """The synthetic proposal model of the module docstring: [{box, score}], shuffled."""
    objects = [list(map(float, b)) for b in objects]
    boxes: list[Box] = []
    for gt in objects:
        for _ in range(rng.choice((1, 2))):
            box = jittered_box(rng, gt, width, height)
            if box is not None:
                boxes.append(box)
    for n in range(distractors if objects else 0):
        maker = background_box if n % 2 == 0 else partial_box
        box = maker(rng, objects, width, height)
        if box is not None:
            boxes.append(box)
    boxes = [b for b in boxes if not is_verbatim(b, objects)]
    rng.shuffle(boxes)
    return [{"box": box, "score": round(rng.random(), 4)} for box in boxes]


# --- COCO detection results ------------------------------------------------------------------------------


def load_proposals(path: Path | None) -> dict[int, list[dict[str, Any]]]:
    """COCO detection results ([{image_id, bbox, score}]) -> class-agnostic proposals per image id."""
    if path is None:
        return {}
    result: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for det in json.loads(Path(path).read_text()):
        x, y, w, h = det["bbox"]
        result[det["image_id"]].append({"box": [x, y, x + w, y + h], "score": float(det.get("score", 1.0))})
    return result


def proposals_to_results(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """COCO detection results (category_id 1: class-agnostic) of records' `proposals`.

    The image id is the record's `provenance.coco.image_id` (records made by `pipelines/coco_to_shards.py`),
    so the file pairs with the COCO ground truth the shards came from.
    """
    results = []
    for record in records:
        image_id = (record.get("provenance") or {}).get("coco", {}).get("image_id")
        if image_id is None:
            raise ValueError(
                f"record {record.get('key')} has no provenance.coco.image_id: only shards written by "
                "pipelines/coco_to_shards.py map to a COCO ground-truth file (evaluate engine shards "
                "directly with --shards, which uses their proposals)"
            )
        for prop in record.get("proposals", []):
            x0, y0, x1, y1 = map(float, prop["box"])
            results.append(
                {
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                    "score": float(prop.get("score", 1.0)),
                }
            )
    return results
