"""ChatRex answer parsing: total over any input, exact on well-formed answers (no model needed)."""

from __future__ import annotations

import random
import string

import numpy as np
import pytest
import torch

from chatrex.parsing import (
    Grounding,
    format_answer,
    format_grounded_text,
    indices_to_boxes,
    parse_answer,
    strip_tags,
)

pytestmark = pytest.mark.timeout(300)


def test_well_formed_answers_parse_exactly():
    text = (
        "<ground>red ball</ground><objects><obj3><obj7></objects>"
        "<ground>cat</ground><objects><obj0></objects>"
    )
    assert parse_answer(text, 10) == [Grounding("red ball", [3, 7]), Grounding("cat", [0])]


def test_grounded_caption_keeps_order_and_strips_to_the_caption():
    caption = "A cat sits on a red mat."
    answer = format_grounded_text(caption, [(16, 23, [4]), (0, 5, [1, 2])])
    assert answer == (
        "<ground>A cat</ground><objects><obj1><obj2></objects> sits on a "
        "<ground>red mat</ground><objects><obj4></objects>."
    )
    assert parse_answer(answer, 5) == [Grounding("A cat", [1, 2]), Grounding("red mat", [4])]
    assert strip_tags(answer) == caption
    with pytest.raises(ValueError):
        format_grounded_text(caption, [(0, 5, [1]), (3, 8, [2])])


def test_whitespace_and_spaces_from_decoding_are_tolerated():
    text = " <ground> the  dog </ground> <objects> <obj1> , <obj2> </objects> "
    assert parse_answer(text, 3) == [Grounding("the dog", [1, 2])]


@pytest.mark.parametrize(
    ("text", "expected"),  # with 5 input boxes
    [
        ("no tags at all", []),
        ("", []),
        # truncated generation: the indices seen so far count
        ("<ground>cat</ground><objects><obj1><obj2", [Grounding("cat", [1])]),
        ("<ground>cat</ground><objects><obj1><obj2>", [Grounding("cat", [1, 2])]),
        # phrase never closed and never pointed at anything: dropped
        ("<ground>cat", []),
        ("<ground>cat sits on", []),
        # missing </ground>: <objects> closes the phrase
        ("<ground>cat<objects><obj1></objects>", [Grounding("cat", [1])]),
        # missing <objects>: index tokens right after the phrase still count
        ("<ground>cat</ground><obj1><obj4></objects>", [Grounding("cat", [1, 4])]),
        # phrase followed by text: grounded to nothing
        ("<ground>cat</ground> is cute", [Grounding("cat", [])]),
        ("<ground>cat</ground><objects></objects>", [Grounding("cat", [])]),
        # out of range, repeated, negative-looking and absurdly long indices
        ("<ground>a</ground><objects><obj5><obj1><obj1><obj-1></objects>", [Grounding("a", [1])]),
        ("<ground>a</ground><objects><obj" + "9" * 5000 + "><obj0></objects>", [Grounding("a", [0])]),
        # a new <ground> inside an unfinished phrase restarts it
        ("<ground>a <ground>b</ground><objects><obj0></objects>", [Grounding("b", [0])]),
        # a new <ground> ends the previous group
        (
            "<ground>a</ground><objects><obj0><ground>b</ground><objects><obj1>",
            [Grounding("a", [0]), Grounding("b", [1])],
        ),
        # stray closers and bare references in running text are ignored
        ("</objects></ground> the dog <obj2> runs", []),
        ("<objects><obj2></objects>", [Grounding("", [2])]),
        ("<ground></ground><objects></objects>", []),
        (
            "<<ground>>cat<</ground>><objects><obj1></objects>",
            [Grounding(">cat<", []), Grounding("", [1])],
        ),
        ("<GROUND>cat</GROUND>", []),
    ],
)
def test_malformed_answers(text, expected):
    assert parse_answer(text, 5) == expected


@pytest.mark.parametrize("num_boxes", [None, "x", -5, float("nan"), float("inf"), 10**100, 2.7, object()])
def test_odd_box_counts_never_raise(num_boxes):
    result = parse_answer("<ground>a</ground><objects><obj0><obj1><obj2></objects>", num_boxes)
    assert isinstance(result, list)


@pytest.mark.parametrize("text", [None, 123, 4.5, ["<ground>a</ground>"], object()])
def test_non_text_input_gives_nothing(text):
    assert parse_answer(text, 5) == []


def test_bytes_are_decoded():
    assert parse_answer(b"<ground>a</ground><objects><obj0></objects>\xff", 1) == [Grounding("a", [0])]


def _random_text(rng: random.Random) -> str:
    pieces = [
        "<ground>",
        "</ground>",
        "<objects>",
        "</objects>",
        "<obj",
        ">",
        "<",
        "/",
        " ",
        "\n",
        "\x00",
        "猫",
        "\ud800",
    ]
    out = []
    for _ in range(rng.randint(0, 40)):
        kind = rng.random()
        if kind < 0.4:
            out.append(rng.choice(pieces))
        elif kind < 0.7:
            out.append(f"<obj{rng.randint(0, 150)}>")
        else:
            out.append("".join(rng.choice(string.printable) for _ in range(rng.randint(1, 6))))
    return "".join(out)


def test_random_strings_never_raise_and_respect_the_box_count():
    rng = random.Random(1234)
    for _ in range(3000):
        text = _random_text(rng)
        num_boxes = rng.randint(0, 120)
        result = parse_answer(text, num_boxes)
        for grounding in result:
            assert isinstance(grounding.phrase, str)
            assert grounding.phrase or grounding.indices
            assert len(set(grounding.indices)) == len(grounding.indices)
            assert all(0 <= i < num_boxes for i in grounding.indices)


def test_format_then_parse_is_identity_for_well_formed_groundings():
    rng = random.Random(99)
    words = ["cat", "red ball", "a man in a hat", "tree", "two cups"]
    for _ in range(500):
        num_boxes = rng.randint(1, 100)
        groundings = [
            Grounding(rng.choice(words), rng.sample(range(num_boxes), rng.randint(0, min(num_boxes, 6))))
            for _ in range(rng.randint(0, 5))
        ]
        for sep in ("", " ", "\n"):
            assert parse_answer(format_answer(groundings, sep=sep), num_boxes) == groundings


def test_indices_to_boxes_skips_out_of_range():
    boxes = [[0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]]
    assert indices_to_boxes([1, 5, 0, -1], boxes) == [[0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 1.0, 1.0]]
    assert indices_to_boxes([0], np.asarray(boxes)) == [[0.0, 0.0, 1.0, 1.0]]
    assert indices_to_boxes(np.array([1]), torch.tensor(boxes))[0] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert indices_to_boxes([], boxes) == []
