"""The tiny stand-ins are saved in the formats of the real checkpoints the configs name (docs/models.md):
the fields the stages depend on have the real values, so a test passing on a stand-in means something for
the real run (a format the code cannot load fails here, not on the first GPU day)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scaffold.tiny_models import QWEN_SPECIALS, ensure_tiny_model

pytestmark = pytest.mark.timeout(300)


def _json(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


def test_qwen2_vl_matches_qwen2_vl_7b_instruct() -> None:
    from transformers import AutoProcessor

    folder = ensure_tiny_model("qwen2-vl")
    config = _json(folder, "config.json")
    assert config["model_type"] == "qwen2_vl"
    assert config["architectures"] == ["Qwen2VLForConditionalGeneration"]
    processor = AutoProcessor.from_pretrained(folder)
    tokenizer = processor.tokenizer
    assert type(processor).__name__ == "Qwen2VLProcessor"
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    assert _json(folder, "tokenizer_config.json")["tokenizer_class"] == "Qwen2Tokenizer"
    ids = [tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS]
    assert ids == list(range(ids[0], ids[0] + 14)) and ids[-1] == len(tokenizer) - 1  # real order, top ids
    for token in ("<|box_start|>", "<|box_end|>", "<|object_ref_start|>", "<|quad_start|>", "<|vision_pad|>"):
        assert len(tokenizer(f"a{token}b", add_special_tokens=False).input_ids) == 3, token  # never split
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.padding_side == "left"
    assert config["image_token_id"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config["vision_start_token_id"] == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    image = processor.image_processor
    assert image.size == {"shortest_edge": 3136, "longest_edge": 12845056}  # min_pixels, max_pixels
    assert (image.patch_size, image.merge_size, image.temporal_patch_size) == (14, 2, 2)
    assert (
        tokenizer("(12,300)", add_special_tokens=False).input_ids
        == tokenizer("(1", add_special_tokens=False).input_ids
        + tokenizer("2,300)", add_special_tokens=False).input_ids
    )  # digits split one by one


def test_qwen2_lm_matches_qwen2_5_7b_instruct() -> None:
    from transformers import AutoTokenizer

    folder = ensure_tiny_model("qwen2-lm")
    config = _json(folder, "config.json")
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert config["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_grounding_dino_has_bert_uncased_ids_and_phrase_masks() -> None:
    """transformers separates phrases at ids 101/102/1012/1029: each phrase attends only to itself."""
    import torch
    from transformers import AutoProcessor
    from transformers.models.grounding_dino.modeling_grounding_dino import (
        SPECIAL_TOKENS,
        generate_masks_with_special_tokens_and_transfer_map,
    )

    folder = ensure_tiny_model("grounding-dino")
    assert _json(folder, "config.json")["model_type"] == "grounding-dino"
    tokenizer = AutoProcessor.from_pretrained(folder).tokenizer
    assert type(tokenizer).__name__ in ("BertTokenizer", "BertTokenizerFast")
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [
        0,
        100,
        101,
        102,
        103,
    ]
    assert tokenizer.convert_tokens_to_ids(".") == 1012 and tokenizer.convert_tokens_to_ids("?") == 1029
    assert tokenizer.do_lower_case
    ids = tokenizer("red ball. blue square.", return_tensors="pt").input_ids
    assert SPECIAL_TOKENS == [101, 102, 1012, 1029]  # what transformers splits at
    mask, positions = generate_masks_with_special_tokens_and_transfer_map(ids, torch.tensor(SPECIAL_TOKENS))
    tokens = tokenizer.convert_ids_to_tokens(ids[0])
    red, blue = tokens.index("red"), tokens.index("blue")
    assert mask[0, red, red + 1] and not mask[0, red, blue]  # "red" sees "ball", not "blue"
    assert positions[0, blue] == 0 and positions[0, red] == 0  # positions restart per phrase
    assert torch.equal(mask[0], mask[0].T)


def test_siglip_uses_the_sentencepiece_tokenizer() -> None:
    from transformers import AutoProcessor

    folder = ensure_tiny_model("siglip")
    assert _json(folder, "config.json")["model_type"] == "siglip"
    assert (folder / "spiece.model").exists()
    tokenizer = AutoProcessor.from_pretrained(folder).tokenizer
    assert type(tokenizer).__name__ == "SiglipTokenizer"
    assert tokenizer.model_max_length == 64
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.unk_token) == ("</s>", "</s>", "<unk>")
    assert tokenizer.eos_token_id == 1


def test_sentencepiece_training_is_deterministic() -> None:
    from scaffold.tiny_models import _sentencepiece_model

    assert _sentencepiece_model() == _sentencepiece_model()


def test_sam2_is_saved_as_the_video_model_and_loads_for_images() -> None:
    from transformers import AutoModelForMaskGeneration, AutoProcessor

    folder = ensure_tiny_model("sam2")
    config = _json(folder, "config.json")
    assert config["model_type"] == "sam2_video" and config["architectures"] == ["Sam2VideoModel"]
    assert type(AutoProcessor.from_pretrained(folder)).__name__ == "Sam2VideoProcessor"
    assert type(AutoModelForMaskGeneration.from_pretrained(folder)).__name__ == "Sam2Model"
