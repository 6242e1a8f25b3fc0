"""SAM 2 masks for every kept region, prompted by the region's box, stored as COCO RLE.

Each image is embedded once and all of its boxes are decoded in the same call. A mask is cleared outside
its box grown by `box_margin` (a box prompt means "this object"; pixels far outside it are leakage), and
a region whose mask comes out empty keeps its box with `mask: null` and a note in `dropped`.
Backends: transformers `Sam2Model` (default) or the official `sam2` package (`SAM2ImagePredictor`).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pydantic import Field, model_validator

from engine.config import ModelRef, Resources, Strict
from engine.images import load_rgb
from engine.items import Item
from engine.models import inference_mode, load_model, load_processor, model_inputs, pick_device
from stages.base import Stage


class SegmentConfig(Strict):
    """SAM 2 masks from region boxes: transformers Sam2Model, or the official `sam2` package."""

    enabled: bool = False
    backend: Literal["transformers", "sam2"] = "transformers"
    model: ModelRef | None = None
    box_margin: float = Field(0.1, ge=0, le=1)
    images_per_call: int = Field(4, ge=1)
    resources: Resources = Resources()

    @model_validator(mode="after")
    def _enabled_names_a_model(self) -> SegmentConfig:
        if self.enabled and self.model is None:
            raise ValueError("enabled but names no model (set stages.segment.model.name)")
        return self


def clip_to_box(mask: np.ndarray, box: list[float], margin: float) -> np.ndarray:
    """`mask` (H, W) with everything outside `box` grown by `margin` of its size set to False."""
    x0, y0, x1, y1 = box
    dx, dy = (x1 - x0) * margin, (y1 - y0) * margin
    height, width = mask.shape
    left, top = max(0, int(np.floor(x0 - dx))), max(0, int(np.floor(y0 - dy)))
    right, bottom = min(width, int(np.ceil(x1 + dx))), min(height, int(np.ceil(y1 + dy)))
    clipped = np.zeros_like(mask, dtype=bool)
    clipped[top:bottom, left:right] = mask[top:bottom, left:right]
    return clipped


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO RLE of a boolean (H, W) mask, JSON-ready (`counts` as text)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


class HFSam2:
    """transformers Sam2Model: several images per call, each with its own boxes (padded to a common count)."""

    def __init__(self, cfg: SegmentConfig) -> None:
        from transformers import AutoModelForMaskGeneration, AutoProcessor

        self.processor = load_processor(AutoProcessor, cfg.model)
        self.model, self.device = load_model(AutoModelForMaskGeneration, cfg.model)

    @inference_mode
    def __call__(
        self, images: list[Image.Image], boxes: list[list[list[float]]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        import torch

        most = max(len(b) for b in boxes)
        padded = [b + [b[0]] * (most - len(b)) for b in boxes]  # dummy prompts, discarded below
        inputs = model_inputs(
            self.processor(images=images, input_boxes=padded, return_tensors="pt"), self.model, self.device
        )
        outputs = self.model(
            pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"], multimask_output=False
        )
        results = []
        sizes = inputs["original_sizes"].cpu()
        for i, image_boxes in enumerate(boxes):
            n = len(image_boxes)
            masks = [  # upsample a few masks at a time: full-size float masks of a large image are big
                self.processor.post_process_masks(
                    outputs.pred_masks[i : i + 1, j : j + 8].float().cpu(), sizes[i : i + 1]
                )[0]
                for j in range(0, n, 8)
            ]
            scores = outputs.iou_scores[i, :n, 0].float().cpu().numpy()
            results.append((torch.cat(masks)[:, 0].numpy().astype(bool), scores))
        return results


class OfficialSam2:
    """The official `sam2` package (`build_sam2` + `SAM2ImagePredictor`), for the original .pt checkpoints."""

    def __init__(self, cfg: SegmentConfig) -> None:
        from stages.backends.sam2_official import Sam2Official

        self.predictor = Sam2Official(cfg.model.name, device=str(pick_device(cfg.model.device)))

    def __call__(
        self, images: list[Image.Image], boxes: list[list[list[float]]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        arrays = [np.asarray(image) for image in images]
        return self.predictor(arrays, [np.asarray(b, dtype=np.float32) for b in boxes])


class Segment(Stage):
    name = "segment"
    config_class = SegmentConfig

    def __init__(self, cfg: SegmentConfig) -> None:
        super().__init__(cfg)
        self.model = OfficialSam2(cfg) if cfg.backend == "sam2" else HFSam2(cfg)

    def process(self, items: list[Item]) -> None:
        step = self.cfg.images_per_call
        for start in range(0, len(items), step):
            chunk = items[start : start + step]
            images = [load_rgb(item.image) for item in chunk]  # full size: masks must match the stored image
            boxes = [[r["box"] for r in item.record["regions"]] for item in chunk]
            for item, (masks, scores) in zip(chunk, self.model(images, boxes), strict=True):
                self._attach(item, masks, scores)

    def _attach(self, item: Item, masks: np.ndarray, scores: np.ndarray) -> None:
        for region, mask, score in zip(item.record["regions"], masks, scores, strict=True):
            mask = clip_to_box(mask, region["box"], self.cfg.box_margin)
            region.setdefault("scores", {})["mask"] = round(float(score), 4)
            if mask.any():
                region["mask"] = encode_rle(mask)
            else:
                region["mask"] = None
                item.drop(self.name, f"mask of region {region['id']}", "empty mask: nothing inside the box")
