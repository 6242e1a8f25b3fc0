"""The data-prior proposer: the best trivial baseline for class-agnostic recall.

It never looks at the test image. From the training boxes (normalized to their image) it builds candidate
boxes, one per occupied cell of a (centre x, centre y, log width, log height) grid, each the median box of its
cell, and then picks greedily the candidate that covers (IoU >= 0.5) the most training boxes not yet covered,
so the list is ranked by how often such a box occurs. Every test image gets the same list, scaled to its size.
Hand-written because no library ships a "frequency-ranked box grid"; numpy does the counting.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.ops import box_iou


def fit_prior(
    boxes: np.ndarray,
    count: int = 100,
    position_bins: int = 8,
    size_bins: int = 8,
    sample: int = 20000,
    seed: int = 0,
) -> np.ndarray:
    """(count, 4) normalized xyxy boxes, most useful first, from (N, 4) normalized xyxy training boxes."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        raise ValueError("the prior needs training boxes")
    rng = np.random.default_rng(seed)
    if len(boxes) > sample:
        boxes = boxes[rng.choice(len(boxes), sample, replace=False)]
    w = np.clip(boxes[:, 2] - boxes[:, 0], 1e-4, 1)
    h = np.clip(boxes[:, 3] - boxes[:, 1], 1e-4, 1)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    # size bins at quantiles of log side, so frequent sizes get finer bins
    inner = np.linspace(0, 1, size_bins + 1)[1:-1]
    cells = (
        np.clip((cx * position_bins).astype(int), 0, position_bins - 1),
        np.clip((cy * position_bins).astype(int), 0, position_bins - 1),
        np.digitize(np.log(w), np.quantile(np.log(w), inner)),
        np.digitize(np.log(h), np.quantile(np.log(h), inner)),
    )
    keys = np.stack(cells, 1)
    _, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    candidates = np.stack([np.median(boxes[inverse == c], 0) for c in range(inverse.max() + 1)])
    covers = (box_iou(torch.from_numpy(candidates), torch.from_numpy(boxes)) >= 0.5).numpy()
    chosen: list[int] = []
    uncovered = np.ones(len(boxes), dtype=bool)
    frequency = np.bincount(inverse)
    while len(chosen) < min(count, len(candidates)):
        gain = (covers & uncovered).sum(1).astype(np.float64) + frequency / (frequency.max() + 1) * 1e-3
        gain[chosen] = -1
        best = int(gain.argmax())
        chosen.append(best)
        uncovered &= ~covers[best]
    result = candidates[chosen]
    if len(result) < count:  # fewer occupied cells than boxes asked for: repeat the list (never happens
        result = np.concatenate([result] * (count // len(result) + 1))[:count]  # with real data)
    return result.astype(np.float32)


def prior_proposals(prior: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """The prior's boxes in pixels of one image, with descending rank scores."""
    boxes = prior * np.array([width, height, width, height], dtype=np.float32)
    scores = np.linspace(1.0, 0.01, len(prior), dtype=np.float32)
    return boxes, scores


def normalized_boxes(boxes: Sequence[Sequence[float]], width: int, height: int) -> np.ndarray:
    """xyxy pixel boxes of one image -> normalized xyxy."""
    if not len(boxes):
        return np.zeros((0, 4), dtype=np.float32)
    return np.asarray(boxes, dtype=np.float32) / np.array([width, height, width, height], dtype=np.float32)
