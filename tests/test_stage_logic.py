"""Pure logic of the model stages: region prompts, crops, grounded caption, proposals, masks, dedupe."""

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from engine.config import ModelRef
from engine.dedupe import KeyRegistry
from stages.filter import context_crop, grounded_caption
from stages.proposals import ProposalsConfig, select_proposals
from stages.region_caption import format_box, outline
from stages.segment import clip_to_box, encode_rle


def test_box_formats_for_prompts():
    box = [50.0, 25.0, 150.0, 75.0]
    assert format_box(box, 200, 100, "qwen2vl", (200, 100)) == "<|box_start|>(250,250),(750,750)<|box_end|>"
    assert format_box(box, 200, 100, "pixels", (100, 50)) == "[25, 12, 75, 38]"
    assert format_box(box, 200, 100, "relative", (200, 100)) == "[0.250, 0.250, 0.750, 0.750]"


def test_outline_marks_the_box_on_a_downscaled_copy():
    image = Image.new("RGB", (100, 50), "white")
    marked = outline(image, [20.0, 10.0, 60.0, 30.0], 200, 100, "red", 0.0)
    assert image.getpixel((10, 5)) == (255, 255, 255)  # the original is untouched
    assert marked.getpixel((10, 5)) == (255, 0, 0) and marked.getpixel((20, 10)) == (255, 255, 255)


def test_context_crop_grows_and_clips():
    image = Image.new("RGB", (100, 100))
    assert context_crop(image, [10, 10, 30, 50], 0.5).size == (40, 70)  # 0..40 x 0..70
    assert context_crop(image, [0, 0, 100, 100], 0.5).size == (100, 100)


def test_grounded_caption_links_phrases_to_surviving_regions():
    record = {
        "caption": {"text": "A red ball and a box."},
        "phrases": [{"text": "red ball", "start": 2, "end": 10}, {"text": "box", "start": 17, "end": 20}],
        "regions": [{"id": 4, "phrase": 0}, {"id": 1, "phrase": 0}],
    }
    assert grounded_caption(record) == {
        "text": "A red ball and a box.",
        "spans": [{"start": 2, "end": 10, "phrase": 0, "regions": [1, 4]}],
    }


def test_proposals_threshold_clip_nms_and_cap():
    cfg = ProposalsConfig(
        model=ModelRef(name="x"), score_threshold=0.2, nms_iou=0.5, max_proposals=2, min_side=2
    )
    boxes = torch.tensor(
        [[-5, -5, 50, 50], [0, 0, 52, 50], [60, 60, 90, 95], [10, 10, 11, 40], [70, 0, 99, 20]]
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95, 0.1])
    kept = select_proposals(scores, boxes.float(), 100, 90, cfg)
    assert [p["score"] for p in kept] == [0.9, 0.7]  # overlap suppressed, thin box and low score dropped
    assert kept[0]["box"] == [0.0, 0.0, 50.0, 50.0] and kept[1]["box"][3] == 90.0


def test_masks_are_cleared_outside_the_grown_box_and_encode_to_rle():
    mask = np.ones((40, 60), dtype=bool)
    clipped = clip_to_box(mask, [10, 10, 30, 20], 0.5)
    ys, xs = np.nonzero(clipped)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (0, 39, 5, 24)
    rle = encode_rle(clipped)
    assert rle["size"] == [40, 60] and isinstance(rle["counts"], str)
    decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    assert np.array_equal(decoded.astype(bool), clipped)


def test_key_registry_keeps_the_first_owner_and_is_idempotent():
    registry = KeyRegistry({"k0": "/old.jpg"})
    assert registry.claim([("k1", "/a.jpg"), ("k1", "/b.jpg"), ("k0", "/c.jpg")]) == [
        None,
        "/a.jpg",
        "/old.jpg",
    ]
    assert registry.claim([("k1", "/a.jpg")]) == [None]  # a retried block claims its own key again
