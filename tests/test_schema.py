"""The record contract: valid records pass, every broken invariant is reported."""

import copy

import pytest

from schemas import Record, SchemaError, validate

KEY = "a" * 64


def valid_record() -> dict:
    caption = "A red ball next to a blue box."
    return {
        "key": KEY,
        "schema_version": "1.2",
        "source": {"uri": "/data/x.jpg", "dataset": "t"},
        "width": 100,
        "height": 80,
        "image_ext": "jpg",
        "caption": {"text": caption, "model": "m", "input": None},
        "phrases": [
            {"text": "red ball", "start": 2, "end": 10, "head": "ball", "noun": "ball", "turn": None},
            {"text": "blue box", "start": 21, "end": 29, "head": "box", "noun": "box", "turn": None},
        ],
        "regions": [
            {
                "id": 0,
                "box": [1.0, 2.0, 50.0, 60.0],
                "score": 0.9,
                "phrase": 0,
                "category": "ball",
                "short_phrase": "red ball",
                "description": "A red ball.",
                "referring": "the red ball on the left",
                "scores": {},
                "mask": None,
            },
            {
                "id": 3,
                "box": [60.0, 10.0, 100.0, 80.0],
                "score": 0.8,
                "phrase": 1,
                "category": "box",
                "short_phrase": "blue box",
                "description": "A blue box.",
                "referring": "the blue box on the right",
                "scores": {},
                "mask": None,
            },
        ],
        "grounded_caption": {
            "text": caption,
            "spans": [
                {"start": 2, "end": 10, "phrase": 0, "regions": [0]},
                {"start": 21, "end": 29, "phrase": 1, "regions": [3]},
            ],
        },
        "grounded_conversation": None,
        "proposals": [],
        "dropped": [{"stage": "refine", "what": "region 1", "reason": "description mismatch: p=0.1"}],
        "provenance": {},
    }


def test_valid_record_passes_and_round_trips_through_typed_objects():
    record = valid_record()
    assert validate(record) == []
    typed = Record.from_dict(record)
    assert typed.regions[1].id == 3
    assert typed.to_dict() == record


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda r: r.update(key="xyz"), "key must be"),
        (lambda r: r.update(width=0), "width/height"),
        (lambda r: r["phrases"][0].update(end=11), "!= caption"),
        (lambda r: r["phrases"][0].update(end=500), "outside the caption"),
        (lambda r: r["regions"][0].update(box=[1, 2, 150, 60]), "outside the 100x80 image"),
        (lambda r: r["regions"][0].update(box=[10, 2, 5, 60]), "empty or outside"),
        (lambda r: r["regions"][0].update(box=[1, 2, float("nan"), 60]), "finite numbers"),
        (lambda r: r["regions"][0].update(referring=""), "referring must be a non-empty string or null"),
        (lambda r: r["regions"][0].pop("short_phrase"), "short_phrase must be present"),
        (lambda r: r["regions"][0].update(description=None), "referring needs its description"),
        (lambda r: r["regions"][1].update(category=" "), "category must be a non-empty"),
        (lambda r: r["regions"][1].update(id=0), "unique int"),
        (lambda r: r["regions"][0].update(phrase=7), "not a phrase index"),
        (lambda r: r["grounded_caption"]["spans"][0].update(regions=[42]), "existing regions"),
        (lambda r: r["regions"][0].update(mask={"size": [1, 1], "counts": "PP1"}), "mask.size"),
        (lambda r: r["regions"][0].update(mask={"size": [80, 100]}), "COCO RLE"),
        (lambda r: r.update(proposals=[{"box": [0, 0, 101, 10], "score": 0.5}]), "proposals[0].box"),
        (lambda r: r.update(proposals=[{"box": [0, 0, 10, 10]}]), "proposals[0].score"),
        (lambda r: r.update(image_ext="gif"), "image_ext"),
        (lambda r: r["caption"].update(text=""), "caption.text"),
    ],
)
def test_each_broken_invariant_is_reported(mutate, expected):
    record = copy.deepcopy(valid_record())
    mutate(record)
    errors = validate(record)
    assert any(expected in e for e in errors), errors
    with pytest.raises(SchemaError):
        Record.from_dict(record)


def test_unknown_schema_version_names_the_version():
    record = valid_record()
    record["schema_version"] = "9.9"
    (error,) = validate(record)
    assert "'9.9'" in error and "upgrade" in error


def test_version_1_0_records_still_read():
    record = valid_record()
    record["schema_version"] = "1.0"
    assert validate(record) == []
    assert Record.from_dict(record).schema_version == "1.0"


def test_tiers_may_stop_after_category_in_1_2():
    record = valid_record()
    record["regions"][1].update(short_phrase=None, description=None, referring=None)
    record["regions"][0].update(referring=None)
    assert validate(record) == []
    assert Record.from_dict(record).regions[1].description is None


def test_records_before_1_2_still_need_every_tier():
    record = valid_record()
    for old in ("1.0", "1.1"):
        record["schema_version"] = old
        assert validate(record) == []  # old records still read
        broken = copy.deepcopy(record)
        broken["regions"][1]["referring"] = None
        assert any("referring must be a non-empty string" in e for e in validate(broken))


def test_conversation_phrases_index_into_their_turn_and_spans_point_at_regions():
    record = valid_record()
    turn = "There is a red ball and a green cone."
    record["grounded_conversation"] = [
        {"role": "human", "text": "What is there?", "spans": []},
        {"role": "gpt", "text": turn, "spans": [{"start": 11, "end": 19, "phrase": 0, "regions": [0]}]},
    ]
    record["phrases"].append(
        {"text": "green cone", "start": 26, "end": 36, "head": "cone", "noun": "cone", "turn": 1}
    )
    assert validate(record) == []
    assert Record.from_dict(record).to_dict() == record
    bad = copy.deepcopy(record)
    bad["phrases"][2]["turn"] = 5
    assert any("not a conversation turn" in e for e in validate(bad))
    bad = copy.deepcopy(record)
    bad["grounded_conversation"][1]["spans"][0]["regions"] = [9]
    assert any("must point at existing regions" in e for e in validate(bad))
