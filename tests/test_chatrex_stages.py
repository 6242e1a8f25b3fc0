"""The paper's three training stages: their task mixes and parameters, LoRA's token rows, pixel statistics."""

from __future__ import annotations

import os
import random
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from chatrex.modeling import ChatRexForConditionalGeneration  # noqa: E402
from chatrex.processor import CLIP_MEAN, IMAGENET_MEAN, IMAGENET_STD, ChatRexProcessor  # noqa: E402
from chatrex.tasks import IMAGE_CAPTION_QUESTION, STAGE_WEIGHTS, sample_task  # noqa: E402
from chatrex.train_config import StageConfig, TrainConfig  # noqa: E402
from scaffold.tiny_chatrex import ensure_tiny_chatrex  # noqa: E402

pytestmark = pytest.mark.timeout(300)

RECORD = {
    "key": "k",
    "caption": {"text": "a red circle next to a blue square."},
    "regions": [
        {"id": 0, "box": [0, 0, 10, 10], "category": "circle", "short_phrase": "red circle",
         "referring": "the red circle", "description": "A red circle.", "phrase": 0},
        {"id": 1, "box": [20, 20, 30, 30], "category": "square", "short_phrase": "blue square",
         "referring": "the blue square", "description": "A blue square.", "phrase": 1},
    ],
    "grounded_caption": {"spans": [{"start": 2, "end": 12, "regions": [0]}]},
    "proposals": [{"box": [40, 40, 50, 50], "score": 0.3}],
}  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return ensure_tiny_chatrex(tmp_path_factory.mktemp("rexverse-cache") / "tiny-models")


def test_stage_task_mixes_follow_the_paper():
    rng = random.Random(0)
    drawn = [
        sample_task(RECORD, rng, 100, StageConfig(name="alignment", steps=1, lr=1).weights) for _ in range(20)
    ]
    # stage 1: image-caption pairs, no boxes in the prompt
    assert {(len(b.boxes), t.question, t.answer) for b, t in drawn} == {
        (0, IMAGE_CAPTION_QUESTION, RECORD["caption"]["text"])
    }
    perception = {sample_task(RECORD, rng, 100, STAGE_WEIGHTS["perception"])[1].task for _ in range(200)}
    joint = {sample_task(RECORD, rng, 100, STAGE_WEIGHTS["joint"])[1].task for _ in range(300)}
    assert "caption" not in perception and "image_caption" not in perception
    assert {"detect", "phrase", "refer", "count"} <= perception
    assert any(t.startswith("region_") for t in perception)
    assert perception | {"caption"} == joint


def test_stage_config_defaults_and_refusals():
    assert not StageConfig(name="alignment", steps=1, lr=1).vision_trains
    assert StageConfig(name="perception", steps=1, lr=1).vision_trains
    assert not StageConfig(name="joint", steps=1, lr=1, train_vision=False).vision_trains
    with pytest.raises(ValueError):
        StageConfig(name="full", steps=1, lr=1)
    base = {"model": "tiny:chatrex"}
    with pytest.raises(ValueError, match="perception and joint stages only"):
        TrainConfig.model_validate(
            base | {"stages": [{"name": "alignment", "steps": 1, "lr": 1, "lora": True}]}
        )
    with pytest.raises(ValueError, match="unknown tasks"):
        TrainConfig.model_validate(
            base | {"stages": [{"name": "joint", "steps": 1, "lr": 1, "task_weights": {"detection": 1}}]}
        )


def test_lora_still_trains_the_new_token_rows(folder):
    from pipelines.train_chatrex import apply_lora

    torch.manual_seed(0)
    model = ChatRexForConditionalGeneration.from_pretrained(folder).train()
    processor = ChatRexProcessor.from_pretrained(folder)
    cfg = TrainConfig.model_validate(
        {"model": "tiny:chatrex", "stages": [{"name": "perception", "steps": 1, "lr": 1e-2, "lora": True}]}
    )
    model.set_trainable("alignment", train_vision=False)  # what train_loop does for a LoRA stage
    model = apply_lora(model, cfg)
    embed = model.get_input_embeddings().weight
    start, end = model.config.new_token_start_id, model.config.new_token_end_id
    assert embed.requires_grad
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    batch = processor([image], [[[0, 0, 30, 30], [10, 10, 60, 60]]], ["find it"],
                      ["<ground>it</ground><objects><obj1></objects>"])  # fmt: skip
    optimizer = torch.optim.AdamW(model.optimizer_param_groups(), lr=1e-2)
    model(**batch, answer_logits_only=True).loss.backward()  # as train_loop calls it
    optimizer.step()
    params = dict(model.named_parameters())
    changed = {n for n, p in params.items() if not torch.equal(before[n], p)}
    embed_name = next(n for n, p in params.items() if p is embed)
    assert embed_name in changed
    assert torch.equal(embed[:start], before[embed_name][:start])  # old rows stay
    assert not torch.equal(embed[start:end], before[embed_name][start:end])  # new rows train
    assert any("lora_" in n for n in changed)
    assert not any(".layers." in n and "lora_" not in n for n in changed)  # the LLM body stays frozen


def test_each_encoder_gets_its_own_pixel_statistics(folder):
    processor = ChatRexProcessor.from_pretrained(folder)
    assert processor.low_res_mean == pytest.approx(CLIP_MEAN)  # CLIP ViT
    assert processor.high_res_mean == pytest.approx(IMAGENET_MEAN)  # ImageNet ConvNeXt
    assert processor.high_res_std == pytest.approx(IMAGENET_STD)
    image = Image.new("RGB", (32, 32), (124, 116, 104))  # ImageNet mean colour: high-res pixels near 0
    _, high, _ = processor.preprocess_image(image)
    assert np.abs(high).max() < 0.02


def test_laion_clip_convnext_from_timm_as_the_high_res_encoder(folder, tmp_path):
    """A tiny random LAION CLIP ConvNeXt (timm's config, through transformers' TimmWrapperModel)."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        CLIPVisionModel,
        TimmWrapperConfig,
        TimmWrapperModel,
    )

    from scaffold.tiny_models import ensure_tiny_model

    reference = ChatRexForConditionalGeneration.from_pretrained(folder)
    torch.manual_seed(0)
    convnext = TimmWrapperModel(
        TimmWrapperConfig(
            architecture="convnext_large_mlp.clip_laion2b_augreg",
            model_args={"dims": [16, 32, 64, 128], "depths": [1, 1, 1, 1], "head_hidden_size": 16},
        )
    )
    llm_dir = ensure_tiny_model("qwen2-lm", folder.parent)
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    model = ChatRexForConditionalGeneration.from_parts(
        CLIPVisionModel(reference.config.vision_config),
        convnext,
        AutoModelForCausalLM.from_pretrained(llm_dir),
        tokenizer,
        num_object_tokens=8,
        low_res_size=64,
        high_res_size=128,
        roi_output_size=2,
        box_embed_dim=32,
    )
    assert model.config.convnext_config.hidden_sizes == [16, 32, 64, 128]
    processor = ChatRexProcessor.from_model_config(tokenizer, model.config)
    assert processor.high_res_mean == pytest.approx(CLIP_MEAN)  # the CLIP statistics, not ImageNet's
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8))
    batch = processor([image], [[[0, 0, 30, 30], [10, 10, 60, 60]]], ["find it"],
                      ["<ground>it</ground><objects><obj1></objects>"])  # fmt: skip
    model.set_trainable("perception")
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.high_res_encoder.parameters())
    model.save_pretrained(tmp_path)
    loaded = ChatRexForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(model.eval()(**batch).logits, loaded(**batch).logits, atol=1e-5)


def test_answer_only_logits_give_the_same_loss_and_gradients(folder):
    model = ChatRexForConditionalGeneration.from_pretrained(folder).train()
    processor = ChatRexProcessor.from_pretrained(folder)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)) for _ in range(2)]
    batch = processor(images, [[[0, 0, 30, 30]], [[5, 5, 40, 40], [1, 1, 9, 9]]], ["find it", "what?"],
                      ["<ground>it</ground><objects><obj0></objects>", "a thing"])  # fmt: skip
    full = model(**batch)
    full.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    fast = model(**batch, answer_logits_only=True)
    fast.loss.backward()
    assert torch.allclose(full.loss, fast.loss, atol=1e-5)
    assert fast.logits.shape[0] == int((batch["labels"][:, 1:] != -100).sum())
    for name, grad in grads.items():
        assert torch.allclose(grad, dict(model.named_parameters())[name].grad, atol=1e-5), name
