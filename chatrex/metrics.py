"""Detection and referring metrics for index-answering models: P/R/F1 at IoU 0.5, accuracy, COCO mAP."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.ops import box_iou


def match_pairs(
    pred: list[list[float]], gt: list[list[float]], threshold: float = 0.5
) -> list[tuple[int, int]]:
    """One-to-one (pred, gt) index pairs with IoU >= threshold: the most pairs possible, then the highest IoU.

    A maximum matching (scipy's Hungarian solver) rather than a greedy one, so the count is the best any
    assignment allows; the oracle baseline uses the same function on all candidates.
    """
    if not pred or not gt:
        return []
    from scipy.optimize import linear_sum_assignment

    ious = box_iou(torch.tensor(pred, dtype=torch.float64), torch.tensor(gt, dtype=torch.float64)).numpy()
    valid = ious >= threshold
    # every valid pair is worth more than any sum of IoUs, so the count is maximised first
    gain = valid * (len(pred) + len(gt) + 1.0) + valid * ious
    rows, cols = linear_sum_assignment(-gain)
    return [(int(i), int(j)) for i, j in zip(rows, cols, strict=True) if valid[i, j]]


def matched(pred: list[list[float]], gt: list[list[float]], threshold: float = 0.5) -> int:
    """True positives: the size of the one-to-one matching of `match_pairs`."""
    return len(match_pairs(pred, gt, threshold))


@dataclass
class DetectionCounts:
    tp: int = 0
    predicted: int = 0
    ground_truth: int = 0

    def add(self, pred: list[list[float]], gt: list[list[float]], threshold: float = 0.5) -> None:
        self.tp += matched(pred, gt, threshold)
        self.predicted += len(pred)
        self.ground_truth += len(gt)

    @property
    def precision(self) -> float:
        return self.tp / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.tp / self.ground_truth if self.ground_truth else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "P@0.5": round(self.precision, 4),
            "R@0.5": round(self.recall, 4),
            "F1@0.5": round(self.f1, 4),
            "tp": self.tp,
            "predicted": self.predicted,
            "ground_truth": self.ground_truth,
        }


def iou_at_least(box: list[float] | None, gt: list[float], threshold: float = 0.5) -> bool:
    if box is None:
        return False
    return float(box_iou(torch.tensor([box]), torch.tensor([gt]))[0, 0]) >= threshold


def coco_map(gt: dict[str, Any], detections: list[dict[str, Any]]) -> dict[str, float]:
    """COCO box mAP@[.5:.95] and AP50 with pycocotools; `gt` is a COCO dict, detections COCO results."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not detections or not gt.get("annotations"):
        return {"mAP": 0.0, "AP50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its own tables
        truth = COCO()
        truth.dataset = gt
        truth.createIndex()
        results = truth.loadRes(detections)
        evaluator = COCOeval(truth, results, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {"mAP": round(float(evaluator.stats[0]), 4), "AP50": round(float(evaluator.stats[1]), 4)}
