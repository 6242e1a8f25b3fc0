"""Phrase-conditioned one-sentence description of each region.

The VLM sees the whole image with the region outlined and is told the box coordinates and the phrase the
box was grounded from: a bare crop loses context and invites hallucination (design §1). A region whose
answer is unusable keeps its category tier: only its description (and the tiers made from it) is null.
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


class RegionCaptionConfig(Strict):
    model: ModelRef
    prompt: str
    box_format: Literal["qwen2vl", "pixels", "relative"] = "qwen2vl"
    mark_box: bool = True
    mark_color: str = "red"
    mark_width_frac: float = Field(0.006, ge=0, le=0.1)
    generation: GenerationConfig = GenerationConfig()
    max_image_side: int = Field(1344, ge=32)
    max_words: int = Field(40, ge=1)
    regions_per_call: int = Field(8, ge=1)
    resources: Resources = Resources()


def format_box(box: list[float], width: int, height: int, style: str, shown: tuple[int, int]) -> str:
    """The box as the prompt shows it: Qwen2-VL's 0-1000 grid tokens, pixels of the shown image, or 0-1."""
    x0, y0, x1, y1 = box
    if style == "qwen2vl":
        q = [
            round(x0 / width * 1000),
            round(y0 / height * 1000),
            round(x1 / width * 1000),
            round(y1 / height * 1000),
        ]
        return f"<|box_start|>({q[0]},{q[1]}),({q[2]},{q[3]})<|box_end|>"
    if style == "pixels":
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

    def _requests(self, items: list[Item]) -> list[tuple[Item, dict[str, Any], Image.Image, str]]:
        requests = []
        for item in items:
            record = item.record
            width, height = record["width"], record["height"]
            image = load_rgb(item.image, self.cfg.max_image_side)
            for region in record["regions"]:
                phrase = record["phrases"][region["phrase"]]["text"]
                box_text = format_box(region["box"], width, height, self.cfg.box_format, image.size)
                prompt = self.cfg.prompt.format(phrase=phrase, box=box_text)
                requests.append((item, region, image, prompt))
        return requests

    def _shown(self, item: Item, region: dict[str, Any], image: Image.Image) -> Image.Image:
        """The image the model sees for one region (outlined copies are made per chunk to bound memory)."""
        if not self.cfg.mark_box:
            return image
        width, height = item.record["width"], item.record["height"]
        return outline(image, region["box"], width, height, self.cfg.mark_color, self.cfg.mark_width_frac)

    def process(self, items: list[Item]) -> None:
        requests = self._requests(items)
        step = self.cfg.regions_per_call
        for start in range(0, len(requests), step):
            chunk = requests[start : start + step]
            images = [self._shown(item, region, image) for item, region, image, _ in chunk]
            answers = self.vlm.generate(images, [prompt for *_, prompt in chunk])
            for (_, region, _, _), answer in zip(chunk, answers, strict=True):
                region["description"] = first_sentence(answer, self.cfg.max_words) or None
        for item in items:
            for region in item.record["regions"]:
                empty_tiers(region)
                if not region.get("description"):
                    strip_tier(item.record, region, "description", self.name, "no usable description")
