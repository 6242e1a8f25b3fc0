"""One-sentence image description that names the main objects (the text everything else grounds).

`source` (config) decides where the caption comes from: `vlm` asks the VLM for every image; `input` uses
the input's own text (alt text, a caption column, a COCO caption; `caption.input` set by decode) where there
is one and asks the VLM for the rest; `both` grounds the VLM caption and keeps the input's text beside it
in `caption.input`. The VLM is loaded on first use, so an all-input run never loads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from engine.config import GenerationConfig, ModelRef, Resources, Strict
from engine.images import load_rgb
from engine.items import Item
from stages.base import Stage
from stages.text import first_sentence

if TYPE_CHECKING:  # the model wrapper imports torch: only actors load it
    from stages.vlm import ChatVLM

INPUT_MODEL = "input"  # caption.model of a caption taken from the input


def input_caption(text: str | None, max_words: int) -> str:
    """The input's caption as grounding text: whitespace collapsed, at most `max_words` words ("" if none)."""
    words = (text or "").split()[:max_words]
    return " ".join(words) if any(ch.isalpha() for ch in "".join(words)) else ""


class CaptionConfig(Strict):
    model: ModelRef
    prompt: str
    generation: GenerationConfig = GenerationConfig()
    max_image_side: int = Field(1344, ge=32)
    max_words: int = Field(60, ge=1)
    # vlm: the VLM writes every caption; input: the input's own text (alt text, caption column, COCO
    # caption) replaces it where present (the VLM captions the rest); both: the VLM caption is grounded and
    # the input text is kept beside it as caption.input
    source: Literal["vlm", "input", "both"] = "vlm"
    resources: Resources = Resources()


class Caption(Stage):
    name = "caption"
    config_class = CaptionConfig
    unit = ""

    def __init__(self, cfg: CaptionConfig) -> None:
        super().__init__(cfg)
        self._vlm: ChatVLM | None = None

    def warm_up(self) -> None:
        self.vlm  # noqa: B018 (the property loads the model)

    @property
    def vlm(self) -> ChatVLM:
        if self._vlm is None:
            from stages.vlm import ChatVLM

            self._vlm = ChatVLM(self.cfg.model, self.cfg.generation)
        return self._vlm

    def process(self, items: list[Item]) -> None:
        need_vlm = []
        for item in items:
            caption = item.record["caption"]
            own = input_caption(caption.get("input"), self.cfg.max_words)
            if self.cfg.source == "input" and own:
                item.record["caption"] = {"text": own, "model": INPUT_MODEL, "input": None}
            else:
                need_vlm.append(item)
        if not need_vlm:
            return
        images = [load_rgb(item.image, self.cfg.max_image_side) for item in need_vlm]
        answers = self.vlm.generate(images, [self.cfg.prompt] * len(need_vlm))
        for item, answer in zip(need_vlm, answers, strict=True):
            text = first_sentence(answer, self.cfg.max_words)
            if not text:
                item.reject(self.name, f"no usable caption: the model said {answer[:80]!r}")
                continue
            kept = item.record["caption"].get("input") if self.cfg.source == "both" else None
            item.record["caption"] = {"text": text, "model": self.cfg.model.name, "input": kept}
