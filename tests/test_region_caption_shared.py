"""Region captions with a shared prefix: one image encoding and one prefill per image give exactly the
tokens that each region's full prompt gives alone (tiny Qwen2-VL, float32, the fixture's images and boxes);
the box format follows the loaded model's family; the stage runs in bfloat16."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import FIXTURE, FIXTURE_CONFIG

from engine.items import Item
from pipelines.rexverse2m import load_job_config
from stages import shared_prefix
from stages.region_caption import RegionCaption, format_box

pytestmark = pytest.mark.timeout(600)
N_IMAGES = 6


def fixture_items(n: int = N_IMAGES) -> list[Item]:
    """The first `n` fixture scenes with their ground-truth boxes as regions and attribute phrases."""
    coco = json.loads((FIXTURE / "annotations.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    items = []
    for image in [i for i in coco["images"] if i["file_name"].startswith("scene_")][:n]:
        anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        phrases, regions = [], []
        for k, ann in enumerate(anns):
            attrs = ann.get("attributes", {})
            text = " ".join(
                [attrs.get("size", ""), attrs.get("color", ""), names[ann["category_id"]]]
            ).split()
            phrases.append({"text": " ".join(text), "start": 0, "end": 0})
            x, y, w, h = ann["bbox"]
            regions.append({"id": k, "box": [x, y, x + w, y + h], "score": 0.5, "phrase": k, "scores": {}})
        record = {"width": image["width"], "height": image["height"], "phrases": phrases, "regions": regions}
        data = (FIXTURE / image["file_name"]).read_bytes()
        items.append(Item(key=str(image["id"]), uri=image["file_name"], image=data, record=record))
    return items


def stage_cfg(**overrides):
    cfg = load_job_config(FIXTURE_CONFIG).stages.region_caption
    return cfg.model_copy(update=overrides)


@pytest.fixture(scope="module")
def stage() -> RegionCaption:
    return RegionCaption(stage_cfg())


def alone(stage: RegionCaption, items: list[Item]) -> list[list[str]]:
    """Each region's full prompt through `generate` on its own (batch of one): the reference answers."""
    from engine.images import load_rgb

    answers = []
    for item in items:
        image = load_rgb(item.image, stage.cfg.max_image_side)
        answers.append([stage.vlm.generate([image], [p])[0] for p in stage.prompts(item, image)])
    return answers


def described(items: list[Item]) -> list[list[str | None]]:
    return [[r["description"] for r in item.record["regions"]] for item in items]


def test_shared_prefix_gives_the_tokens_of_each_full_prompt_alone(stage):
    items = fixture_items()
    assert sum(len(i.record["regions"]) for i in items) >= 2 * len(items)  # something to share
    reference = alone(stage, items)
    # answers differ by region within an image and across images (the tiny random VLM repeats itself a lot)
    assert any(len(set(answers)) > 1 for answers in reference)
    assert len({a for answers in reference for a in answers}) >= 3
    before = stage.vlm.counts.copy()
    groups = []
    from engine.images import load_rgb

    for item in items:
        image = load_rgb(item.image, stage.cfg.max_image_side)
        groups.append((image, stage.prompts(item, image)))
    assert len({stage.vlm.input_size(image) for image, _ in groups}) > 1  # prefixes of unequal lengths
    for rows_per_call in (3, 16):  # batches that split an image's regions and that span several images
        assert stage.vlm.generate_shared(groups, rows_per_call) == reference
    counts = stage.vlm.counts - before
    assert counts["images_encoded"] == 2 * len(items)  # once per image per call


def test_the_stage_records_the_same_descriptions_both_ways(stage):
    shared, unshared = fixture_items(), fixture_items()
    stage.process(shared)
    RegionCaption.process(_unshared_view(stage), unshared)
    assert described(shared) == described(unshared)
    assert [i.record.keys() for i in shared] == [i.record.keys() for i in unshared]


def _unshared_view(stage: RegionCaption) -> RegionCaption:
    view = copy.copy(stage)
    view.cfg = stage.cfg.model_copy(update={"shared_prefix": False})
    return view


def test_wrong_positions_after_the_cached_image_change_the_answers(stage, monkeypatch):
    """The identity test can fail: continuing the text at the cache length (as if each image token were
    one position) instead of mrope's next position changes the next-token logits (the tiny random VLM's
    greedy words are often the same either way, so the logits are compared, not only the words)."""
    items = fixture_items(3)
    from engine.images import load_rgb

    groups = [(img, stage.prompts(it, img)) for it in items for img in [load_rgb(it.image, 256)]]
    real_forward, real_prefill = shared_prefix._forward, shared_prefix.prefill
    first_logits: list[torch.Tensor] = []

    def recording_forward(*args, **kwargs):
        logits = real_forward(*args, **kwargs)
        first_logits.append(logits.clone())
        return logits

    monkeypatch.setattr(shared_prefix, "_forward", recording_forward)
    right = stage.vlm.generate_shared(groups, 16)
    right_logits, first_logits[:] = first_logits[0], []

    def cache_length_positions(model, input_ids, attention_mask, position_ids, next_positions, **inputs):
        lengths = attention_mask.sum(-1).tolist()  # each image token counted as one position
        return real_prefill(model, input_ids, attention_mask, position_ids, lengths, **inputs)

    monkeypatch.setattr(shared_prefix, "prefill", cache_length_positions)
    stage.vlm.generate_shared(groups, 16)
    assert right == alone(stage, items)
    assert not torch.allclose(first_logits[0], right_logits, atol=1e-4), "positions made no difference"


def test_default_box_format_follows_the_model_family(stage):
    assert stage.box_format == "qwen2vl"  # tiny:qwen2-vl has model_type qwen2_vl: the 0-1000 grid
    item = fixture_items(1)[0]
    from engine.images import load_rgb

    prompt = stage.prompts(item, load_rgb(item.image, 256))[0]
    assert "<|box_start|>(" in prompt and prompt.index("<|box_start|>") > prompt.index(stage.cfg.prompt[:20])


def test_box_formats():
    box = [50.0, 25.0, 150.0, 75.0]
    assert format_box(box, 200, 100, "qwen25vl", (392, 196)) == "[98, 49, 294, 147]"


def test_stops_and_penalties_match_generate(stage):
    """EOS mid-answer (then padding), min_new_tokens and the repetition penalty, as generate applies them."""
    from engine.config import GenerationConfig
    from engine.images import load_rgb

    items = fixture_items(3)
    groups = [(img, stage.prompts(it, img)) for it in items for img in [load_rgb(it.image, 256)]]
    vlm = stage.vlm
    saved = vlm.generation, vlm.eos_ids
    try:
        vlm.generation = GenerationConfig(max_new_tokens=10, min_new_tokens=2, repetition_penalty=1.3)
        first = vlm.processor.tokenizer(vlm.generate([groups[0][0]], [groups[0][1][0]])[0]).input_ids
        vlm.eos_ids = [first[3]]  # a token the first answer emits: that row stops early, others may too
        reference = [[vlm.generate([image], [p])[0] for p in prompts] for image, prompts in groups]
        assert stage.vlm.generate_shared(groups, 16) == reference
        assert any(len(a.split()) < 10 for answers in reference for a in answers)  # some row stopped
    finally:
        vlm.generation, vlm.eos_ids = saved


def test_bfloat16_call_runs():
    """GPU runs are bfloat16: the shared path casts the processor's float32 pixels to the weights' dtype."""
    from engine.config import ModelRef
    from engine.images import load_rgb

    stage = RegionCaption(stage_cfg(model=ModelRef(name="tiny:qwen2-vl", dtype="bfloat16")))
    assert stage.vlm.model.dtype == torch.bfloat16
    items = fixture_items(2)
    stage.process(items)
    assert all(r["description"] for item in items for r in item.record["regions"])
    groups = [(img, stage.prompts(it, img)) for it in items for img in [load_rgb(it.image, 256)]]
    assert stage.vlm.generate([groups[0][0]], groups[0][1][:1])[0]  # the full-prompt path too


@pytest.fixture(scope="module")
def tiny_qwen25_vl(tmp_path_factory):
    """A random Qwen2.5-VL (model_type qwen2_5_vl) with the tiny Qwen2-VL's tokenizer and image processor."""
    from transformers import (
        AutoConfig,
        AutoProcessor,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
    )

    from engine.models import resolve_model

    source = resolve_model("tiny:qwen2-vl")
    processor, config = AutoProcessor.from_pretrained(source), AutoConfig.from_pretrained(source)
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64}
    vision |= {"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56}
    tokens = {k: getattr(config, k) for k in ("image_token_id", "video_token_id")}
    tokens |= {k: getattr(config, k) for k in ("vision_start_token_id", "vision_end_token_id")}
    qwen25 = Qwen2_5_VLConfig(
        text_config=config.text_config.to_dict(),
        vision_config=vision | {"fullatt_block_indexes": [1]},
        tie_word_embeddings=False,
        **tokens,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("qwen25vl")
    Qwen2_5_VLForConditionalGeneration(qwen25).eval().save_pretrained(folder)
    parts = {k: getattr(processor, k) for k in ("image_processor", "tokenizer", "video_processor")}
    Qwen2_5_VLProcessor(**parts, chat_template=processor.chat_template).save_pretrained(folder)
    return folder


def test_qwen25_vl_gets_pixel_boxes_of_its_resized_input_and_shares_its_prefix(tiny_qwen25_vl):
    from engine.config import ModelRef
    from engine.images import load_rgb

    stage = RegionCaption(stage_cfg(model=ModelRef(name=str(tiny_qwen25_vl), dtype="float32")))
    assert stage.box_format == "qwen25vl"
    item = fixture_items(1)[0]
    image = load_rgb(item.image, stage.cfg.max_image_side)
    grid = stage.vlm.processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
    height, width = int(grid[1]) * 14, int(grid[2]) * 14  # the processor's resized input
    assert (width, height) != image.size  # so the test tells the two sizes apart
    x0, y0, x1, y1 = item.record["regions"][0]["box"]
    w, h = item.record["width"], item.record["height"]
    scaled = [round(x0 * width / w), round(y0 * height / h), round(x1 * width / w), round(y1 * height / h)]
    expected = "[" + ", ".join(map(str, scaled)) + "]"
    prompts = stage.prompts(item, image)
    assert expected in prompts[0] and "box_start" not in prompts[0]
    reference = [stage.vlm.generate([image], [p])[0] for p in prompts]
    assert stage.vlm.generate_shared([(image, prompts)], 16) == [reference]
