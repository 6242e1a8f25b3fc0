"""ChatRex model core on the tiny build: loss masking, learning, save/load, stages, processor edge cases."""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from chatrex.configuration import ChatRexConfig  # noqa: E402
from chatrex.modeling import ChatRexForConditionalGeneration  # noqa: E402
from chatrex.parsing import Grounding  # noqa: E402
from chatrex.processor import IMAGE_TOKEN, OBJECT_TOKEN, ChatRexProcessor  # noqa: E402
from scaffold.tiny_chatrex import TINY_NAME, build_tiny_chatrex, ensure_tiny_chatrex, resolve_chatrex  # noqa: E402

pytestmark = pytest.mark.timeout(300)

QUESTIONS = ["find the red ball", "where is the cat", "describe the image", "find all people"]
ANSWERS = [
    "<ground>red ball</ground><objects><obj1></objects>",
    "<ground>cat</ground><objects><obj0><obj4></objects>",
    "a dog on the grass",
    "<ground>person</ground><objects><obj2><obj5><obj7></objects>",
]


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(1)  # tiny matrices: more threads only add contention on a shared 2-core box


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rexverse-cache") / "tiny-models"


@pytest.fixture(scope="module")
def folder(cache: Path) -> Path:
    return ensure_tiny_chatrex(cache)


@pytest.fixture(scope="module")
def processor(folder: Path) -> ChatRexProcessor:
    return ChatRexProcessor.from_pretrained(folder)


def _model(folder: Path) -> ChatRexForConditionalGeneration:
    return ChatRexForConditionalGeneration.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)) for _ in range(4)]


@pytest.fixture(scope="module")
def boxes() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    out = []
    for count in (3, 5, 0, 8):
        corner = rng.uniform(0, 100, (count, 2))
        out.append(np.concatenate([corner, corner + rng.uniform(5, 60, (count, 2))], axis=1))
    return out


# ------------------------------------------------------------------------------------------- the tiny build


def test_tiny_build_is_small_deterministic_and_resolvable(folder, cache, tmp_path, monkeypatch):
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 10_000_000, f"tiny ChatRex is {size} bytes"
    again = build_tiny_chatrex(tmp_path / "again", cache)
    digest = [hashlib.sha256((f / "model.safetensors").read_bytes()).hexdigest() for f in (folder, again)]
    assert digest[0] == digest[1]
    assert ensure_tiny_chatrex(cache) == folder  # cached: no second build
    monkeypatch.setenv("REXVERSE_CACHE", str(cache.parent))
    assert resolve_chatrex(TINY_NAME) == str(folder)
    assert resolve_chatrex("some/hub-id") == "some/hub-id"
    assert not list(cache.glob(".*.tmp"))  # no leftover temporary build folders


def test_new_tokens_and_projected_features_look_like_the_llms_embeddings(folder, processor, images, boxes):
    """Index rows start distinct, and image/object tokens start at the scale of the LLM's word embeddings."""
    model = _model(folder)
    config = model.config
    rows = model.get_input_embeddings().weight.detach()
    old = rows[: config.new_token_start_id]
    start = config.object_index_start_id
    index_rows = rows[start : start + config.num_object_tokens]
    cosine = torch.nn.functional.cosine_similarity(index_rows[:, None], index_rows[None], dim=-1)
    assert float((cosine - torch.eye(len(index_rows))).max()) < 0.9  # was ~1.0 with rows at the mean
    batch = processor(images[:2], boxes[:2], ["q", "q"])
    with torch.no_grad():
        image_tokens, maps = model.get_image_features(batch["pixel_values_low"], batch["pixel_values_high"])
        object_tokens = model.object_encoder(maps, batch["boxes"], config.high_res_size)
    word_norm = float(old.norm(dim=-1).mean())
    for tokens in (image_tokens.flatten(0, 1), object_tokens):
        ratio = float(tokens.norm(dim=-1).mean()) / word_norm
        assert 0.5 < ratio < 2.0, ratio


def test_config_refuses_encoders_with_different_grids(folder):
    config = ChatRexConfig.from_pretrained(folder)
    config.validate_layout()
    config.high_res_size = 96
    with pytest.raises(ValueError, match="choose high_res_size = 128"):
        config.validate_layout()


# --------------------------------------------------------------------------------------------- processor


def test_prompt_layout_is_the_documented_one(processor, images):
    batch = processor(images[0], [[0, 0, 10, 10], [5, 5, 50, 50]], "find the cat", "<ground>cat</ground>")
    text = processor.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=False)
    expected_prompt = (
        "<|im_start|>user\n"
        + IMAGE_TOKEN * processor.num_image_tokens
        + f"\n<obj0>{OBJECT_TOKEN}<obj1>{OBJECT_TOKEN}\nfind the cat<|im_end|>\n<|im_start|>assistant\n"
    )
    assert text == expected_prompt + "<ground>cat</ground><|im_end|>\n"
    labels = batch["labels"][0]
    labelled = processor.tokenizer.decode(labels[labels != -100], skip_special_tokens=False)
    assert labelled == "<ground>cat</ground><|im_end|>"
    # inference prompt = the training prompt without the answer
    prompt = processor(images[0], [[0, 0, 10, 10], [5, 5, 50, 50]], "find the cat")
    assert "labels" not in prompt
    assert processor.tokenizer.decode(prompt["input_ids"][0], skip_special_tokens=False) == expected_prompt


def test_processor_handles_zero_many_and_outside_boxes(processor, images):
    n = processor.num_object_tokens
    tok = processor.tokenizer
    none = processor.encode(images[0], None, "q")
    empty = processor.encode(images[0], np.zeros((0, 4)), "q")
    assert none["boxes"].shape == empty["boxes"].shape == (0, 4)
    assert (none["input_ids"] == tok.convert_tokens_to_ids(OBJECT_TOKEN)).sum() == 0

    many = np.tile([[1.0, 2.0, 30.0, 40.0]], (n + 25, 1))
    many[:, 0] = np.arange(n + 25)  # tell the boxes apart: box i starts at x = i
    many[:, 2] = many[:, 0] + 20
    sample = processor.encode(images[0], many, "q")
    assert sample["boxes"].shape == (n, 4)
    np.testing.assert_allclose(sample["boxes"][:, 0] * 160, np.arange(n), atol=1e-4)  # first N, in order
    tokens = tok.convert_ids_to_tokens(sample["input_ids"].tolist())
    index_tokens = [t for t in tokens if t.startswith("<obj") and t != "<objects>"]
    assert index_tokens == [f"<obj{i}>" for i in range(n)]
    assert tokens.count(OBJECT_TOKEN) == n

    outside = processor.encode(images[0], [[-50, -10, 500, 60], [170, 130, 200, 300], [90, 80, 10, 5]], "q")
    np.testing.assert_allclose(
        outside["boxes"],
        [[0, 0, 1, 0.5], [1, 1, 1, 1], [10 / 160, 5 / 120, 90 / 160, 80 / 120]],
        atol=1e-6,
    )
    nan = processor.encode(images[0], [[np.nan, 0, np.inf, 10]], "q")
    assert np.isfinite(nan["boxes"]).all()
    with pytest.raises(ValueError, match="shape"):
        processor.encode(images[0], [[1, 2, 3]], "q")


def test_processor_images_any_mode_and_padding(processor):
    gray = np.zeros((30, 50), dtype=np.uint8)
    rgba = Image.new("RGBA", (40, 20))
    batch = processor([gray, rgba], [None, [[0, 0, 5, 5]]], ["a", "a longer question here"])
    assert batch["pixel_values_low"].shape == (2, 3, processor.low_res_size, processor.low_res_size)
    assert batch["pixel_values_high"].shape == (2, 3, processor.high_res_size, processor.high_res_size)
    assert batch["attention_mask"][:, -1].all()  # no answers: left padding for generation
    train = processor([gray, rgba], [None, [[0, 0, 5, 5]]], ["a", "b c d e"], ["x", "y"])
    assert train["attention_mask"][:, 0].all()  # answers: right padding for training


def test_processor_round_trip(processor, images, boxes, tmp_path):
    processor.save_pretrained(tmp_path)
    again = ChatRexProcessor.from_pretrained(tmp_path)
    assert again.to_dict() == processor.to_dict()
    a = processor(images, boxes, QUESTIONS, ANSWERS)
    b = again(images, boxes, QUESTIONS, ANSWERS)
    for key in ("input_ids", "attention_mask", "labels", "pixel_values_low", "pixel_values_high"):
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------------------------- the model


def test_loss_counts_answer_tokens_only(folder, processor, images, boxes):
    model = _model(folder)
    batch = processor(images, boxes, QUESTIONS, ANSWERS)
    out = model(**batch)
    assert torch.isfinite(out.loss)

    # The loss is the mean cross entropy over labelled (answer) positions ...
    labels = batch["labels"]
    logits, targets = out.logits[:, :-1], labels[:, 1:]
    keep = targets != -100
    manual = torch.nn.functional.cross_entropy(logits[keep].float(), targets[keep])
    assert torch.allclose(out.loss, manual, atol=1e-5)

    # ... so its gradient reaches the logits of answer positions and no others.
    (grad,) = torch.autograd.grad(out.loss, out.logits)
    touched = grad[:, :-1].abs().sum(-1) > 0
    assert torch.equal(touched, keep)
    assert grad[:, -1].abs().sum() == 0

    # Changing a target inside the answer changes the loss; prompt positions are never targets.
    changed = labels.clone()
    row, col = torch.nonzero(labels != -100)[0].tolist()
    ranked = out.logits[row, col - 1].argsort(descending=True)
    changed[row, col] = ranked[0] if ranked[0] != labels[row, col] else ranked[1]
    assert not torch.allclose(model(**{**batch, "labels": changed}).loss, out.loss)


def test_left_and_right_padding_agree(folder, processor, images, boxes):
    model = _model(folder)
    with torch.no_grad():
        right = model(**processor(images, boxes, QUESTIONS, ANSWERS, padding_side="right")).loss
        left = model(**processor(images, boxes, QUESTIONS, ANSWERS, padding_side="left")).loss
    assert torch.allclose(right, left, atol=1e-5)


def test_overfits_one_batch(folder, processor, images, boxes):
    torch.manual_seed(0)
    model = _model(folder).train()
    model.set_trainable("perception")
    batch = processor(images, boxes, QUESTIONS, ANSWERS)
    optimizer = torch.optim.AdamW(model.optimizer_param_groups(weight_decay=0.0), lr=5e-3)
    losses = []
    for _ in range(25):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_save_load_round_trip_gives_identical_logits_and_generations(
    folder, processor, images, boxes, tmp_path
):
    model = _model(folder)
    model.save_pretrained(tmp_path)
    loaded = ChatRexForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = processor(images, boxes, QUESTIONS, ANSWERS)
    prompts = processor(images, boxes, QUESTIONS)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    first = model.generate(**prompts, max_new_tokens=8)
    second = loaded.generate(**prompts, max_new_tokens=8)
    assert first.shape == (4, 8)
    assert torch.equal(first, second)


def test_batched_generation_matches_one_by_one(folder, processor, images, boxes):
    model = _model(folder)
    batched = model.generate(**processor(images, boxes, QUESTIONS), max_new_tokens=6)
    for i in range(len(images)):
        single = model.generate(**processor(images[i], boxes[i], QUESTIONS[i]), max_new_tokens=6)
        assert torch.equal(batched[i], single[0])
    with pytest.raises(ValueError, match="left padding"):
        model.generate(**processor(images, boxes, QUESTIONS, padding_side="right"), max_new_tokens=2)


def test_generated_ids_decode_and_parse(processor):
    ids = processor.tokenizer(ANSWERS[3] + "<|im_end|>", add_special_tokens=False).input_ids
    pad = processor.pad_token_id
    groundings = processor.post_process_generation(torch.tensor([ids + [pad, pad], ids + [pad, pad]]), [8, 3])
    assert groundings == [[Grounding("person", [2, 5, 7])], [Grounding("person", [2])]]


def test_alignment_stage_trains_projectors_and_new_rows_only(folder, processor, images, boxes):
    model = _model(folder).train()
    model.set_trainable("alignment")
    batch = processor(images, boxes, QUESTIONS, ANSWERS)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.optimizer_param_groups(weight_decay=0.1), lr=1e-2)
    model(**batch).loss.backward()
    optimizer.step()

    start = model.config.new_token_start_id
    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p)}
    row_weights = {"language_model.model.embed_tokens.weight", "language_model.lm_head.weight"}
    projectors = {n for n in before if n.startswith(("vision_projector.", "object_encoder.projector."))}
    assert changed == projectors | row_weights
    for name in row_weights:
        now = dict(model.named_parameters())[name]
        assert torch.equal(now[:start], before[name][:start]), f"old rows of {name} moved"
    embed = dict(model.named_parameters())["language_model.model.embed_tokens.weight"]
    used = torch.unique(batch["input_ids"][batch["input_ids"] >= start])
    assert not torch.equal(embed[used], before["language_model.model.embed_tokens.weight"][used])

    for stage in ("perception", "joint"):  # the paper trains vision, projectors and LLM in stages 2 and 3
        model.set_trainable(stage)
        assert all(p.requires_grad for p in model.parameters())
        model.set_trainable(stage, train_vision=False)
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        assert not any(n.startswith(("vision_tower.", "high_res_encoder.")) for n in trainable)
        assert any(n.startswith("language_model.model.layers.") for n in trainable)
    model.set_trainable("alignment", train_vision=True)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("high_res_encoder.") for n in trainable)
    assert not any(n.startswith("language_model.model.layers.") for n in trainable)
    with pytest.raises(ValueError, match="unknown training stage"):
        model.set_trainable("pretrain")


def test_batch_without_boxes_and_with_n_boxes(folder, processor, images):
    model = _model(folder).train()
    model.set_trainable("perception")
    batch = processor(images[:2], [None, None], ["describe", "describe"], ["a cat", "a dog"])
    model(**batch).loss.backward()
    grads = [p.grad for p in model.object_encoder.parameters()]
    assert all(g is not None and g.abs().sum() == 0 for g in grads)  # in the graph, weighted zero
    n = processor.num_object_tokens
    full = processor(images[0], [[i, i, i + 20, i + 30] for i in range(n)], "find", "<ground>x</ground>")
    assert len(full["boxes"][0]) == n
    assert torch.isfinite(model(**full).loss)


def test_mismatched_placeholders_are_refused(folder, processor, images, boxes):
    model = _model(folder)
    batch = processor(images, boxes, QUESTIONS)
    with pytest.raises(ValueError, match="placeholders"):
        model(**{**batch, "boxes": [b[:1] for b in batch["boxes"]]})
    with pytest.raises(ValueError, match="pixel_values"):
        model(**{**batch, "pixel_values_low": None})


def test_siglip_tower_and_tied_llm_round_trip(cache, tmp_path):
    """Another vision tower (no CLS token) and an LLM with tied embeddings, as Qwen2-0.5B/1.5B have."""
    from transformers import (
        AutoTokenizer,
        ConvNextConfig,
        ConvNextModel,
        Qwen2Config,
        Qwen2ForCausalLM,
        SiglipVisionModel,
    )

    from scaffold.tiny_models import ensure_tiny_model

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_model("qwen2-lm", cache))
    llm = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tokenizer) + 10,  # spare rows, as real Qwen2 checkpoints carry
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=True,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    hf_logging.set_verbosity_error()  # the factory folder is a whole SigLIP: its text tower goes unused
    vision = SiglipVisionModel.from_pretrained(ensure_tiny_model("siglip", cache))
    hf_logging.set_verbosity_warning()
    convnext = ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1]))
    model = ChatRexForConditionalGeneration.from_parts(
        vision,
        convnext,
        llm,
        tokenizer,
        num_object_tokens=20,
        low_res_size=64,
        high_res_size=128,
        roi_stages=[2, 4],
        roi_output_size=2,
        box_embed_dim=16,
    ).eval()
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    processor = ChatRexProcessor.from_model_config(tokenizer, model.config, low_res_mean=(0.5,) * 3)
    image = Image.new("RGB", (80, 60), (200, 10, 10))
    batch = processor([image, image], [[[1, 1, 30, 30]], []], ["one", "two"], ["<ground>x</ground>", "no"])
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = ChatRexForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.get_input_embeddings().weight is loaded.get_output_embeddings().weight
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    assert ChatRexProcessor.from_pretrained(tmp_path).low_res_mean == (0.5, 0.5, 0.5)


def test_flatten_roi_pooling_keeps_the_grid_and_round_trips(tmp_path):
    """roi_pooling='flatten' feeds the RoI grid (C x S x S per stage) to the object projector."""
    import torch

    from chatrex.modeling import ChatRexForConditionalGeneration
    from scaffold.tiny_chatrex import ensure_tiny_chatrex

    model = ChatRexForConditionalGeneration.from_pretrained(ensure_tiny_chatrex())
    config = model.config
    config.roi_pooling = "flatten"
    flat = ChatRexForConditionalGeneration(config).eval()
    channels = sum(config.convnext_config.hidden_sizes[s - 1] for s in config.roi_stages)
    assert (
        flat.object_encoder.projector.norm.normalized_shape[0]
        == channels * config.roi_output_size**2 + config.box_embed_dim
    )
    maps = [torch.randn(1, config.convnext_config.hidden_sizes[s - 1], 8, 8) for s in config.roi_stages]
    features = flat.object_encoder(maps, [torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.2, 0.3, 0.9, 0.8]])], 128)
    assert features.shape == (2, config.text_config.hidden_size)
    flat.save_pretrained(tmp_path)
    again = ChatRexForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert again.config.roi_pooling == "flatten"
    assert torch.equal(
        again.object_encoder(maps, [torch.tensor([[0.1, 0.1, 0.5, 0.5]])], 128),
        flat.object_encoder(maps, [torch.tensor([[0.1, 0.1, 0.5, 0.5]])], 128),
    )


def test_question_first_layout_round_trips_and_follows_the_model_config(folder, processor, images, tmp_path):
    """`question_first` puts the question before the object tokens; it travels with the model config."""
    config = _model(folder).config
    config.question_first = True
    first = ChatRexProcessor.from_model_config(processor.tokenizer, config)
    assert first.question_first
    prompt = first(images[0], [[0, 0, 10, 10], [5, 5, 50, 50]], "find the cat")
    text = first.tokenizer.decode(prompt["input_ids"][0], skip_special_tokens=False)
    assert text == (
        "<|im_start|>user\n"
        + IMAGE_TOKEN * first.num_image_tokens
        + f"\nfind the cat\n<obj0>{OBJECT_TOKEN}<obj1>{OBJECT_TOKEN}<|im_end|>\n<|im_start|>assistant\n"
    )
    no_boxes = first.tokenizer.decode(first(images[0], None, "describe")["input_ids"][0])
    assert no_boxes.endswith("\ndescribe<|im_end|>\n<|im_start|>assistant\n")
    first.save_pretrained(tmp_path)
    assert ChatRexProcessor.from_pretrained(tmp_path).question_first
    assert not processor.question_first  # the paper's layout stays the default


def test_index_tagged_object_tokens_add_their_index_embedding(folder, processor, images, boxes):
    """With `index_tagged_objects` each <roi> input = object feature + the embedding of its <objN> token;
    every other position is unchanged, and a <roi> without an index token before it is refused."""
    plain = _model(folder)
    config = copy.deepcopy(plain.config)
    config.index_tagged_objects = True
    tagged = ChatRexForConditionalGeneration(config).eval()
    tagged.load_state_dict(plain.state_dict())
    batch = processor(images[:2], boxes[:2], QUESTIONS[:2])
    inputs = {k: batch[k] for k in ("input_ids", "pixel_values_low", "pixel_values_high", "boxes")}
    with torch.no_grad():
        base = plain.embed_inputs(**inputs)
        with_tags = tagged.embed_inputs(**inputs)
    ids = batch["input_ids"]
    roi = ids == config.object_token_id
    assert int(roi.sum()) == sum(len(b) for b in boxes[:2])
    assert torch.equal(with_tags[~roi], base[~roi])
    index_ids = torch.roll(ids, 1, dims=1)[roi]
    expected_indices = [*range(len(boxes[0])), *range(len(boxes[1]))]
    assert (index_ids - config.object_index_start_id).tolist() == expected_indices
    expected = base[roi] + plain.get_input_embeddings()(index_ids)
    assert torch.allclose(with_tags[roi], expected, atol=1e-6)
    broken = ids.clone()
    first_roi = int(roi[0].nonzero()[0])
    broken[0, first_roi - 1] = processor.pad_token_id
    with pytest.raises(ValueError, match="index token"):
        tagged.index_tags(broken, roi)


def test_assembling_from_parts_keeps_the_layout_settings(cache, tmp_path):
    """`model: parts` training configs reach the model and processor configs (local tiny parts, no hub)."""
    from transformers import ConvNextConfig, ConvNextModel

    from chatrex.build import assemble_from_parts
    from chatrex.train_config import PartsConfig
    from scaffold.tiny_models import ensure_tiny_model

    convnext = tmp_path / "convnext"
    ConvNextModel(
        ConvNextConfig(patch_size=4, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])
    ).save_pretrained(convnext)
    parts = PartsConfig(
        vision=str(ensure_tiny_model("clip", cache)),
        convnext=str(convnext),
        llm=str(ensure_tiny_model("qwen2-lm", cache)),
        num_object_tokens=8,
        low_res_size=64,
        high_res_size=128,
        question_first=True,
        index_tagged_objects=True,
    )
    out = assemble_from_parts(parts, tmp_path / "model")
    model = ChatRexForConditionalGeneration.from_pretrained(out)
    assert model.config.question_first and model.config.index_tagged_objects
    assert ChatRexProcessor.from_pretrained(out).question_first
