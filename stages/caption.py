"""One-sentence image description that names the main objects (the text everything else grounds)."""

from __future__ import annotations

from pydantic import Field

from engine.config import GenerationConfig, ModelRef, Resources, Strict
from engine.images import load_rgb
from engine.items import Item
from stages.base import Stage
from stages.text import first_sentence
from stages.vlm import ChatVLM


class CaptionConfig(Strict):
    model: ModelRef
    prompt: str
    generation: GenerationConfig = GenerationConfig()
    max_image_side: int = Field(1344, ge=32)
    max_words: int = Field(60, ge=1)
    resources: Resources = Resources()


class Caption(Stage):
    name = "caption"
    config_class = CaptionConfig
    unit = ""

    def __init__(self, cfg: CaptionConfig) -> None:
        super().__init__(cfg)
        self.vlm = ChatVLM(cfg.model, cfg.generation)

    def process(self, items: list[Item]) -> None:
        images = [load_rgb(item.image, self.cfg.max_image_side) for item in items]
        answers = self.vlm.generate(images, [self.cfg.prompt] * len(items))
        for item, answer in zip(items, answers, strict=True):
            text = first_sentence(answer, self.cfg.max_words)
            if not text:
                item.reject(self.name, f"no usable caption: the model said {answer[:80]!r}")
                continue
            item.record["caption"] = {"text": text, "model": self.cfg.model.name}
