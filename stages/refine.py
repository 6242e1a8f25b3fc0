"""Verify each region's description against its phrase, then write category, short phrase, referring.

One field per question (design §4): the LLM first answers "does this description fit the phrase?" (scored
from next-token probabilities), regions below `verify_threshold` are dropped; survivors get three short
generations, each parsed to its exact format (stages/text.py). A region whose field comes out unusable is
dropped with the reason, never kept half-filled.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from engine.config import GenerationConfig, ModelRef, Resources, Strict
from engine.items import Item
from stages.base import Stage
from stages.llm import ChatLM
from stages.text import parse_category, parse_referring, parse_short_phrase


class RefineConfig(Strict):
    model: ModelRef
    system_prompt: str
    verify_prompt: str
    category_prompt: str
    short_phrase_prompt: str
    referring_prompt: str
    yes_words: list[str] = Field(default_factory=lambda: ["yes", "Yes"])
    no_words: list[str] = Field(default_factory=lambda: ["no", "No"])
    verify_threshold: float = Field(0.5, ge=0, le=1)
    generation: GenerationConfig = GenerationConfig(max_new_tokens=24)
    max_category_words: int = Field(3, ge=1)
    max_short_phrase_words: int = Field(6, ge=1)
    referring_min_words: int = Field(3, ge=1)
    referring_max_words: int = Field(10, ge=1)
    regions_per_call: int = Field(16, ge=1)
    resources: Resources = Resources()


class Refine(Stage):
    name = "refine"
    config_class = RefineConfig

    def __init__(self, cfg: RefineConfig) -> None:
        super().__init__(cfg)
        self.llm = ChatLM(cfg.model, cfg.generation, cfg.system_prompt)
        self.yes_ids, self.no_ids = self.llm.answer_token_ids(cfg.yes_words, cfg.no_words)

    def _chunks(self, entries: list[Any]) -> list[list[Any]]:
        step = self.cfg.regions_per_call
        return [entries[i : i + step] for i in range(0, len(entries), step)]

    def _verify(self, entries: list[tuple[Item, dict[str, Any], str]]) -> None:
        for chunk in self._chunks(entries):
            prompts = [
                self.cfg.verify_prompt.format(phrase=phrase, description=region["description"])
                for _, region, phrase in chunk
            ]
            scores = self.llm.yes_probability(prompts, self.yes_ids, self.no_ids)
            for (_, region, _), score in zip(chunk, scores, strict=True):
                region.setdefault("scores", {})["verify"] = round(score, 4)

    def _write_field(
        self, entries: list[tuple[Item, dict[str, Any], str]], field: str, template: str
    ) -> None:
        for chunk in self._chunks(entries):
            prompts = [
                template.format(
                    phrase=phrase, description=region["description"], category=region.get("category", "")
                )
                for _, region, phrase in chunk
            ]
            for (_, region, _), answer in zip(chunk, self.llm.generate(prompts), strict=True):
                region[field] = self._parse(field, answer)

    def _parse(self, field: str, answer: str) -> str:
        if field == "category":
            return parse_category(answer, self.cfg.max_category_words)
        if field == "short_phrase":
            return parse_short_phrase(answer, self.cfg.max_short_phrase_words)
        return parse_referring(answer, self.cfg.referring_min_words, self.cfg.referring_max_words)

    def _keep(self, item: Item, region: dict[str, Any]) -> bool:
        verify = region["scores"]["verify"]
        if verify < self.cfg.verify_threshold:
            reason = f"description mismatch: p_yes={verify:.2f} < {self.cfg.verify_threshold}"
        else:
            missing = [f for f in ("category", "short_phrase", "referring") if not region.get(f)]
            if not missing:
                return True
            reason = f"unusable fields: {', '.join(missing)}"
        item.drop(self.name, f"region {region['id']}", reason)
        return False

    def process(self, items: list[Item]) -> None:
        entries = [
            (item, region, item.record["phrases"][region["phrase"]]["text"])
            for item in items
            for region in item.record["regions"]
        ]
        self._verify(entries)
        passed = [e for e in entries if e[1]["scores"]["verify"] >= self.cfg.verify_threshold]
        self._write_field(passed, "category", self.cfg.category_prompt)
        self._write_field(passed, "short_phrase", self.cfg.short_phrase_prompt)
        self._write_field(passed, "referring", self.cfg.referring_prompt)
        for item in items:
            item.record["regions"] = [r for r in item.record["regions"] if self._keep(item, r)]
            if not item.record["regions"]:
                item.reject(self.name, "no region passed refinement")
