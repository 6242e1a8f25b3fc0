"""Box -> phrase association, thresholds, per-phrase NMS and caps, on hand-made detector outputs."""

import torch

from engine.config import ModelRef
from stages.grounding import GroundingConfig, build_prompt, phrase_token_indices, select_boxes


def cfg(**kw):
    return GroundingConfig(model=ModelRef(name="x"), **kw)


def test_prompt_spans_and_token_positions():
    prompt, spans = build_prompt(["Red ball", "dog"])
    assert prompt == "red ball. dog."
    assert [prompt[a:b] for a, b in spans] == ["red ball", "dog"]
    # offsets as a BERT tokenizer gives them: [CLS], red, ball, ., dog, ., [SEP]
    offsets = [(0, 0), (0, 3), (4, 8), (8, 9), (10, 13), (13, 14), (0, 0)]
    assert phrase_token_indices(offsets, spans) == [[1, 2], [4]]


def boxes(*cxcywh):
    return torch.tensor(cxcywh, dtype=torch.float32)


def test_each_box_goes_to_its_best_phrase_and_is_scaled_and_clipped():
    probs = torch.zeros(3, 8)
    probs[0, [1, 2]] = torch.tensor([0.9, 0.8])  # query 0 -> phrase 0 ("red ball")
    probs[1, 4] = 0.7  # query 1 -> phrase 1
    probs[2, 1] = 0.1  # below threshold
    pred = boxes([0.5, 0.5, 0.2, 0.2], [0.95, 0.5, 0.2, 0.4], [0.5, 0.5, 0.1, 0.1])
    regions = select_boxes(probs, pred, [[1, 2], [4]], 200, 100, cfg(box_threshold=0.3, text_threshold=0.2))
    assert [(r["phrase"], r["score"]) for r in regions] == [(0, 0.9), (1, 0.7)]
    assert regions[0]["box"] == [80.0, 40.0, 120.0, 60.0]
    assert regions[1]["box"] == [170.0, 30.0, 200.0, 70.0]  # clipped at the right edge


def test_text_threshold_uses_the_mean_over_the_phrase_tokens():
    probs = torch.zeros(1, 8)
    probs[0, [1, 2, 3]] = torch.tensor([0.9, 0.0, 0.0])  # one word of a three-word phrase
    pred = boxes([0.5, 0.5, 0.2, 0.2])
    assert select_boxes(probs, pred, [[1, 2, 3]], 100, 100, cfg(box_threshold=0.3, text_threshold=0.35)) == []
    assert (
        len(select_boxes(probs, pred, [[1, 2, 3]], 100, 100, cfg(box_threshold=0.3, text_threshold=0.25)))
        == 1
    )


def test_nms_is_per_phrase_and_caps_apply():
    probs = torch.zeros(4, 8)
    probs[:, 1] = torch.tensor([0.9, 0.8, 0.0, 0.0])  # two overlapping boxes of phrase 0
    probs[:, 4] = torch.tensor([0.0, 0.0, 0.85, 0.6])  # phrase 1: same place as phrase 0, plus another
    pred = boxes([0.5, 0.5, 0.4, 0.4], [0.51, 0.5, 0.4, 0.4], [0.5, 0.5, 0.4, 0.4], [0.2, 0.2, 0.1, 0.1])
    regions = select_boxes(
        probs, pred, [[1], [4]], 100, 100, cfg(box_threshold=0.3, text_threshold=0.0, nms_iou=0.5)
    )
    assert [(r["phrase"], r["score"]) for r in regions] == [(0, 0.9), (1, 0.85), (1, 0.6)]
    capped = select_boxes(
        probs, pred, [[1], [4]], 100, 100, cfg(box_threshold=0.3, text_threshold=0.0, max_boxes_per_phrase=1)
    )
    assert [r["phrase"] for r in capped] == [0, 1]
    top = select_boxes(
        probs, pred, [[1], [4]], 100, 100, cfg(box_threshold=0.3, text_threshold=0.0, max_boxes=2)
    )
    assert len(top) == 2


def test_phrases_without_tokens_are_ignored():
    probs = torch.ones(1, 4)
    assert select_boxes(probs, boxes([0.5, 0.5, 0.2, 0.2]), [[]], 10, 10, cfg()) == []
