"""Score ChatRex answers against ground truth, beside baselines that see the same candidate boxes.

Detection (one question per image and category): the answered indices select candidate boxes (a repeated
index counts once), matched one-to-one to the category's ground-truth boxes at IoU 0.5 (`match_pairs`) ->
P@0.5, R@0.5, F1. Precision is 0 when nothing is answered, recall 0 when there is no ground truth.

Baselines, on the same candidates of the same questions, in the same run:

- `random_k`: k random candidates, k = the category's true count (told the answer's size);
- `blind_random_k`: k random candidates among those overlapping any annotated object of the image by
  IoU >= 0.5 (category-blind: knows where objects are, not which is which);
- `all_overlapping`: every candidate overlapping any object (category-blind; its recall is the ceiling a
  category-blind picker reaches, reported as `recall_ceiling_R@0.5`);
- `oracle`: the best pick the candidates allow (a maximum matching of all candidates to the ground truth):
  the upper bound of recall, at precision 1.

`baseline` is the category-blind picker with the best F1@0.5 (`PICKERS`); `all_overlapping` is reported as
the recall ceiling, not as the baseline (it answers every object of the image, not a chosen number).
Everything is also reported per bucket of annotated objects per image.

Duplicate suppression (`dedup_iou`, optional, off by default): a proposal network gives several boxes per
object, and naming two of them costs precision under one-to-one matching. With `dedup_iou` set, the boxes
of each answer are suppressed by non-maximum suppression at that IoU (`torchvision.ops.nms`), ranked by the
model's own <objN> probability (answer order when it has none); the same suppression, ranked by pick order,
is applied to every baseline's picks (the oracle's are one-to-one already). No ground truth is involved.

mAP@[.5:.95] / AP50 (pycocotools) rank the answered boxes by the model's own confidence: the probability the
model gave to each `<objN>` token when it generated it (the first time it named that index). Input proposal
scores never enter the ranking.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

from chatrex.metrics import DetectionCounts, coco_map, iou_at_least
from chatrex.parsing import parse_answer, strip_tags
from chatrex.proposals import iou_matrix
from stages.text import parse_category

STRATEGIES = ("random_k", "blind_random_k", "all_overlapping", "oracle")
BLIND = ("blind_random_k", "all_overlapping")
PICKERS = ("blind_random_k",)  # category-blind strategies eligible as `baseline` (not the recall ceiling)
BUCKETS = ((1, 1, "1"), (2, 3, "2-3"), (4, 6, "4-6"), (7, 10, "7-10"), (11, 10**9, "11+"))


def bucket_of(objects: int) -> str:
    """Objects-per-image bucket label ("0" for an image without annotated objects)."""
    return next((name for lo, hi, name in BUCKETS if lo <= objects <= hi), "0")


def baseline_picks(
    boxes: list[list[float]], gt: list[list[float]], image_gt: list[list[float]], rng: random.Random
) -> dict[str, list[int]]:
    """Candidate indices each baseline strategy picks for one detection question."""
    from chatrex.metrics import match_pairs

    k = len(gt)
    ious = iou_matrix(boxes, image_gt)
    overlapping = [i for i in range(len(boxes)) if image_gt and float(ious[i].max()) >= 0.5]
    return {
        "random_k": rng.sample(range(len(boxes)), k=min(k, len(boxes))),
        "blind_random_k": rng.sample(overlapping, k=min(k, len(overlapping))),
        "all_overlapping": overlapping,
        "oracle": [i for i, _ in match_pairs(boxes, gt)],
    }


def suppress_duplicates(
    boxes: list[list[float]], indices: list[int], ranking: list[float] | None, iou: float | None
) -> list[int]:
    """`indices` without the boxes that overlap a higher-ranked kept one at IoU > `iou` (NMS), in order.

    `ranking` (one value per index, higher first) defaults to the order of `indices`; `iou=None` keeps all.
    """
    if iou is None or len(indices) < 2:
        return list(indices)
    import torch
    from torchvision.ops import nms

    scores = torch.tensor(ranking if ranking is not None else [-float(n) for n in range(len(indices))])
    keep = nms(torch.tensor([boxes[i] for i in indices], dtype=torch.float32), scores.float(), iou)
    return [indices[k] for k in sorted(keep.tolist())]


def _counts_dict(counts: DetectionCounts) -> dict[str, float]:
    return {
        "P@0.5": round(counts.precision, 4),
        "R@0.5": round(counts.recall, 4),
        "F1@0.5": round(counts.f1, 4),
    }


def _detection_entry(model: DetectionCounts, baselines: dict[str, DetectionCounts]) -> dict[str, Any]:
    best = max(PICKERS, key=lambda name: baselines[name].f1)
    return model.to_dict() | {
        "baseline": {"strategy": best, **_counts_dict(baselines[best])},
        "recall_ceiling_R@0.5": round(baselines["all_overlapping"].recall, 4),
        "oracle_R@0.5": round(baselines["oracle"].recall, 4),
        "baselines": {name: _counts_dict(baselines[name]) for name in STRATEGIES},
    }


def _index_scores(prediction: dict[str, Any]) -> dict[int, float] | None:
    raw = prediction.get("index_scores")
    if raw is None:
        return None
    return {int(k): float(v) for k, v in dict(raw).items()}


def score(
    predictions: list[dict[str, Any]], seed: int, dedup_iou: float | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics per dataset (and 'all'), and the per-question rows written to predictions.jsonl.

    A prediction holds the question's `task`, `key`, `dataset`, `question`, `answer`, candidate `boxes`, the
    category's `gt_boxes`, the image's `image_gt_boxes`, `gt_box` / `category` for referring and naming, and
    `index_scores` ({index: probability}) from the model for mAP. `dedup_iou`: duplicate suppression of
    detection answers and baseline picks (module docstring); rows keep the answered `indices` and, with
    it, the `kept_indices` that were scored.
    """
    rng = random.Random(seed)
    det: dict[str, DetectionCounts] = defaultdict(DetectionCounts)
    base: dict[str, dict[str, DetectionCounts]] = defaultdict(lambda: defaultdict(DetectionCounts))
    bucket_det: dict[str, DetectionCounts] = defaultdict(DetectionCounts)
    bucket_base: dict[str, dict[str, DetectionCounts]] = defaultdict(lambda: defaultdict(DetectionCounts))
    hits: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    coco_gt: dict[str, Any] = {"images": [], "annotations": [], "categories": []}
    detections: list[dict[str, Any]] = []
    image_ids: dict[str, int] = {}
    category_ids: dict[str, int] = {}
    scored = True
    rows = []
    for p in predictions:
        boxes = [list(map(float, b)) for b in p["boxes"]]
        groups = parse_answer(p["answer"], len(boxes))
        indices = list(dict.fromkeys(i for g in groups for i in g.indices))
        gt = [list(map(float, b)) for b in p.get("gt_boxes", [])]
        image_gt = [list(map(float, b)) for b in p.get("image_gt_boxes", [])]
        row = {
            "key": p["key"],
            "task": p["task"],
            "question": p["question"],
            "answer": p["answer"],
            "indices": indices,
            "boxes": boxes,
            "gt_boxes": gt if p["task"] == "detection" else [list(map(float, p.get("gt_box") or []))],
            "image_gt_boxes": image_gt,
        }
        if p["task"] == "detection":
            index_scores = _index_scores(p)
            picks = baseline_picks(boxes, gt, image_gt, rng)
            if dedup_iou is not None:
                ranking = [index_scores.get(i, 0.0) for i in indices] if index_scores is not None else None
                indices = suppress_duplicates(boxes, indices, ranking, dedup_iou)
                row["kept_indices"] = indices
                picks = {
                    name: chosen if name == "oracle" else suppress_duplicates(boxes, chosen, None, dedup_iou)
                    for name, chosen in picks.items()
                }
            bucket = bucket_of(len(image_gt))
            picked = [boxes[i] for i in indices]
            for dataset in (p["dataset"], "all"):
                det[dataset].add(picked, gt)
                for name, chosen in picks.items():
                    base[dataset][name].add([boxes[i] for i in chosen], gt)
            bucket_det[bucket].add(picked, gt)
            for name, chosen in picks.items():
                bucket_base[bucket][name].add([boxes[i] for i in chosen], gt)
            scored &= index_scores is not None
            image_id = image_ids.setdefault(p["key"], len(image_ids) + 1)
            category_id = category_ids.setdefault(p["category"], len(category_ids) + 1)
            for x0, y0, x1, y1 in gt:
                coco_gt["annotations"].append(
                    {
                        "id": len(coco_gt["annotations"]) + 1,
                        "image_id": image_id,
                        "category_id": category_id,
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": (x1 - x0) * (y1 - y0),
                        "iscrowd": 0,
                    }
                )
            for i in indices:
                x0, y0, x1, y1 = boxes[i]
                detections.append(
                    {
                        "image_id": image_id,
                        "category_id": category_id,
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "score": (index_scores or {}).get(i, 0.0),
                    }
                )
            row["index_scores"] = {str(k): v for k, v in (index_scores or {}).items()}
        elif p["task"] == "referring":
            top = boxes[indices[0]] if indices else None
            for dataset in (p["dataset"], "all"):
                hits["referring"][dataset].append(iou_at_least(top, list(map(float, p["gt_box"]))))
        else:
            name = parse_category(strip_tags(p["answer"]), 4)
            for dataset in (p["dataset"], "all"):
                hits["naming"][dataset].append(name == p["category"].lower())
        rows.append(row)
    coco_gt["images"] = [{"id": i} for i in image_ids.values()]
    coco_gt["categories"] = [{"id": i, "name": n} for n, i in category_ids.items()]
    metrics: dict[str, Any] = {}
    for dataset in sorted(set(det) | set(hits["referring"]) | set(hits["naming"])):
        entry: dict[str, Any] = {}
        if dataset in det:
            entry["detection"] = _detection_entry(det[dataset], base[dataset])
        for task in ("referring", "naming"):
            if hits[task].get(dataset):
                values = hits[task][dataset]
                entry[task] = {"accuracy": round(sum(values) / len(values), 4), "questions": len(values)}
        metrics[dataset] = entry
    if det:
        detection = metrics["all"]["detection"]
        if scored:
            detection.update(coco_map(coco_gt, detections))
            detection["map_scores"] = "model: probability of each answered <objN> token"
        else:
            detection.update({"mAP": None, "AP50": None, "map_scores": "none: predictions lack index_scores"})
        detection["by_objects"] = {
            name: _detection_entry(bucket_det[name], bucket_base[name])
            for _, _, name in BUCKETS
            if name in bucket_det
        }
    return metrics, rows
