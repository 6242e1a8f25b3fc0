"""Phrase-conditioned one-sentence description of each region.

The VLM sees the whole image (a bare crop loses context and invites hallucination, design §1) and is told
the region in its own box format and the phrase the box was grounded from. The image and the constant
instruction come first and the region last, so all regions of an image share one image encoding and one
prefilled prefix (`shared_prefix`, `stages/shared_prefix.py`); the answers are the tokens each region's
full prompt gives alone. `mark_box: true` draws the box into a copy of the image instead: every region then
has its own image, so the vision tower and the whole prompt run once per region (about 4x the prefill
tokens at ~5 regions per image; docs/engine.md). A region whose answer is unusable keeps its category tier:
only its description (and the tiers made from it) is null.
"""

from __future__ import annotations

from typing import Any, Literal

from PIL import Image, ImageDraw
from pydantic import Field

from engine.config import GenerationConfig, ModelRef, Resources, Strict
from engine.images import load_rgb
from engine.items import Item
from schemas.tiers import empty_tiers, strip_tier
from stages.base import Stage
from stages.text import first_sentence

BoxFormat = Literal["auto", "qwen2vl", "qwen25vl", "pixels", "relative"]
# The box format each model family was trained with, by config.model_type. Qwen2-VL: its box tokens on a
# 0-1000 grid of the image. Qwen2.5-VL: absolute pixel coordinates of the image as resized by its processor
# (QwenLM/Qwen3-VL issue #1126: "[x1, y1, x2, y2]" ... "absolute coordinates after resizing").
BOX_FORMATS = {"qwen2_vl": "qwen2vl", "qwen2_5_vl": "qwen25vl"}


class RegionCaptionConfig(Strict):
    model: ModelRef
    # the constant instruction, right after the image; {phrase}/{box} here defeat the shared prefix
    prompt: str
    # what names the region, last: {box} (in box_format) and {phrase}
    region_prompt: str = ""
    # auto: from the loaded model's config.model_type (BOX_FORMATS); or one of the formats by name
    box_format: BoxFormat = "auto"
    mark_box: bool = False
    mark_color: str = "red"
    mark_width_frac: float = Field(0.006, ge=0, le=0.1)
    # one image encoding and one prefill of the common prompt start per image (off: every region's full
    # prompt runs on its own; mark_box implies off)
    shared_prefix: bool = True
    generation: GenerationConfig = GenerationConfig()
    max_image_side: int = Field(1344, ge=32)
    max_words: int = Field(40, ge=1)
    regions_per_call: int = Field(8, ge=1)
    resources: Resources = Resources()


def resolve_box_format(box_format: str, model_type: str) -> str:
    """The configured box format, or with `auto` the one the model family was trained with."""
    if box_format != "auto":
        return box_format
    if model_type not in BOX_FORMATS:
        raise ValueError(
            f"region_caption.box_format: auto knows no box format for model_type {model_type!r} (known: "
            f"{sorted(BOX_FORMATS)}); set box_format to one of qwen2vl, qwen25vl, pixels, relative"
        )
    return BOX_FORMATS[model_type]


def format_box(box: list[float], width: int, height: int, style: str, shown: tuple[int, int]) -> str:
    """The box as the prompt shows it: Qwen2-VL's 0-1000 grid tokens, pixels of the shown image (`shown`:
    the model's resized input for Qwen2.5-VL), or 0-1 fractions."""
    x0, y0, x1, y1 = box
    if style == "qwen2vl":
        q = [
            round(x0 / width * 1000),
            round(y0 / height * 1000),
            round(x1 / width * 1000),
            round(y1 / height * 1000),
        ]
        return f"<|box_start|>({q[0]},{q[1]}),({q[2]},{q[3]})<|box_end|>"
    if style in ("pixels", "qwen25vl"):
        sx, sy = shown[0] / width, shown[1] / height
        return f"[{round(x0 * sx)}, {round(y0 * sy)}, {round(x1 * sx)}, {round(y1 * sy)}]"
    return f"[{x0 / width:.3f}, {y0 / height:.3f}, {x1 / width:.3f}, {y1 / height:.3f}]"


def outline(
    image: Image.Image, box: list[float], width: int, height: int, color: str, frac: float
) -> Image.Image:
    """A copy of `image` (possibly downscaled from width x height) with `box` outlined."""
    marked = image.copy()
    sx, sy = image.width / width, image.height / height
    line = max(2, round(frac * max(image.size)))
    ImageDraw.Draw(marked).rectangle(
        [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy], outline=color, width=line
    )
    return marked


class RegionCaption(Stage):
    name = "region_caption"
    config_class = RegionCaptionConfig

    def __init__(self, cfg: RegionCaptionConfig) -> None:
        super().__init__(cfg)
        from stages.vlm import ChatVLM

        self.vlm = ChatVLM(cfg.model, cfg.generation)
        self.box_format = resolve_box_format(cfg.box_format, self.vlm.model_type)

    def prompts(self, item: Item, image: Image.Image) -> list[str]:
        """Each region's prompt text: the constant instruction, then what names the region."""
        record = item.record
        width, height = record["width"], record["height"]
        shown = self.vlm.input_size(image) if self.box_format == "qwen25vl" else image.size
        prompts = []
        for region in record["regions"]:
            fields = {
                "phrase": record["phrases"][region["phrase"]]["text"],
                "box": format_box(region["box"], width, height, self.box_format, shown),
            }
            parts = [self.cfg.prompt.format(**fields), self.cfg.region_prompt.format(**fields)]
            prompts.append(" ".join(p for p in parts if p))
        return prompts

    def _shown(self, item: Item, region: dict[str, Any], image: Image.Image) -> Image.Image:
        """The image the model sees for one region (outlined copies are made per chunk to bound memory)."""
        if not self.cfg.mark_box:
            return image
        width, height = item.record["width"], item.record["height"]
        return outline(image, region["box"], width, height, self.cfg.mark_color, self.cfg.mark_width_frac)

    def _answers_alone(self, groups: list[tuple[Item, Image.Image, list[str]]]) -> list[list[str]]:
        """Every region's full prompt on its own (the image encoded and prefilled once per region)."""
        requests = [
            (item, region, image, prompt)
            for item, image, prompts in groups
            for region, prompt in zip(item.record["regions"], prompts, strict=True)
        ]
        flat: list[str] = []
        step = self.cfg.regions_per_call
        for start in range(0, len(requests), step):
            chunk = requests[start : start + step]
            images = [self._shown(item, region, image) for item, region, image, _ in chunk]
            flat += self.vlm.generate(images, [prompt for *_, prompt in chunk])
        answers, start = [], 0
        for _, _, prompts in groups:
            answers.append(flat[start : start + len(prompts)])
            start += len(prompts)
        return answers

    def process(self, items: list[Item]) -> None:
        groups = []
        for item in items:
            image = load_rgb(item.image, self.cfg.max_image_side)
            groups.append((item, image, self.prompts(item, image)))
        if self.cfg.shared_prefix and not self.cfg.mark_box:
            pairs = [(image, prompts) for _, image, prompts in groups]
            answers = self.vlm.generate_shared(pairs, self.cfg.regions_per_call)
        else:
            answers = self._answers_alone(groups)
        for (item, _, _), texts in zip(groups, answers, strict=True):
            for region, answer in zip(item.record["regions"], texts, strict=True):
                region["description"] = first_sentence(answer, self.cfg.max_words) or None
        for item in items:
            for region in item.record["regions"]:
                empty_tiers(region)
                if not region.get("description"):
                    strip_tier(item.record, region, "description", self.name, "no usable description")
