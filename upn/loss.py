"""DETR set loss for class-agnostic proposals: Hungarian matching, focal objectness, L1 + GIoU boxes.

The matching is scipy's `linear_sum_assignment`; the losses are torchvision ops (`sigmoid_focal_loss`,
`generalized_box_iou`, `generalized_box_iou_loss`). What is written here is only the glue a DETR needs
and no library ships for a single "object" class: the matching cost matrix and the sum over decoder layers.
Coefficients follow Deformable DETR / DINO (objectness 2, L1 5, GIoU 2; matching costs the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_convert, generalized_box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from upn.modeling_upn import UPNOutput


@dataclass(frozen=True)
class LossWeights:
    objectness: float = 2.0
    l1: float = 5.0
    giou: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


def _focal_costs(logits: torch.Tensor, w: LossWeights) -> torch.Tensor:
    """Per query: the focal loss of calling it an object minus that of calling it background (DINO's cost)."""
    p = logits.sigmoid()
    pos = w.focal_alpha * (1 - p) ** w.focal_gamma * -(p + 1e-8).log()
    neg = (1 - w.focal_alpha) * p**w.focal_gamma * -(1 - p + 1e-8).log()
    return pos - neg


@torch.no_grad()
def hungarian_match(
    logits: torch.Tensor, boxes: torch.Tensor, targets: list[torch.Tensor], w: LossWeights = LossWeights()
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (query indices, target indices) pair per image; boxes and targets are normalized cxcywh."""
    matches = []
    for i, target in enumerate(targets):
        if len(target) == 0:
            empty = torch.zeros(0, dtype=torch.long)
            matches.append((empty, empty))
            continue
        cost = (
            w.objectness * _focal_costs(logits[i].float(), w)[:, None]
            + w.l1 * torch.cdist(boxes[i].float(), target.float(), p=1)
            - w.giou
            * generalized_box_iou(
                box_convert(boxes[i].float(), "cxcywh", "xyxy"), box_convert(target.float(), "cxcywh", "xyxy")
            )
        )
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        matches.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
    return matches


def set_loss(
    logits: torch.Tensor, boxes: torch.Tensor, targets: list[torch.Tensor], w: LossWeights = LossWeights()
) -> dict[str, torch.Tensor]:
    """Loss of one prediction set (B, Q) / (B, Q, 4) against per-image target boxes (normalized cxcywh)."""
    matches = hungarian_match(logits, boxes, targets, w)
    labels = torch.zeros_like(logits)
    pred, gold = [], []
    for i, (rows, cols) in enumerate(matches):
        labels[i, rows] = 1.0
        pred.append(boxes[i, rows])
        gold.append(targets[i][cols].to(boxes))
    num = max(sum(len(t) for t in targets), 1)
    focal = sigmoid_focal_loss(logits, labels, alpha=w.focal_alpha, gamma=w.focal_gamma, reduction="sum")
    pred_boxes, gold_boxes = torch.cat(pred), torch.cat(gold)
    if len(gold_boxes):
        l1 = (pred_boxes - gold_boxes).abs().sum()
        giou = generalized_box_iou_loss(
            box_convert(pred_boxes, "cxcywh", "xyxy"),
            box_convert(gold_boxes, "cxcywh", "xyxy"),
            reduction="sum",
        )
    else:
        l1 = giou = boxes.sum() * 0.0
    return {"objectness": focal / num, "l1": l1 / num, "giou": giou / num}


def upn_loss(
    out: UPNOutput, targets: list[torch.Tensor], w: LossWeights = LossWeights()
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum over every decoder layer and the encoder's selected proposals (two-stage DETR)."""
    sets = [(out.aux_logits[:, i], out.aux_boxes[:, i]) for i in range(out.aux_logits.shape[1])]
    sets.append((out.enc_logits, out.enc_boxes))
    total = out.logits.new_zeros(())
    parts = {"objectness": 0.0, "l1": 0.0, "giou": 0.0}
    for logits, boxes in sets:
        terms = set_loss(logits, boxes, targets, w)
        total = total + w.objectness * terms["objectness"] + w.l1 * terms["l1"] + w.giou * terms["giou"]
        for name, value in terms.items():
            parts[name] += float(value.detach()) / len(sets)
    return total, parts
