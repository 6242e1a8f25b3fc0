"""Geometric rules on grounded boxes: too small, whole-image, extreme aspect, duplicates.

Runs right after grounding (no model), so region captioning and refinement never spend time on junk.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from engine.config import Resources, Strict
from engine.items import Item
from stages.base import Stage


class BoxRulesConfig(Strict):
    """Cheap geometric rules, applied right after grounding so no model time is spent on junk boxes."""

    min_side: float = Field(4.0, ge=0)
    min_area_frac: float = Field(0.0005, ge=0, le=1)
    max_area_frac: float = Field(0.95, ge=0, le=1)
    max_aspect: float = Field(12.0, ge=1)
    duplicate_iou: float = Field(0.9, ge=0, le=1)
    resources: Resources = Resources(batch_size=64, num_cpus=0.25)


def geometry_problem(box: list[float], width: int, height: int, cfg: BoxRulesConfig) -> str | None:
    """Why a box is unusable as a region, or None."""
    w, h = box[2] - box[0], box[3] - box[1]
    if min(w, h) < cfg.min_side:
        return f"too small: side {min(w, h):.1f}px < min_side={cfg.min_side}"
    area = w * h / float(width * height)
    if area < cfg.min_area_frac:
        return f"too small: area {area:.5f} of image < min_area_frac={cfg.min_area_frac}"
    if area > cfg.max_area_frac:
        return f"whole image: covers {area:.0%} > max_area_frac={cfg.max_area_frac}"
    if max(w / h, h / w) > cfg.max_aspect:
        return f"extreme aspect: {max(w / h, h / w):.1f} > max_aspect={cfg.max_aspect}"
    return None


def duplicate_of(regions: list[dict[str, Any]], iou_threshold: float) -> dict[int, int]:
    """Region id -> id of a higher-scoring region it overlaps by more than `iou_threshold`."""
    import torch  # here, not at the top: the job's driver imports this module for its config only
    from torchvision.ops import box_iou

    if len(regions) < 2:
        return {}
    ordered = sorted(regions, key=lambda r: -r["score"])
    ious = box_iou(torch.tensor([r["box"] for r in ordered]), torch.tensor([r["box"] for r in ordered]))
    result: dict[int, int] = {}
    kept: list[int] = []
    for i, region in enumerate(ordered):
        twin = next((k for k in kept if ious[i, k] > iou_threshold), None)
        if twin is None:
            kept.append(i)
        else:
            result[region["id"]] = ordered[twin]["id"]
    return result


def apply_box_rules(
    regions: list[dict[str, Any]], width: int, height: int, cfg: BoxRulesConfig
) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """Kept regions (original order) and (region id, reason) for each dropped one."""
    drops: list[tuple[int, str]] = []
    sound = []
    for region in regions:
        problem = geometry_problem(region["box"], width, height, cfg)
        if problem:
            drops.append((region["id"], problem))
        else:
            sound.append(region)
    twins = duplicate_of(sound, cfg.duplicate_iou)
    drops += [(rid, f"duplicate: of region {other}") for rid, other in twins.items()]
    return [r for r in sound if r["id"] not in twins], drops


class BoxRules(Stage):
    name = "box_rules"
    config_class = BoxRulesConfig

    def process(self, items: list[Item]) -> None:
        for item in items:
            record = item.record
            kept, drops = apply_box_rules(record["regions"], record["width"], record["height"], self.cfg)
            for region_id, reason in drops:
                item.drop(self.name, f"region {region_id}", reason)
            record["regions"] = kept
            if not kept:
                item.reject(self.name, "no region passed the box rules")
