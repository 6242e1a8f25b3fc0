"""Tiny models: deterministic builds, cache behaviour, and the exact load/run paths the stages use."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from scaffold import tiny_models  # noqa: E402
from scaffold.tiny_models import TINY_PREFIX, available, ensure_tiny_model, resolve_model  # noqa: E402

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[1]
CORE = ["qwen2-vl", "grounding-dino", "qwen2-lm", "siglip", "clip"]
EXTRA = ["owlv2", "sam2", "sam2-official", "groundingdino-official", "nsfw", "low-content", "upn"]
WORDS = set(tiny_models._corpus_words())


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny-cache")
    for name in available():
        ensure_tiny_model(name, root)
    return root


def _folder(cache: Path, name: str) -> Path:
    return ensure_tiny_model(name, cache)


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _images(*sizes: tuple[int, int]) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _are_corpus_words(text: str) -> bool:
    words = re.findall(r"[A-Za-z]+", text)
    return bool(words) and all(w.lower() in WORDS for w in words)


# ------------------------------------------------------------------------------------------ cache + API


def test_models_available() -> None:
    assert available() == sorted(CORE + EXTRA)


def test_unknown_name_lists_available(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="available: .*qwen2-vl"):
        ensure_tiny_model("no-such-model", tmp_path)
    assert not any(tmp_path.iterdir())


def test_resolve_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REXVERSE_CACHE", str(tmp_path))
    assert tiny_models.cache_root() == tmp_path / "tiny-models"
    assert resolve_model("Qwen/Qwen2-VL-2B-Instruct") == "Qwen/Qwen2-VL-2B-Instruct"
    assert resolve_model("/some/local/folder") == "/some/local/folder"
    path = resolve_model(TINY_PREFIX + "siglip")
    assert Path(path).parent == tmp_path / "tiny-models"
    assert Path(path).name.startswith("siglip-")
    mtime = (Path(path) / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(TINY_PREFIX + "siglip") == path  # cached: no rebuild
    assert (Path(path) / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="available"):
        resolve_model(TINY_PREFIX + "nope")


def test_cli_rebuild_is_byte_identical(cache: Path, tmp_path: Path) -> None:
    """A fresh process (fresh hash seeds, fresh RNG) must write the same bytes: CI caches depend on it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "scaffold.tiny_models", "--cache", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    printed = dict(line.split(" -> ") for line in proc.stdout.splitlines())
    assert sorted(printed) == available()
    assert {Path(p).name for p in printed.values()} == {_folder(cache, n).name for n in available()}
    fresh = _digests(tmp_path)
    reference = {
        k: v
        for k, v in _digests(cache).items()
        if k.split("/")[0] in {Path(p).name for p in printed.values()}
    }
    assert fresh == reference
    assert any(k.endswith("model.safetensors") for k in fresh)
    assert any(k.endswith("tokenizer.json") for k in fresh)


def test_rename_race_loser_uses_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulate another actor finishing first: our rename fails, we return its folder and clean up."""
    final = tmp_path / f"clip-{tiny_models._spec_hash('clip')}"
    real_builder = tiny_models._BUILDERS["clip"]

    def build_then_lose(out: Path) -> None:
        real_builder(out)
        final.mkdir()
        (final / "winner").write_text("x")

    monkeypatch.setitem(tiny_models._BUILDERS, "clip", build_then_lose)
    assert ensure_tiny_model("clip", tmp_path) == final
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]
    assert (final / "winner").exists()


def test_concurrent_threads_agree(tmp_path: Path) -> None:
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_tiny_model("siglip", tmp_path)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 3
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]


def test_folders_are_small(cache: Path) -> None:
    for name in available():
        folder = _folder(cache, name)
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        assert size < 5 * 2**20, (name, size)


# ---------------------------------------------------------------------------------------------- models


def test_qwen2_vl_batched_generate(cache: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = _folder(cache, "qwen2-vl")
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    tok = processor.tokenizer
    assert tok.padding_side == "left"
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.pad_token_id == tok.pad_token_id

    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Describe the image in one sentence."}],
        }
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.count("<|image_pad|>") == 1 and prompt.endswith("<|im_start|>assistant\n")
    images = _images((256, 256), (120, 300), (64, 90))
    inputs = processor(text=[prompt] * 3, images=images, padding=True, return_tensors="pt")
    n_image_tokens = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert n_image_tokens[0] == 81 and len(set(n_image_tokens)) == 3
    assert (inputs["attention_mask"][:, -1] == 1).all()  # left padded
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, min_new_tokens=8, max_new_tokens=16)
    texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(texts) == 3
    for text in texts:
        assert _are_corpus_words(text), text


def test_qwen2_lm_chat_generate_and_yes_no(cache: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _folder(cache, "qwen2-lm")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert tok.padding_side == "left"
    assert model.config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id
    chats = [
        [
            {"role": "system", "content": "You check region descriptions."},
            {"role": "user", "content": "Does a red ball on the grass match red ball? Answer yes or no."},
        ],
        [{"role": "user", "content": "Write a referring expression for the object."}],
    ]
    prompts = tok.apply_chat_template(chats, add_generation_prompt=True, tokenize=False)
    assert prompts[0].startswith("<|im_start|>system\n") and prompts[1].endswith("<|im_start|>assistant\n")
    enc = tok(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, min_new_tokens=8, max_new_tokens=16)
        probs = model(**enc).logits[:, -1].softmax(-1)
    for text in tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True):
        assert _are_corpus_words(text), text

    answer_ids = {}
    for word in ("yes", "no", " yes", " no", "Yes", "No"):
        ids = tok(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, word
        answer_ids[word] = ids[0]
    assert len(set(answer_ids.values())) == 6
    assert (probs[:, list(answer_ids.values())] > 0).all()


def test_grounding_dino_detect_and_post_process(cache: Path) -> None:
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    folder = _folder(cache, "grounding-dino")
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForZeroShotObjectDetection.from_pretrained(folder).eval()
    images = _images((256, 256), (120, 300))
    text = "red ball. blue square. dog."
    inputs = processor(images=images, text=[text, text], return_tensors="pt")
    tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    assert "[UNK]" not in tokens and "square" in tokens
    with torch.no_grad():
        outputs = model(**inputs)
    assert outputs.logits.shape == (2, model.config.num_queries, model.config.max_text_len)
    assert outputs.pred_boxes.shape == (2, model.config.num_queries, 4)
    results = processor.post_process_grounded_object_detection(
        outputs,
        inputs["input_ids"],
        threshold=0.3,
        text_threshold=0.3,
        target_sizes=[im.size[::-1] for im in images],
    )
    assert len(results) == 2
    for result, image in zip(results, images, strict=True):
        assert len(result["scores"]) == len(result["boxes"]) == len(result["text_labels"]) > 0
        assert (result["boxes"][:, 2] <= image.width + 1e-3).all()


@pytest.mark.parametrize("name", ["siglip", "clip"])
def test_contrastive_scorers(cache: Path, name: str) -> None:
    from transformers import AutoModel, AutoProcessor

    folder = _folder(cache, name)
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    texts = ["a photo of a dog", "a red ball", "a blue car parked in front of the house"]
    images = _images((256, 256), (120, 300))
    inputs = processor(text=texts, images=images, padding="max_length", truncation=True, return_tensors="pt")
    assert inputs["input_ids"].shape == (3, processor.tokenizer.model_max_length)
    eos = processor.tokenizer.eos_token_id
    if name == "clip":
        assert eos == len(processor.tokenizer) - 1  # CLIP/OWL pool at the argmax id
    else:
        assert (inputs["input_ids"][:, -1] == eos).all()  # SigLIP pools at the last position: pad = EOS
    assert model.config.text_config.eos_token_id == eos
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
        text = model.get_text_features(
            input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")
        )
        image = model.get_image_features(pixel_values=inputs["pixel_values"])
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    assert text.pooler_output.shape[0] == 3 and image.pooler_output.shape[0] == 2


def test_owlv2_objectness(cache: Path) -> None:
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    folder = _folder(cache, "owlv2")
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForZeroShotObjectDetection.from_pretrained(folder).eval()
    assert processor.tokenizer.eos_token_id == len(processor.tokenizer) - 1  # OWL pools at the argmax id
    images = _images((256, 256), (120, 300))
    queries = [["a dog", "a red ball"], ["a car", "a cat"]]  # uneven lists break text_labels upstream
    inputs = processor(
        text=queries, images=images, padding="max_length", truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        outputs = model(**inputs)
    assert outputs.objectness_logits.shape == (2, 36)
    assert outputs.pred_boxes.shape == (2, 36, 4)
    assert outputs.logits.shape == (2, 36, 2)
    results = processor.post_process_grounded_object_detection(
        outputs, threshold=0.0, target_sizes=[im.size[::-1] for im in images], text_labels=queries
    )
    assert len(results) == 2 and len(results[0]["boxes"]) > 0


def test_sam2_box_prompts(cache: Path) -> None:
    from transformers import AutoModelForMaskGeneration, AutoProcessor

    folder = _folder(cache, "sam2")
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForMaskGeneration.from_pretrained(folder).eval()  # sam2_video -> Sam2Model
    images = _images((256, 256), (120, 300))
    boxes = [[[10, 10, 100, 100], [50, 60, 200, 220]], [[5, 5, 60, 40], [100, 20, 290, 110]]]
    inputs = processor(images=images, input_boxes=boxes, return_tensors="pt")
    with torch.no_grad():
        outputs = model(
            pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"], multimask_output=False
        )
    assert outputs.pred_masks.shape == (2, 2, 1, 32, 32)
    assert outputs.iou_scores.shape == (2, 2, 1)
    masks = processor.post_process_masks(outputs.pred_masks, inputs["original_sizes"])
    assert [tuple(m.shape) for m in masks] == [(2, 1, 256, 256), (2, 1, 120, 300)]
    assert masks[0].dtype == torch.bool


def test_sam2_official_folder_rebuilds_from_build_json(cache: Path) -> None:
    from sam2.build_sam import build_sam2

    folder = _folder(cache, "sam2-official")
    assert sorted(p.name for p in folder.iterdir()) == ["build.json", "checkpoint.pt"]
    spec = json.loads((folder / "build.json").read_text())
    assert spec["config"] == "configs/sam2.1/sam2.1_hiera_t.yaml" and spec["checkpoint"] == "checkpoint.pt"
    # build_sam2 loads strictly: any architecture mismatch with the overrides raises here.
    model = build_sam2(
        spec["config"],
        ckpt_path=str(folder / spec["checkpoint"]),
        device="cpu",
        hydra_overrides_extra=spec["hydra_overrides"],
    )
    assert model.image_size == spec["image_size"] == 128
    assert model.sam_image_embedding_size == 8 and model.hidden_dim == 32


def test_groundingdino_official_folder(cache: Path) -> None:
    from groundingdino.util.slconfig import SLConfig
    from transformers import AutoTokenizer, BertConfig

    folder = _folder(cache, "groundingdino-official")
    assert sorted(p.name for p in folder.iterdir()) == [
        "GroundingDINO_tiny.py",
        "bert",
        "groundingdino_tiny.pth",
    ]
    cfg = SLConfig.fromfile(str(folder / "GroundingDINO_tiny.py"))
    assert cfg.text_encoder_type == "bert" and cfg.num_queries == 30 and cfg.hidden_dim == 256
    assert cfg.rexverse_swin.embed_dim == 8
    checkpoint = torch.load(folder / "groundingdino_tiny.pth", map_location="cpu", weights_only=True)
    assert list(checkpoint) == ["model"]
    weights = checkpoint["model"]
    assert any(k.startswith("bert.embeddings.") for k in weights)
    assert any(k.startswith("backbone.0.") for k in weights)
    assert all(v.dtype == torch.float16 for v in weights.values() if v.is_floating_point())
    assert BertConfig.from_pretrained(folder / "bert").hidden_size == 32
    tok = AutoTokenizer.from_pretrained(folder / "bert")
    encoded = tok("red ball. blue square. dog.", return_offsets_mapping=True)
    assert "[UNK]" not in encoded.tokens() and len(encoded["offset_mapping"]) == len(encoded["input_ids"])
    assert all(t in tok.get_vocab() for t in ("[CLS]", "[SEP]", ".", "?"))  # Grounding DINO's specials


def test_extra_dependencies_change_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Builders that use other repository code (the groundingdino-py loader) rebuild when it changes."""
    dependency = tmp_path / "loader.py"
    dependency.write_text("a")
    monkeypatch.setitem(tiny_models._EXTRA_DEPS, "groundingdino-official", ((), (str(dependency),)))
    before = tiny_models._spec_hash("groundingdino-official")
    dependency.write_text("b")
    assert tiny_models._spec_hash("groundingdino-official") != before
    assert tiny_models._spec_hash("sam2") == tiny_models._spec_hash("sam2")
