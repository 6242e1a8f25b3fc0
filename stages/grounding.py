"""Open-vocabulary grounding of the caption's phrases with Grounding DINO (transformers).

The phrases of one caption are joined into one prompt ("red ball. blue square."), the detector scores every
query box against every text token, and each box is given to the phrase whose tokens it matches best.
transformers' `post_process_grounded_object_detection` returns label *strings* rebuilt from tokens, which
cannot be mapped back to phrase indices reliably (a word shared by two phrases is ambiguous), so the
box -> phrase association is done here from token character offsets.

Scores: a box's phrase score is the highest token probability inside that phrase (`box_threshold`
applies to it); the mean token probability over the phrase must reach `text_threshold`, so a box matching
one word of a long phrase is not taken for the whole phrase.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from PIL import Image
from pydantic import Field

from engine.config import ModelRef, Resources, Strict
from engine.images import load_rgb
from engine.items import Item
from engine.models import inference_mode, load_model, load_processor, model_inputs, pick_device
from stages.base import Stage

if TYPE_CHECKING:  # torch is imported where it runs (in the stage's actor), not by the job's driver
    import torch


class GroundingConfig(Strict):
    model: ModelRef  # for groundingdino-py: tiny:groundingdino-official or a folder with config .py + .pth
    backend: Literal["transformers", "groundingdino-py"] = "transformers"
    box_threshold: float = Field(0.35, ge=0, le=1)
    text_threshold: float = Field(0.25, ge=0, le=1)
    nms_iou: float = Field(0.5, ge=0, le=1)
    max_boxes_per_phrase: int = Field(5, ge=1)
    max_boxes: int = Field(30, ge=1)
    max_image_side: int = Field(1333, ge=32)
    resources: Resources = Resources()


def build_prompt(phrases: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """Grounding DINO's text format (lowercase, '. '-separated, final '.') and each phrase's char span."""
    parts, spans, cursor = [], [], 0
    for phrase in phrases:
        text = phrase.lower().strip()
        spans.append((cursor, cursor + len(text)))
        parts.append(text)
        cursor += len(text) + 2  # ". "
    return ". ".join(parts) + ".", spans


def phrase_token_indices(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[list[int]]:
    """For each char span, the token positions whose (non-empty) offsets fall inside it."""
    result = []
    for start, end in spans:
        result.append([t for t, (a, b) in enumerate(offsets) if b > a and a >= start and b <= end])
    return result


def select_boxes(
    probs: torch.Tensor,
    boxes_cxcywh: torch.Tensor,
    phrase_tokens: list[list[int]],
    width: int,
    height: int,
    cfg: GroundingConfig,
    seen: dict[str, list[float]] | None = None,
) -> list[dict[str, Any]]:
    """Regions from one image's detector output.

    probs: (queries, text_len) token probabilities; boxes_cxcywh: (queries, 4) normalised to the image.
    Returns regions sorted by score, with absolute clipped xyxy boxes, after per-phrase NMS and caps.
    `seen` (optional) receives every query's box and text score before the thresholds (the preflight).
    """
    import torch
    from torchvision.ops import batched_nms, box_convert

    usable = [i for i, tokens in enumerate(phrase_tokens) if tokens]
    if not usable or probs.numel() == 0:
        return []
    max_scores = torch.stack([probs[:, phrase_tokens[i]].max(dim=1).values for i in usable], dim=1)
    mean_scores = torch.stack([probs[:, phrase_tokens[i]].mean(dim=1) for i in usable], dim=1)
    score, best = max_scores.max(dim=1)
    mean_of_best = mean_scores.gather(1, best[:, None]).squeeze(1)
    if seen is not None:
        seen.setdefault("box", []).extend(score.float().tolist())
        seen.setdefault("text", []).extend(mean_of_best.float().tolist())
    keep = (score >= cfg.box_threshold) & (mean_of_best >= cfg.text_threshold)
    if not keep.any():
        return []
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    xyxy = box_convert(boxes_cxcywh[keep].float(), "cxcywh", "xyxy") * scale
    xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, width)
    xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, height)
    score, phrase = score[keep].float(), torch.tensor(usable)[best[keep]]
    valid = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    xyxy, score, phrase = xyxy[valid], score[valid], phrase[valid]
    order = batched_nms(xyxy, score, phrase, cfg.nms_iou)  # sorted by decreasing score
    per_phrase: dict[int, int] = {}
    regions: list[dict[str, Any]] = []
    for index in order.tolist():
        p = int(phrase[index])
        if per_phrase.get(p, 0) >= cfg.max_boxes_per_phrase:
            continue
        per_phrase[p] = per_phrase.get(p, 0) + 1
        box = [round(float(v), 2) for v in xyxy[index]]
        regions.append({"box": box, "score": round(float(score[index]), 4), "phrase": p})
        if len(regions) >= cfg.max_boxes:
            break
    return regions


class HFGroundingDino:
    """transformers Grounding DINO behind one call: (images, prompts) -> token probs, boxes, token offsets."""

    def __init__(self, ref: ModelRef) -> None:
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        self.processor = load_processor(AutoProcessor, ref)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "right"  # token positions must match the unpadded prompt
        self.model, self.device = load_model(AutoModelForZeroShotObjectDetection, ref)
        self.max_text_len = int(getattr(self.model.config, "max_text_len", 256))

    def offsets(self, prompt: str) -> list[tuple[int, int]]:
        return [tuple(o) for o in self.tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]]

    @inference_mode
    def __call__(
        self, images: list[Image.Image], prompts: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor, list[list[tuple[int, int]]]]:
        inputs = self.processor(images=images, text=prompts, padding=True, return_tensors="pt")
        outputs = self.model(**model_inputs(inputs, self.model, self.device))
        probs = outputs.logits.sigmoid().float().cpu()
        return probs, outputs.pred_boxes.float().cpu(), [self.offsets(p) for p in prompts]


def make_detector(ref: ModelRef, backend: str, max_image_side: int = 1333) -> Any:
    """The configured Grounding DINO implementation (both give the same outputs to `select_boxes`)."""
    if backend == "groundingdino-py":
        from stages.backends.groundingdino_py import GroundingDinoPy, resolve_official_grounding

        config_path, checkpoint_path, bert_path = resolve_official_grounding(ref.name)
        device = str(pick_device(ref.device))
        return GroundingDinoPy(
            config_path, checkpoint_path, bert_path, device, max_image_side, min(800, max_image_side)
        )
    return HFGroundingDino(ref)


class Grounding(Stage):
    name = "grounding"
    config_class = GroundingConfig

    def __init__(self, cfg: GroundingConfig) -> None:
        super().__init__(cfg)
        self.detector = make_detector(cfg.model, cfg.backend, cfg.max_image_side)

    def _fit_prompt(self, item: Item) -> tuple[str, list[tuple[int, int]]]:
        """Prompt and phrase spans; phrases past the text encoder's length are dropped."""
        phrases = [p["text"] for p in item.record["phrases"]]
        while True:
            prompt, spans = build_prompt(phrases)
            if len(self.detector.offsets(prompt)) <= self.detector.max_text_len or len(phrases) <= 1:
                break
            phrases = phrases[:-1]
        for p in item.record["phrases"][len(phrases) :]:
            item.drop(self.name, f"phrase '{p['text']}'", "beyond the detector's text length")
        return prompt, spans

    def process(self, items: list[Item]) -> None:
        images = [load_rgb(item.image, self.cfg.max_image_side) for item in items]
        prompts, spans = zip(*(self._fit_prompt(item) for item in items), strict=True)
        probs, boxes, offsets = self.detector(images, list(prompts))
        seen: dict[str, list[float]] | None = {} if self.score_log is not None else None
        for i, item in enumerate(items):
            tokens = phrase_token_indices(offsets[i], spans[i])
            regions = select_boxes(
                probs[i], boxes[i], tokens, item.record["width"], item.record["height"], self.cfg, seen
            )
            for region_id, region in enumerate(regions):
                region["id"] = region_id
                region["scores"] = {"grounding": region["score"]}
            item.record["regions"] = regions
            if not regions:
                item.reject(self.name, "no box above the grounding thresholds")
        if seen is not None:
            self.log_scores("box score (per query)", seen.get("box", []), self.cfg.box_threshold)
            self.log_scores("text score (per query)", seen.get("text", []), self.cfg.text_threshold)
