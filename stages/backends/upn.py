"""UPN backend of the proposals stage: the paper's proposal network at one or both granularities.

Boxes come out per granularity prompt (coarse: whole objects; fine: parts and small objects); each set goes
through the stage's usual threshold / NMS / size rule on its own, so the two never suppress each other, they
share the `max_proposals` cap evenly, and every kept box records the granularity that proposed it.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torchvision.ops import box_convert

from engine.config import ModelRef
from engine.models import load_model
from upn import UPNModel
from upn.data import preprocess


class UPNProposer:
    """`images -> [{granularity: (scores, xyxy boxes in the image's pixels)}]`, one encoder pass per batch."""

    def __init__(self, model: ModelRef, granularity: str) -> None:
        # The model and granularity rather than the stage's config: the stage imports this module, so this
        # module must not import the stage's.
        self.model, self.device = load_model(UPNModel, model)
        self.granularities = ["coarse", "fine"] if granularity == "both" else [granularity]

    @torch.inference_mode()
    def __call__(self, images: list[Image.Image]) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        cfg = self.model.config
        pixels = preprocess(images, cfg.image_size, cfg.image_mean, cfg.image_std)
        enc = self.model.encode(pixels.to(self.device, self.model.dtype))
        result: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in images]
        for granularity in self.granularities:
            out = self.model.decode(enc, granularity)
            scores = out.logits.float().sigmoid().cpu()
            boxes = box_convert(out.pred_boxes.float().cpu(), "cxcywh", "xyxy")
            for i, image in enumerate(images):
                scale = torch.tensor([image.width, image.height] * 2, dtype=torch.float32)
                result[i][granularity] = (scores[i], boxes[i] * scale)
        return result


def merge_granularities(per_granularity: dict[str, list[dict[str, Any]]], cap: int) -> list[dict[str, Any]]:
    """One proposal list, best score first, at most `cap`: each granularity keeps its best cap/n boxes (the
    first ones get the remainder), so one prompt's higher scores never crowd the other out; every box is
    tagged with its granularity."""
    n = max(1, len(per_granularity))
    merged = []
    for i, (granularity, props) in enumerate(per_granularity.items()):
        share = cap // n + (1 if i < cap % n else 0)
        merged += [dict(p, granularity=granularity) for p in props[:share]]
    return sorted(merged, key=lambda p: -p["score"])
