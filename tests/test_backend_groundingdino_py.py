"""groundingdino-py backend: output layout for select_boxes, and the transformers 5 compatibility layer."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import ModelRef
from scaffold.tiny_models import ensure_tiny_model
from stages.grounding import GroundingConfig, build_prompt, phrase_token_indices, select_boxes

pytestmark = pytest.mark.timeout(300)

pytest.importorskip("groundingdino")

from stages.backends import groundingdino_build, groundingdino_py  # noqa: E402
from stages.backends.groundingdino_py import (  # noqa: E402
    GroundingDinoPy,
    apply_transformers5_compat,
    resolve_official_grounding,
)

PHRASES = [["red ball", "blue square", "dog"], ["a cat"]]


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache laid out like the default one, so `tiny:` names resolve into it via REXVERSE_CACHE."""
    base = tmp_path_factory.mktemp("rexverse-cache")
    ensure_tiny_model("groundingdino-official", base / "tiny-models")
    return base


@pytest.fixture(scope="module")
def folder(cache: Path) -> Path:
    return ensure_tiny_model("groundingdino-official", cache / "tiny-models")


@pytest.fixture(scope="module")
def detector(folder: Path) -> GroundingDinoPy:
    return GroundingDinoPy(*resolve_official_grounding(str(folder)), min_image_side=128, max_image_side=192)


def _images(*sizes: tuple[int, int]) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _tiny_bert(folder: Path) -> torch.nn.Module:
    from transformers import BertModel

    return BertModel.from_pretrained(folder / "bert").eval()


# ----------------------------------------------------------------------------------------------- inference


def test_two_image_sizes_give_select_boxes_input(detector: GroundingDinoPy) -> None:
    images = _images((256, 256), (120, 300))
    prompts, spans = zip(*(build_prompt(p) for p in PHRASES), strict=True)
    probs, boxes, offsets = detector(images, list(prompts))

    queries = detector.model.num_queries
    assert queries == 30
    assert probs.shape == (2, queries, 256) and probs.dtype == torch.float32
    assert boxes.shape == (2, queries, 4) and boxes.dtype == torch.float32
    assert ((probs >= 0) & (probs <= 1)).all() and torch.isfinite(boxes).all()
    assert ((boxes >= 0) & (boxes <= 1)).all()  # cxcywh normalised to each image

    cfg = GroundingConfig(model=ModelRef(name="x"), box_threshold=0.0, text_threshold=0.0)
    for i, (prompt, image) in enumerate(zip(prompts, images, strict=True)):
        encoded = detector.tokenizer(prompt, return_offsets_mapping=True)
        assert offsets[i] == [tuple(o) for o in encoded["offset_mapping"]]
        # Each offset covers its token's text; logits past the prompt's tokens are masked to 0.
        for token, (a, b) in zip(encoded.tokens(), offsets[i], strict=True):
            assert (
                (a, b) == (0, 0) if token in ("[CLS]", "[SEP]") else prompt[a:b] == token.removeprefix("##")
            )
        assert (probs[i, :, len(offsets[i]) :] == 0).all()
        assert (probs[i, :, 1 : len(offsets[i]) - 1] > 0).all()
        tokens = phrase_token_indices(offsets[i], spans[i])
        assert all(tokens) and "[UNK]" not in encoded.tokens()
        regions = select_boxes(probs[i], boxes[i], tokens, image.width, image.height, cfg)
        assert regions, "thresholds of 0 keep at least one box"
        for region in regions:
            x0, y0, x1, y1 = region["box"]
            assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height
            assert 0 <= region["phrase"] < len(PHRASES[i])


def test_preprocess_follows_the_package_resize(detector: GroundingDinoPy) -> None:
    square, wide = _images((256, 256), (120, 300))
    assert detector.preprocess(square).shape == (3, 128, 128)  # shorter side -> 128
    assert detector.preprocess(wide).shape == (3, 77, 192)  # longer side capped at 192, aspect kept


def test_different_prompts_give_one_by_one_results(detector: GroundingDinoPy) -> None:
    images = _images((100, 140), (100, 140), (60, 90))
    prompts = [build_prompt(p)[0] for p in [*PHRASES, ["dog"]]]
    probs, boxes, _ = detector(images, prompts)
    for i in range(3):
        p1, b1, _ = detector([images[i]], [prompts[i]])
        torch.testing.assert_close(p1[0], probs[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b1[0], boxes[i], atol=1e-5, rtol=1e-5)


def test_images_sharing_a_prompt_share_a_forward(
    detector: GroundingDinoPy, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    forward = detector.model.forward

    def counting(samples, **kwargs):
        calls.append(len(kwargs["captions"]))
        return forward(samples, **kwargs)

    monkeypatch.setattr(detector.model, "forward", counting)
    images = _images((100, 140), (100, 140), (60, 90))
    probs, _, _ = detector(images, ["dog.", "red ball.", "dog."])
    assert sorted(calls) == [1, 2]
    # Same prompt, same size: batching changes nothing.
    same, _, _ = detector(images[:2], ["dog.", "dog."])
    single, _, _ = detector(images[1:2], ["dog."])
    torch.testing.assert_close(same[1], single[0], atol=1e-4, rtol=1e-4)


def test_package_mixes_different_prompts_within_a_batch(detector: GroundingDinoPy) -> None:
    """Why the backend runs one forward per prompt; if this starts failing upstream fixed it."""
    from groundingdino.util.misc import nested_tensor_from_tensor_list

    images = [detector.preprocess(im) for im in _images((100, 140), (100, 140))]
    prompts = [build_prompt(p)[0] for p in PHRASES]
    with torch.no_grad():
        both = detector.model(nested_tensor_from_tensor_list(images), captions=prompts)["pred_logits"]
        alone = detector.model(nested_tensor_from_tensor_list(images[:1]), captions=prompts[:1])[
            "pred_logits"
        ]
    assert (both[0].sigmoid() - alone[0].sigmoid()).abs().max() > 0.01


def test_prompt_gets_final_period_without_shifting_offsets(detector: GroundingDinoPy) -> None:
    _, _, [offsets] = detector(_images((64, 64)), ["red ball"])
    assert offsets[-2] == (8, 9)  # the added "." after "red ball"
    assert phrase_token_indices(offsets, [(0, 8)]) == [[1, 2]]


def test_empty_batch_and_mismatch(detector: GroundingDinoPy) -> None:
    probs, boxes, offsets = detector([], [])
    assert probs.shape == (0, 30, 256) and boxes.shape == (0, 30, 4) and offsets == []
    with pytest.raises(ValueError, match="1 images but 2 prompts"):
        detector(_images((32, 32)), ["a.", "b."])


def test_resolve_official_grounding(
    cache: Path, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REXVERSE_CACHE", str(cache))
    config, checkpoint, bert = resolve_official_grounding("tiny:groundingdino-official")
    assert (config, checkpoint, bert) == resolve_official_grounding(str(folder))
    assert Path(config).name == "GroundingDINO_tiny.py" and Path(checkpoint).name == "groundingdino_tiny.pth"
    assert bert == str(folder / "bert")
    with pytest.raises(FileNotFoundError):
        resolve_official_grounding(str(tmp_path / "missing"))
    shutil.copy(checkpoint, tmp_path / "a.pth")
    shutil.copy(checkpoint, tmp_path / "b.pth")
    shutil.copy(config, tmp_path / "c.py")
    with pytest.raises(ValueError, match="expected one"):
        resolve_official_grounding(str(tmp_path))


def test_text_encoder_must_be_local(folder: Path, tmp_path: Path) -> None:
    """A hub id in the config is refused before anything could try to download it."""
    config = tmp_path / "hub.py"
    text = (folder / "GroundingDINO_tiny.py").read_text()
    config.write_text(text.replace('text_encoder_type = "bert"', 'text_encoder_type = "bert-base-uncased"'))
    checkpoint = folder / "groundingdino_tiny.pth"
    with pytest.raises(ValueError, match="not a local folder"):
        GroundingDinoPy(str(config), str(checkpoint))
    # The same config runs once bert_path names the local copy.
    probs, _, _ = GroundingDinoPy(str(config), str(checkpoint), bert_path=str(folder / "bert"))(
        _images((40, 40)), ["dog."]
    )
    assert probs.shape == (1, 30, 256)


def test_checkpoint_loads_without_missing_weights(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger=groundingdino_build.__name__):
        model = groundingdino_py.load_official_model(
            folder / "GroundingDINO_tiny.py", folder / "groundingdino_tiny.pth"
        )
    assert not [r for r in caplog.records if "missing" in r.getMessage()]
    saved = torch.load(folder / "groundingdino_tiny.pth", map_location="cpu", weights_only=True)["model"]
    assert set(saved) == set(model.state_dict())
    assert next(model.parameters()).dtype == torch.float32  # float16 on disk, float32 in the model


# ------------------------------------------------------------------------------------------ compatibility


def test_unpatched_wrapper_fails_under_transformers_5(folder: Path) -> None:
    """The package's own wrapper, which the compat layer replaces, cannot run on transformers 5."""
    from groundingdino.models.GroundingDINO.bertwarper import BertModelWarper
    from transformers import BertModel

    if hasattr(BertModel, "get_extended_attention_mask"):
        pytest.skip("transformers 4: the package runs unpatched")
    bert = _tiny_bert(folder)
    with pytest.raises(AttributeError, match="get_extended_attention_mask"):
        BertModelWarper(bert_model=bert)

    # Putting the removed helpers back (on a throwaway subclass) is not enough: its forward still fails.
    class WithHelpers(BertModel):
        def get_extended_attention_mask(self, mask, input_shape, device=None):
            return (1.0 - mask[:, None, None].float()) * torch.finfo(torch.float32).min

        def invert_attention_mask(self, mask):
            return self.get_extended_attention_mask(mask, mask.shape)

        def get_head_mask(self, head_mask, num_layers):
            return [None] * num_layers

    warper = BertModelWarper(bert_model=WithHelpers.from_pretrained(folder / "bert"))
    with pytest.raises(TypeError, match="past_key_values_length"):
        warper(input_ids=torch.tensor([[2, 40, 3]]))


def test_compat_is_idempotent_and_isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    import groundingdino.models.GroundingDINO.bertwarper as bertwarper
    import groundingdino.models.GroundingDINO.groundingdino as gd_model
    from transformers import BertModel

    if hasattr(BertModel, "get_extended_attention_mask"):
        assert apply_transformers5_compat() is False  # transformers 4: nothing to do
        return
    monkeypatch.setattr(gd_model, "BertModelWarper", bertwarper.BertModelWarper)  # as shipped; undone after
    assert apply_transformers5_compat() is True
    patched = gd_model.BertModelWarper
    assert patched is groundingdino_build._BertWarper
    assert apply_transformers5_compat() is False and gd_model.BertModelWarper is patched

    # A second import of the module (a fresh copy under another name) finds the patch and leaves it.
    spec = importlib.util.spec_from_file_location("groundingdino_build_copy", groundingdino_build.__file__)
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    assert copy._BertWarper is not patched
    assert copy.apply_transformers5_compat() is False and gd_model.BertModelWarper is patched

    # Isolated: the package's own class and transformers' BertModel are untouched.
    assert bertwarper.BertModelWarper is not patched
    assert not hasattr(BertModel, "get_extended_attention_mask") and not hasattr(BertModel, "get_head_mask")


def test_compat_forward_matches_bert_and_keeps_phrases_apart(folder: Path) -> None:
    bert = _tiny_bert(folder)
    warper = groundingdino_build._BertWarper(bert).eval()
    ids = torch.tensor([[2, 40, 41, 6, 42, 6, 3], [2, 43, 6, 3, 0, 0, 0]])
    mask = (ids != 0).long()
    types = torch.zeros_like(ids)
    positions = torch.arange(7).expand(2, 7)
    with torch.no_grad():
        ours = warper(input_ids=ids, attention_mask=mask, token_type_ids=types, position_ids=positions)
        reference = bert(input_ids=ids, attention_mask=mask, token_type_ids=types, position_ids=positions)
    keep = mask.bool()
    torch.testing.assert_close(ours.last_hidden_state[keep], reference.last_hidden_state[keep])
    torch.testing.assert_close(ours.pooler_output, reference.pooler_output)

    # Grounding DINO's (B, L, L) mask: tokens 1-3 ("w w .") and 4-5 ("w .") must not see each other.
    block = torch.zeros(1, 7, 7, dtype=torch.bool)
    block[0, 1:4, 1:4] = block[0, 4:6, 4:6] = True
    block[0, [0, 6], [0, 6]] = True
    first, second = ids[:1].clone(), ids[:1].clone()
    second[0, 4] = 44  # change only the second phrase
    with torch.no_grad():
        out1 = warper(input_ids=first, attention_mask=block, position_ids=positions[:1]).last_hidden_state
        out2 = warper(input_ids=second, attention_mask=block, position_ids=positions[:1]).last_hidden_state
    torch.testing.assert_close(out1[0, 1:4], out2[0, 1:4])
    assert not torch.allclose(out1[0, 4], out2[0, 4])
