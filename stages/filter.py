"""Final filter: image-text agreement of each referring expression with its region, then the grounded caption.

A SigLIP (or CLIP) model scores the region crop (with a little context) against the referring expression;
below `score_threshold` only the referring tier is stripped (the region keeps its category and other
texts). Regions are linked back to the caption (and to the conversation turns, when the input had one):
each grounded phrase span points at its region ids.
"""

from __future__ import annotations

from typing import Any

from PIL import Image
from pydantic import Field

from engine.config import ModelRef, Resources, Strict
from engine.images import load_rgb
from engine.items import Item
from engine.models import inference_mode, load_model, load_processor, model_inputs
from schemas.tiers import strip_tier
from stages.base import Stage


class FilterConfig(Strict):
    model: ModelRef
    score_threshold: float = Field(0.05, ge=-1, le=1)
    crop_context: float = Field(0.1, ge=0, le=1)
    regions_per_call: int = Field(32, ge=1)
    resources: Resources = Resources()


def context_crop(image: Image.Image, box: list[float], context: float) -> Image.Image:
    """The box grown by `context` of its size on each side, clipped to the image."""
    x0, y0, x1, y1 = box
    dx, dy = (x1 - x0) * context, (y1 - y0) * context
    left, top = max(0, int(x0 - dx)), max(0, int(y0 - dy))
    right, bottom = min(image.width, int(x1 + dx + 0.999)), min(image.height, int(y1 + dy + 0.999))
    return image.crop((left, top, max(right, left + 1), max(bottom, top + 1)))


def grounded_caption(record: dict[str, Any]) -> dict[str, Any]:
    """The caption with every phrase that kept a region pointing at those region ids."""
    by_phrase: dict[int, list[int]] = {}
    for region in record["regions"]:
        by_phrase.setdefault(region["phrase"], []).append(region["id"])
    spans = [
        {"start": p["start"], "end": p["end"], "phrase": index, "regions": sorted(by_phrase[index])}
        for index, p in enumerate(record["phrases"])
        if index in by_phrase and p.get("turn") is None
    ]
    return {"text": record["caption"]["text"], "spans": spans}


def ground_conversation(record: dict[str, Any]) -> None:
    """Point each conversation turn's phrase spans at the regions grounded from that phrase (in place);
    spans whose phrase kept no region are removed."""
    by_phrase: dict[int, list[int]] = {}
    for region in record["regions"]:
        by_phrase.setdefault(region["phrase"], []).append(region["id"])
    for turn in record.get("grounded_conversation") or []:
        turn["spans"] = [
            span | {"regions": sorted(by_phrase[span["phrase"]])}
            for span in turn.get("spans", [])
            if span["phrase"] in by_phrase
        ]


class ImageTextScorer:
    """Agreement of (image, text) pairs in [0, 1] for SigLIP (sigmoid) or cosine in [-1, 1] for CLIP."""

    def __init__(self, cfg: FilterConfig) -> None:
        from transformers import AutoModel, AutoProcessor

        self.processor = load_processor(AutoProcessor, cfg.model)
        self.model, self.device = load_model(AutoModel, cfg.model)
        self.sigmoid = self.model.config.model_type.startswith("siglip")

    @inference_mode
    def __call__(self, images: list[Image.Image], texts: list[str]) -> list[float]:
        if not images:
            return []
        padding = "max_length" if self.sigmoid else True
        inputs = self.processor(
            text=texts, images=images, padding=padding, truncation=True, return_tensors="pt"
        )
        outputs = self.model(**model_inputs(inputs, self.model, self.device))
        logits = outputs.logits_per_image.float().diagonal()
        if self.sigmoid:
            return logits.sigmoid().tolist()
        return (logits / self.model.logit_scale.exp().float()).tolist()


class Filter(Stage):
    name = "filter"
    config_class = FilterConfig

    def __init__(self, cfg: FilterConfig) -> None:
        super().__init__(cfg)
        self.scorer = ImageTextScorer(cfg)

    def process(self, items: list[Item]) -> None:
        pairs = []
        for item in items:
            regions = [r for r in item.record["regions"] if r.get("referring")]
            if regions:
                image = load_rgb(item.image)
                pairs += [(item, r, context_crop(image, r["box"], self.cfg.crop_context)) for r in regions]
        step = self.cfg.regions_per_call
        for start in range(0, len(pairs), step):
            chunk = pairs[start : start + step]
            scores = self.scorer(
                [crop for *_, crop in chunk], [region["referring"] for _, region, _ in chunk]
            )
            self.log_scores("image-text score (strips referring below)", scores, self.cfg.score_threshold)
            for (item, region, _), score in zip(chunk, scores, strict=True):
                region.setdefault("scores", {})["image_text"] = round(score, 4)
                if score < self.cfg.score_threshold:
                    reason = f"low image-text score: {score:.3f} < {self.cfg.score_threshold}"
                    strip_tier(item.record, region, "referring", self.name, reason)
        for item in items:
            item.record["grounded_caption"] = grounded_caption(item.record)
            ground_conversation(item.record)
