"""Class-agnostic proposal recall with pycocotools: AR@k (IoU 0.50:0.95) and recall at IoU 0.5.

`COCOeval` with `useCats = 0` ignores categories, and `maxDets` caps how many of each image's
highest-scoring boxes count, so every method is measured on the same number of boxes per image.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence
from typing import Any

import numpy as np


def class_agnostic_gt(coco: dict[str, Any], keep: Any = None) -> dict[str, Any]:
    """A copy of a COCO ground truth with one category; `keep(ann, image)` selects annotations."""
    images = {im["id"]: im for im in coco["images"]}
    anns = []
    for ann in coco["annotations"]:
        if keep is not None and not keep(ann, images[ann["image_id"]]):
            continue
        ann = copy.deepcopy(ann)
        ann["category_id"] = 1
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
        anns.append(ann)
    return {
        "images": copy.deepcopy(coco["images"]),
        "annotations": anns,
        "categories": [{"id": 1, "name": "object"}],
    }


def proposal_recall(
    gt: dict[str, Any], detections: list[dict[str, Any]], max_dets: Sequence[int] = (10, 100)
) -> dict[str, float]:
    """{"AR@k": ..., "R@0.5@k": ...} for each k; `detections` are COCO results ({image_id, bbox, score})."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not gt["annotations"]:
        return {f"{name}@{k}": float("nan") for k in max_dets for name in ("AR", "R@0.5")}
    if not detections:
        return {f"{name}@{k}": 0.0 for k in max_dets for name in ("AR", "R@0.5")}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        dets = [dict(d, category_id=1) for d in detections]
        coco_dt = coco_gt.loadRes(dets)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.params.useCats = 0
        evaluator.params.maxDets = sorted(set(max_dets))
        evaluator.evaluate()
        evaluator.accumulate()
    recall = evaluator.eval["recall"]  # [iou thresholds, categories, area ranges, max dets]
    result = {}
    for m, k in enumerate(evaluator.params.maxDets):
        r = recall[:, 0, 0, m]
        valid = r[r > -1]
        result[f"AR@{k}"] = float(valid.mean()) if len(valid) else float("nan")
        i50 = int(np.argmin(np.abs(evaluator.params.iouThrs - 0.5)))
        result[f"R@0.5@{k}"] = float(recall[i50, 0, 0, m])
    return result
