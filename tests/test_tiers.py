"""Region tiers: refine keeps every region and strips only the tiers whose checks fail; referring rules
(5-10 words, no commas) are retried once with the reason and never truncated; the filter strips only the
referring tier; tier counts and drop reasons; the ChatRex task mix uses only the texts present."""

from __future__ import annotations

import random

import pytest

from engine.config import ModelRef
from engine.items import Item
from schemas.tiers import strip_tier, tier_counts, tier_drops
from stages.filter import ground_conversation, grounded_caption
from stages.refine import Refine, RefineConfig, category_of

KEY = "b" * 64


class FakeLM:
    """Stands in for ChatLM: yes-probabilities by phrase, scripted answers; records every prompt."""

    def __init__(self, p_yes: dict[str, float], answers: list[str]) -> None:
        self.p_yes, self.answers = p_yes, list(answers)
        self.yes_prompts: list[str] = []
        self.generate_prompts: list[str] = []

    def answer_token_ids(self, yes, no):
        return [1], [2]

    def yes_probability(self, prompts, yes_ids, no_ids):
        self.yes_prompts += prompts
        return [next(v for k, v in self.p_yes.items() if f'"{k}"' in p) for p in prompts]

    def generate(self, prompts):
        self.generate_prompts += prompts
        return [self.answers.pop(0) for _ in prompts]


def refine_cfg(**kw) -> RefineConfig:
    base = {
        "model": ModelRef(name="fake"),
        "system_prompt": "",
        "verify_prompt": 'Object "{phrase}". Description "{description}". Fits?',
        "referring_prompt": 'Rewrite "{description}" about the {category}.',
    }
    return RefineConfig(**(base | kw))


def make_item() -> Item:
    caption = "Two green lemons beside a small wooden kitchen table."
    phrases = [
        {"text": "Two green lemons", "start": 0, "end": 16, "head": "lemon", "noun": "lemon", "turn": None},
        {
            "text": "small wooden kitchen table",
            "start": 26,
            "end": 52,
            "head": "table",
            "noun": "kitchen table",
            "turn": None,
        },
    ]
    regions = [
        {"id": i, "box": [0, 0, 10, 10], "score": 0.9, "phrase": p, "scores": {"grounding": 0.9}}
        for i, p in enumerate([0, 0, 1])
    ]
    regions[0]["description"] = "A green lemon on the left."
    regions[1]["description"] = "A cat sleeping."  # fails verification below
    regions[2]["description"] = "A wooden table in a kitchen."
    record = {"caption": {"text": caption}, "phrases": phrases, "regions": regions, "dropped": []}
    return Item(key=KEY, uri="/x.jpg", image=b"", record=record)


@pytest.fixture
def make_refine(monkeypatch):
    def build(lm: FakeLM, **kw) -> Refine:
        monkeypatch.setattr("stages.llm.ChatLM", lambda *a, **k: lm)  # imported when the stage is built
        return Refine(refine_cfg(**kw))

    return build


def test_refine_keeps_every_region_and_strips_only_failed_tiers(make_refine):
    lm = FakeLM(
        {"A green lemon on the left.": 0.9, "A cat sleeping.": 0.1, "A wooden table in a kitchen.": 0.8},
        ["the green lemon on the left side", "the wooden table in the kitchen corner"],
    )
    item = make_item()
    make_refine(lm).run([item])
    regions = item.record["regions"]
    assert [r["id"] for r in regions] == [0, 1, 2]  # nothing dropped
    assert [r["category"] for r in regions] == ["lemon", "lemon", "kitchen table"]  # adjectives gone
    assert regions[0]["short_phrase"] == "Two green lemons"  # a descriptive phrase (3+ words)
    assert regions[1]["description"] is None and regions[1]["referring"] is None
    assert regions[1]["category"] == "lemon" and regions[1]["scores"]["verify"] == 0.1
    assert regions[0]["referring"] == "the green lemon on the left side"
    assert item.trace["refine"]["in"] == item.trace["refine"]["out"] == 3
    # one verification per description, one rewrite per verified description, no category generation
    assert len(lm.yes_prompts) == 3 and len(lm.generate_prompts) == 2
    assert "about the lemon" in lm.generate_prompts[0]  # the referring prompt uses the grounded category
    drops = tier_drops(item.record)
    assert drops["description"] == {"description mismatch": 1}
    assert drops["referring"] == {"parent tier lost": 1}
    assert tier_counts(item.record) == {"category": 3, "short_phrase": 3, "description": 2, "referring": 2}


def test_referring_outside_the_rules_is_retried_once_with_the_reason_never_truncated(make_refine):
    long = "the very green lemon that lies on the far left of the table"  # 13 words
    lm = FakeLM(
        {"A green lemon on the left.": 0.9, "A cat sleeping.": 0.1, "A wooden table in a kitchen.": 0.9},
        [long, "table, wooden, in kitchen", "the green lemon lying on the left", "a table"],
    )
    item = make_item()
    make_refine(lm).run([item])
    lemon, _, table = item.record["regions"]
    assert lemon["referring"] == "the green lemon lying on the left"  # the retry passed
    assert lemon["scores"]["referring_attempts"] == 2
    assert "too many words: 13 > 10" in lm.generate_prompts[2]  # the reason went back to the model
    assert "has a comma" in lm.generate_prompts[3]
    assert table["referring"] is None and table["description"]  # rejected twice: the tier stays empty
    assert tier_drops(item.record)["referring"]["too few words"] == 1
    assert len(lm.generate_prompts) == 4


def test_no_retry_when_configured_off(make_refine):
    lm = FakeLM({"A green lemon": 0.9, "A cat": 0.1, "A wooden": 0.9}, ["one two three", "x"])
    lm.p_yes = {
        "A green lemon on the left.": 0.9,
        "A cat sleeping.": 0.1,
        "A wooden table in a kitchen.": 0.9,
    }
    item = make_item()
    make_refine(lm, referring_retries=0).run([item])
    assert len(lm.generate_prompts) == 2
    assert all(r["referring"] is None for r in item.record["regions"])


@pytest.mark.parametrize(
    "source, expected",
    [("noun", "kitchen table"), ("head", "table"), ("phrase", "small wooden kitchen table")],
)
def test_category_comes_from_the_grounded_phrase(source, expected):
    phrase = make_item().record["phrases"][1]
    assert category_of(phrase, source, max_words=4) == expected
    assert category_of(phrase, "phrase", max_words=2) == "table"  # too long: its head


def test_filter_strip_keeps_the_region_and_nested_tiers_follow_their_parent():
    record = make_item().record
    region = record["regions"][0] | {"short_phrase": "x y z", "referring": "a b c d e"}
    record["regions"][0] = region
    strip_tier(record, region, "referring", "filter", "low image-text score: 0.01 < 0.05")
    assert region["referring"] is None and region["description"]
    strip_tier(record, region, "description", "refine", "description mismatch: p_yes=0.1")
    assert region["description"] is None and region["referring"] is None and region["short_phrase"]
    drops = tier_drops(record)
    assert drops["referring"] == {"low image-text score": 1, "parent tier lost": 1}


def test_conversation_spans_point_at_regions_and_caption_spans_skip_turn_phrases():
    record = make_item().record
    record["phrases"].append({"text": "cat", "start": 4, "end": 7, "head": "cat", "noun": "cat", "turn": 1})
    record["regions"].append({"id": 7, "box": [0, 0, 5, 5], "score": 0.5, "phrase": 2})
    record["grounded_conversation"] = [
        {"role": "human", "text": "What is here?", "spans": []},
        {
            "role": "gpt",
            "text": "A wooden table, lemons and a dog.",
            "spans": [
                {"start": 2, "end": 14, "phrase": 1, "regions": []},
                {"start": 4, "end": 7, "phrase": 2, "regions": []},
                {"start": 28, "end": 31, "phrase": 3, "regions": []},  # phrase without a region
            ],
        },
    ]
    ground_conversation(record)
    spans = record["grounded_conversation"][1]["spans"]
    assert [(s["phrase"], s["regions"]) for s in spans] == [(1, [2]), (2, [7])]
    assert [s["phrase"] for s in grounded_caption(record)["spans"]] == [0, 1]


def test_task_mix_uses_only_the_texts_a_region_has():
    from chatrex.tasks import make_task, mix_boxes

    record = make_item().record
    for region in record["regions"]:
        region.update(category="lemon", short_phrase=None, description=None, referring=None)
    record["regions"][2].update(referring="the lemon on the right side", description="A lemon.")
    rng = random.Random(0)
    boxes = mix_boxes(record, 10, rng)
    assert make_task("phrase", record, boxes, rng) is None  # no region has a short phrase
    for _ in range(10):
        refer = make_task("refer", record, boxes, rng)
        assert "the lemon on the right side" in refer.question
        region = make_task("region", record, boxes, rng)
        assert region.answer  # never a null text
    assert make_task("detect", record, boxes, rng).answer
