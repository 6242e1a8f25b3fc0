"""Region tiers past grounding (paper §4.1): every region keeps its category; richer texts only if they pass.

- category: from the grounded phrase (its `noun`, `head` or whole text, by config) — no model call; its
  score is the grounding score.
- short phrase: the grounded phrase itself when it is descriptive (`min_short_phrase_words`+ words, the
  paper's 3+) — no model call.
- description: written by region_caption; kept if the LLM says it fits the phrase (P(yes) from next-token
  probabilities, `scores.verify` >= `verify_threshold`), else set to null with the reason.
- referring: rewritten by the LLM from a verified description, checked against the word rules (5-10 words,
  no commas); an answer outside them is asked again once with the reason, then the tier is left null.

No region is dropped here: a failed check strips that tier (and the tiers made from it) only.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from engine.config import GenerationConfig, ModelRef, Resources, Strict
from engine.items import Item
from schemas.tiers import empty_tiers, strip_tier
from stages.base import Stage
from stages.text import check_referring

Entry = tuple[Item, dict[str, Any], dict[str, Any]]  # item, region, its phrase


def category_of(phrase: dict[str, Any], source: str, max_words: int) -> str:
    """The region's category from its grounded phrase; the head lemma when the choice is too long."""
    text = {"noun": phrase.get("noun"), "head": phrase.get("head"), "phrase": phrase["text"]}[source]
    text = " ".join((text or phrase.get("head") or phrase["text"]).lower().split())
    if len(text.split()) > max_words:
        text = (phrase.get("head") or text.split()[-1]).lower()
    return text


def short_phrase_of(phrase: dict[str, Any], min_words: int, max_words: int) -> tuple[str, str]:
    """(phrase, "") when the grounded phrase is descriptive and within the word bounds, else ("", why)."""
    words = phrase["text"].split()
    if len(words) < min_words:
        return "", f"not descriptive: {len(words)} words < {min_words}"
    if len(words) > max_words:
        return "", f"too long: {len(words)} words > {max_words}"
    return " ".join(words), ""


class RefineConfig(Strict):
    """Region tiers past the category (paper §4.1): category and short phrase come from the grounded phrase
    (no model call), the description is verified by the LLM, the referring expression is rewritten from a
    verified description and checked against the word rules (retried with the reason, never truncated)."""

    model: ModelRef
    system_prompt: str
    verify_prompt: str
    referring_prompt: str
    referring_retry_prompt: str = (
        'Your answer "{answer}" was rejected: {reason}. Write it again as {min_words} to {max_words} words '
        "with no commas. Reply with the expression only."
    )
    yes_words: list[str] = Field(default_factory=lambda: ["yes", "Yes"])
    no_words: list[str] = Field(default_factory=lambda: ["no", "No"])
    verify_threshold: float = Field(0.5, ge=0, le=1)
    generation: GenerationConfig = GenerationConfig(max_new_tokens=24)
    # category of a region: the phrase's `noun` (adjectives and numbers dropped, head lemmatised; Rex-Omni
    # keeps "lemon", not "green lemon"), its `head` lemma only, or the whole `phrase`
    category_from: Literal["noun", "head", "phrase"] = "noun"
    max_category_words: int = Field(3, ge=1)
    # short phrase: the grounded phrase when it is descriptive (paper: 3+ words), else the tier is not reached
    min_short_phrase_words: int = Field(3, ge=1)
    max_short_phrase_words: int = Field(8, ge=1)
    referring_min_words: int = Field(5, ge=1)
    referring_max_words: int = Field(10, ge=1)
    referring_retries: int = Field(1, ge=0, le=3)
    regions_per_call: int = Field(16, ge=1)
    # the system prompt (the start every prompt shares) prefilled once per actor, reused by every call
    shared_prefix: bool = True
    resources: Resources = Resources()

    @model_validator(mode="after")
    def _bounds_ordered(self) -> RefineConfig:
        if self.referring_min_words > self.referring_max_words:
            raise ValueError("referring_min_words must be <= referring_max_words")
        if self.min_short_phrase_words > self.max_short_phrase_words:
            raise ValueError("min_short_phrase_words must be <= max_short_phrase_words")
        return self


class Refine(Stage):
    name = "refine"
    config_class = RefineConfig

    def __init__(self, cfg: RefineConfig) -> None:
        super().__init__(cfg)
        from stages.llm import ChatLM

        self.llm = ChatLM(cfg.model, cfg.generation, cfg.system_prompt, shared_prefix=cfg.shared_prefix)
        self.yes_ids, self.no_ids = self.llm.answer_token_ids(cfg.yes_words, cfg.no_words)

    def _chunks(self, entries: list[Any]) -> list[list[Any]]:
        step = self.cfg.regions_per_call
        return [entries[i : i + step] for i in range(0, len(entries), step)]

    def _names(self, entries: list[Entry]) -> None:
        """Category (always) and short phrase (when descriptive) from the grounded phrase: no model call."""
        cfg = self.cfg
        for item, region, phrase in entries:
            empty_tiers(region)
            region["category"] = category_of(phrase, cfg.category_from, cfg.max_category_words)
            short, reason = short_phrase_of(phrase, cfg.min_short_phrase_words, cfg.max_short_phrase_words)
            if short:
                region["short_phrase"] = short
            else:
                strip_tier(item.record, region, "short_phrase", self.name, reason)

    def _verify(self, entries: list[Entry]) -> None:
        """Score each description against its phrase; a description below the threshold is stripped."""
        for chunk in self._chunks(entries):
            prompts = [
                self.cfg.verify_prompt.format(phrase=phrase["text"], description=region["description"])
                for _, region, phrase in chunk
            ]
            scores = self.llm.yes_probability(prompts, self.yes_ids, self.no_ids)
            self.log_scores("verify p_yes (strips description below)", scores, self.cfg.verify_threshold)
            for (item, region, _), score in zip(chunk, scores, strict=True):
                region.setdefault("scores", {})["verify"] = round(score, 4)
                if score < self.cfg.verify_threshold:
                    reason = f"description mismatch: p_yes={score:.2f} < {self.cfg.verify_threshold}"
                    strip_tier(item.record, region, "description", self.name, reason)

    def _referring_prompt(self, phrase: dict[str, Any], region: dict[str, Any]) -> str:
        return self.cfg.referring_prompt.format(
            phrase=phrase["text"], description=region["description"], category=region["category"]
        )

    def _referring(self, entries: list[Entry]) -> None:
        """Rewrite verified descriptions; answers outside the rules are retried with the reason."""
        cfg = self.cfg
        pending = [(entry, self._referring_prompt(entry[2], entry[1])) for entry in entries]
        for attempt in range(cfg.referring_retries + 1):
            retry = []
            for chunk in self._chunks(pending):
                answers = self.llm.generate([prompt for _, prompt in chunk])
                for ((item, region, phrase), prompt), answer in zip(chunk, answers, strict=True):
                    text, reason = check_referring(answer, cfg.referring_min_words, cfg.referring_max_words)
                    if text:
                        region["referring"] = text
                        region.setdefault("scores", {})["referring_attempts"] = attempt + 1
                    elif attempt < cfg.referring_retries:
                        again = cfg.referring_retry_prompt.format(
                            answer=" ".join(answer.split())[:200],
                            reason=reason,
                            min_words=cfg.referring_min_words,
                            max_words=cfg.referring_max_words,
                        )
                        retry.append(((item, region, phrase), f"{prompt}\n{again}"))
                    else:
                        strip_tier(item.record, region, "referring", self.name, reason)
            pending = retry

    def process(self, items: list[Item]) -> None:
        entries = [
            (item, region, item.record["phrases"][region["phrase"]])
            for item in items
            for region in item.record["regions"]
        ]
        self._names(entries)
        described = [e for e in entries if e[1].get("description")]
        self._verify(described)
        self._referring([e for e in described if e[1].get("description")])
