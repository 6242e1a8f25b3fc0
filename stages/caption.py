"""One-sentence image description that names the main objects (the text everything else grounds)."""

from __future__ import annotations

from engine.config import CaptionConfig
from engine.images import load_rgb
from engine.items import Item
from stages.base import Stage
from stages.text import first_sentence
from stages.vlm import ChatVLM


class Caption(Stage):
    name = "caption"
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
