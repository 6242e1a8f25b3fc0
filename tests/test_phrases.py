"""Noun-phrase extraction with the real spaCy English pipeline: spans, trimming, drops, dedupe."""

import pytest

from stages.phrases import Phrases, PhrasesConfig, extract_phrases

ABSTRACT = {"image", "background", "picture"}


@pytest.fixture(scope="module")
def nlp():
    return Phrases(PhrasesConfig()).nlp


def extract(nlp, text, **kw):
    args = {"abstract_nouns": ABSTRACT, "min_chars": 2, "max_words": 8, "max_phrases": 16} | kw
    return extract_phrases(nlp(text), **args)


def test_spans_index_into_the_caption_and_determiners_are_trimmed(nlp):
    caption = "The large red ball sits next to two small blue squares on a gray background."
    phrases, drops = extract(nlp, caption)
    texts = [p["text"] for p in phrases]
    assert "large red ball" in texts and "two small blue squares" in texts
    for p in phrases:
        assert caption[p["start"] : p["end"]] == p["text"]
    assert any("background" in d.reason for d in drops)
    assert "gray background" not in texts


def test_pronouns_abstract_nouns_and_duplicates_are_dropped(nlp):
    caption = "A dog chases a cat, and it catches the cat in this picture."
    phrases, drops = extract(nlp, caption)
    texts = [p["text"] for p in phrases]
    assert texts.count("cat") == 1
    reasons = {d.reason.split(":")[0] for d in drops}
    assert {"pronoun", "duplicate phrase", "abstract noun"} <= reasons


def test_caps_on_length_and_count(nlp):
    caption = "A cat, a dog, a bird, a horse and a cow stand in a field."
    phrases, drops = extract(nlp, caption, max_phrases=2)
    assert len(phrases) == 2
    assert any(d.reason.startswith("over max_phrases") for d in drops)
    phrases, drops = extract(nlp, "A very big old brown wooden farm table stands there.", max_words=3)
    assert not phrases and drops[0].reason.startswith("too long")


def test_stage_rejects_captions_without_visual_phrase():
    from engine.items import Item

    stage = Phrases(PhrasesConfig(abstract_nouns=["image"]))
    good = Item("k1", "u1", b"x", {"caption": {"text": "A red car on a road."}, "dropped": []})
    empty = Item("k2", "u2", b"x", {"caption": {"text": "This is an image."}, "dropped": []})
    stage.run([good, empty])
    assert good.ok and [p["text"] for p in good.record["phrases"]] == ["red car", "road"]
    assert not empty.ok and empty.error_stage == "phrases"
    assert good.trace["phrases"]["out"] == 2


def test_noun_drops_adjectives_and_numbers_and_keeps_compounds(nlp):
    caption = "Two green lemons lie beside three red traffic lights."
    phrases, _ = extract(nlp, caption)
    nouns = {p["text"]: p["noun"] for p in phrases}
    assert nouns["Two green lemons"] == "lemon"
    assert nouns["three red traffic lights"] == "traffic light"
    assert all(p["turn"] is None for p in phrases)


def test_conversation_answer_turns_reuse_known_phrases_and_add_new_ones():
    from engine.items import Item

    stage = Phrases(PhrasesConfig(abstract_nouns=sorted(ABSTRACT)))
    turns = [
        {"role": "human", "text": "What is next to the dog?", "spans": []},
        {"role": "gpt", "text": "A red ball lies next to the dog and a wooden chair.", "spans": []},
    ]
    record = {"caption": {"text": "A dog and a red ball."}, "grounded_conversation": turns, "dropped": []}
    item = Item(key="c" * 64, uri="/x.jpg", image=b"", record=record)
    stage.run([item])
    texts = [(p["text"], p["turn"]) for p in record["phrases"]]
    assert texts[:2] == [("dog", None), ("red ball", None)]
    assert ("wooden chair", 1) in texts  # new phrase from the answer turn, spans index into that turn
    chair = next(p for p in record["phrases"] if p["text"] == "wooden chair")
    assert turns[1]["text"][chair["start"] : chair["end"]] == "wooden chair"
    spans = turns[1]["spans"]
    assert [record["phrases"][s["phrase"]]["text"] for s in spans] == ["red ball", "dog", "wooden chair"]
    assert turns[0]["spans"] == []  # questions are not grounded
