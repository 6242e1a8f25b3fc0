"""Collection filters (paper §4.1), before captioning so no model time is spent on images they reject:
an NSFW classifier, a low-content classifier (plain, empty or text-only images) and near-constant pixels.

The classifiers are any transformers image classifier (`AutoModelForImageClassification`) named in config;
an image's score is the summed softmax probability of the labels listed in `reject_labels`, rejected at or
above `threshold`. Near-constant images are caught by a pixel statistic, which costs no model and no
second decode: `decode` measures the largest per-channel standard deviation of a regular sample of the pixels
while it has them (`engine.images.pixel_std`), and this stage applies the threshold. The minimum
side stays in `decode`.
"""

from __future__ import annotations

from PIL import Image
from pydantic import Field, model_validator

from engine.config import ModelRef, Resources, Strict
from engine.images import load_rgb, pixel_std
from engine.items import Item
from engine.models import inference_mode, load_model, load_processor, model_inputs
from stages.base import Stage


class ClassifierCheck(Strict):
    """One image classifier used as a filter; `model: null` turns the check off."""

    model: ModelRef | None = None
    reject_labels: list[str] = Field(default_factory=list)
    threshold: float = Field(0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _labels_named(self) -> ClassifierCheck:
        if self.model is not None and not self.reject_labels:
            raise ValueError("a classifier check with a model needs reject_labels (labels of that model)")
        return self


class NsfwCheck(ClassifierCheck):
    reject_labels: list[str] = Field(default_factory=lambda: ["nsfw"])


class LowContentCheck(ClassifierCheck):
    reject_labels: list[str] = Field(default_factory=lambda: ["low-content"])


class CollectConfig(Strict):
    enabled: bool = False
    nsfw: NsfwCheck = NsfwCheck()
    low_content: LowContentCheck = LowContentCheck()
    min_pixel_std: float = Field(2.0, ge=0)  # levels (0-255), `engine.images.pixel_std`; 0 = off
    max_image_side: int = Field(512, ge=32)  # images are downscaled before the classifiers' processors
    images_per_call: int = Field(16, ge=1)
    resources: Resources = Resources()


class ImageClassifier:
    """P(any of `labels`) per image from a transformers image classifier."""

    def __init__(self, check: ClassifierCheck) -> None:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        assert check.model is not None
        self.processor = load_processor(AutoImageProcessor, check.model)
        self.model, self.device = load_model(AutoModelForImageClassification, check.model)
        label2id = {name.lower(): int(i) for name, i in self.model.config.label2id.items()}
        missing = [name for name in check.reject_labels if name.lower() not in label2id]
        if missing:
            raise ValueError(
                f"{check.model.name} has no label(s) {missing}; its labels are {sorted(label2id)}: fix "
                "reject_labels in stages.collect"
            )
        self.ids = [label2id[name.lower()] for name in check.reject_labels]

    @inference_mode
    def __call__(self, images: list[Image.Image]) -> list[float]:
        if not images:
            return []
        inputs = self.processor(images=images, return_tensors="pt")
        probs = self.model(**model_inputs(inputs, self.model, self.device)).logits.float().softmax(dim=-1)
        return probs[:, self.ids].sum(dim=-1).tolist()


class Collect(Stage):
    name = "collect"
    config_class = CollectConfig
    unit = ""
    edits_records = False  # it only rejects

    def __init__(self, cfg: CollectConfig) -> None:
        super().__init__(cfg)
        self.checks = [
            (name, check, ImageClassifier(check))
            for name, check in (("nsfw", cfg.nsfw), ("low-content", cfg.low_content))
            if check.model is not None
        ]

    def process(self, items: list[Item]) -> None:
        live = []
        for item in items:
            std = self._pixel_std(item)
            if std < self.cfg.min_pixel_std:
                item.reject(self.name, f"near-constant image: pixel std {std:.2f} < {self.cfg.min_pixel_std}")
            elif self.checks:
                live.append((item, load_rgb(item.image, self.cfg.max_image_side)))
        step = self.cfg.images_per_call
        for name, check, classify in self.checks:
            for start in range(0, len(live), step):
                chunk = [(item, image) for item, image in live[start : start + step] if item.ok]
                scores = classify([im for _, im in chunk])
                self.log_scores(f"{name} p (rejects at >=)", scores, check.threshold)
                for (item, _), score in zip(chunk, scores, strict=True):
                    if score >= check.threshold:
                        item.reject(self.name, f"{name}: p={score:.3f} >= {check.threshold}")

    @staticmethod
    def _pixel_std(item: Item) -> float:
        """Decode measured it while the pixels were decoded; items made elsewhere are measured here."""
        measured = ((item.record or {}).get("provenance") or {}).get("decode", {}).get("pixel_std")
        return float(measured) if measured is not None else pixel_std(load_rgb(item.image))
