"""Class-agnostic proposal boxes per image, the candidates ChatRex picks indices from.

The paper trains its own proposal network, UPN: `backend: upn` runs this project's implementation (`upn/`,
`stages/backends/upn.py`) at `granularity` coarse, fine or both. Open stand-ins: OWLv2's objectness head
(transformers, default), or the grounding detector prompted with a generic query. Boxes pass a score
threshold, NMS, a minimum size and a cap, and are stored in the record's `proposals` as {box, score}, best
first; UPN's also carry their `granularity`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from PIL import Image
from pydantic import Field, model_validator

from engine.config import ModelRef, Resources, Strict
from engine.images import load_rgb
from engine.items import Item
from engine.models import inference_mode, load_model, load_processor, model_inputs
from stages.base import Stage
from stages.grounding import make_detector

if TYPE_CHECKING:  # torch is imported where it runs (in the stage's actor), not by the job's driver
    import torch


class ProposalsConfig(Strict):
    """Class-agnostic boxes for ChatRex: OWLv2 objectness, the grounding detector with a generic prompt, or
    UPN (the paper's proposal network, `upn/`) at a granularity: coarse (objects), fine (parts, small
    objects) or both."""

    enabled: bool = False
    backend: Literal["owlv2", "grounding", "upn"] = "owlv2"
    granularity: Literal["coarse", "fine", "both"] = "coarse"  # for backend: upn
    detector_backend: Literal["transformers", "groundingdino-py"] = "transformers"  # for backend: grounding
    model: ModelRef | None = None
    query: str = "an object"
    score_threshold: float = Field(0.1, ge=0, le=1)
    nms_iou: float = Field(0.5, ge=0, le=1)
    max_proposals: int = Field(100, ge=1)
    min_side: float = Field(4.0, ge=0)
    max_image_side: int = Field(1008, ge=32)
    resources: Resources = Resources()

    @model_validator(mode="after")
    def _enabled_names_a_model(self) -> ProposalsConfig:
        if self.enabled and self.model is None:
            raise ValueError("enabled but names no model (set stages.proposals.model.name)")
        return self


def select_proposals(
    scores: torch.Tensor, boxes_xyxy: torch.Tensor, width: int, height: int, cfg: ProposalsConfig
) -> list[dict[str, Any]]:
    """Threshold, clip, size rule, NMS and cap; boxes are absolute xyxy of the image."""
    import torch
    from torchvision.ops import nms

    boxes = boxes_xyxy.float().clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    sides = torch.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    keep = (scores >= cfg.score_threshold) & (sides >= max(cfg.min_side, 1e-3))
    boxes, scores = boxes[keep], scores[keep].float()
    order = nms(boxes, scores, cfg.nms_iou)[: cfg.max_proposals]
    return [
        {"box": [round(float(v), 2) for v in boxes[i]], "score": round(float(scores[i]), 4)}
        for i in order.tolist()
    ]


class Owlv2Objectness:
    """OWLv2 objectness: scores and boxes of every query patch, independent of the text query."""

    def __init__(self, cfg: ProposalsConfig) -> None:
        from transformers import AutoProcessor, Owlv2ForObjectDetection

        self.processor = load_processor(AutoProcessor, cfg.model)
        self.model, self.device = load_model(Owlv2ForObjectDetection, cfg.model)
        self.query = cfg.query

    @inference_mode
    def __call__(self, images: list[Image.Image]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        import torch
        from torchvision.ops import box_convert

        inputs = self.processor(text=[[self.query]] * len(images), images=images, return_tensors="pt")
        outputs = self.model(**model_inputs(inputs, self.model, self.device))
        scores = outputs.objectness_logits.sigmoid().float().cpu()
        boxes = box_convert(outputs.pred_boxes.float().cpu(), "cxcywh", "xyxy")
        # OWLv2 pads each image to a square at the bottom/right: boxes are relative to the padded side
        sides = torch.tensor([max(image.size) for image in images], dtype=torch.float32)
        return [(scores[i], boxes[i] * sides[i]) for i in range(len(images))]


class GenericPromptDetector:
    """The grounding detector with one generic prompt; a box's score is its best prompt-token probability."""

    def __init__(self, cfg: ProposalsConfig) -> None:
        self.detector = make_detector(cfg.model, cfg.detector_backend, cfg.max_image_side)
        self.prompt = cfg.query.strip().lower().rstrip(".") + "."

    def __call__(self, images: list[Image.Image]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        import torch
        from torchvision.ops import box_convert

        probs, boxes, offsets = self.detector(images, [self.prompt] * len(images))
        tokens = [t for t, (a, b) in enumerate(offsets[0]) if b > a]
        result = []
        for i, image in enumerate(images):
            scale = torch.tensor([image.width, image.height, image.width, image.height], dtype=torch.float32)
            result.append(
                (probs[i][:, tokens].max(dim=1).values, box_convert(boxes[i], "cxcywh", "xyxy") * scale)
            )
        return result


class Proposals(Stage):
    name = "proposals"
    config_class = ProposalsConfig
    unit = "proposals"

    def __init__(self, cfg: ProposalsConfig) -> None:
        super().__init__(cfg)
        if cfg.backend == "upn":
            from stages.backends.upn import UPNProposer

            self.model = UPNProposer(cfg.model, cfg.granularity)
        else:
            self.model = Owlv2Objectness(cfg) if cfg.backend == "owlv2" else GenericPromptDetector(cfg)

    def process(self, items: list[Item]) -> None:
        import torch

        images = [load_rgb(item.image, self.cfg.max_image_side) for item in items]
        for item, image, output in zip(items, images, self.model(images), strict=True):
            width, height = item.record["width"], item.record["height"]
            if isinstance(output, dict):  # UPN: {granularity: (scores, boxes)}
                from stages.backends.upn import merge_granularities

                scale = torch.tensor([width / image.width, height / image.height] * 2)
                for g, (s, _) in output.items():
                    self.log_scores(f"{g} score (per query)", s.float().tolist(), self.cfg.score_threshold)
                per = {
                    g: select_proposals(s, b * scale, width, height, self.cfg) for g, (s, b) in output.items()
                }
                item.record["proposals"] = merge_granularities(per, self.cfg.max_proposals)
                continue
            scores, boxes = output
            self.log_scores("objectness score (per query)", scores.float().tolist(), self.cfg.score_threshold)
            boxes = boxes * torch.tensor(
                [width / image.width, height / image.height] * 2
            )  # back to full size
            item.record["proposals"] = select_proposals(scores, boxes, width, height, self.cfg)
