"""Official-package SAM 2 backend: full-size masks and one score per box, for any image size and box count."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from scaffold.tiny_models import ensure_tiny_model

pytestmark = pytest.mark.timeout(300)

sam2 = pytest.importorskip("sam2")

from stages.backends.sam2_official import Sam2Official, config_name, feature_sizes  # noqa: E402


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache laid out like the default one, so `tiny:` names resolve into it via REXVERSE_CACHE."""
    base = tmp_path_factory.mktemp("rexverse-cache")
    ensure_tiny_model("sam2-official", base / "tiny-models")
    return base


@pytest.fixture(scope="module")
def folder(cache: Path) -> Path:
    return ensure_tiny_model("sam2-official", cache / "tiny-models")


@pytest.fixture(scope="module")
def segmenter(folder: Path) -> Sam2Official:
    return Sam2Official(str(folder))


def _images(*sizes: tuple[int, int]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def test_masks_have_each_image_size_and_one_score_per_box(segmenter: Sam2Official) -> None:
    images = _images((256, 256), (120, 300), (64, 90), (97, 33))
    boxes = [
        np.array([[10, 10, 100, 100], [50, 60, 200, 220]], dtype=np.float32),
        np.array([[5, 5, 60, 40]]),  # a single box
        np.zeros((0, 4)),  # no box
        [[0, 0, 33, 97], [1, 2, 20, 50], [10, 10, 30, 90]],  # plain lists work too
    ]
    results = segmenter(images, boxes)
    assert len(results) == 4
    for (masks, scores), image, box in zip(results, images, boxes, strict=True):
        n = len(box)
        assert masks.shape == (n, *image.shape[:2]) and masks.dtype == np.bool_
        assert scores.shape == (n,) and scores.dtype == np.float32
        assert np.isfinite(scores).all()
    assert results[0][0].any()  # random weights still give non-empty masks somewhere


def test_only_empty_and_no_images(segmenter: Sam2Official) -> None:
    [(masks, scores)] = segmenter(_images((40, 50)), [np.zeros((0, 4))])
    assert masks.shape == (0, 40, 50) and scores.shape == (0,)
    assert segmenter([], []) == []


def test_batched_equals_one_by_one(segmenter: Sam2Official) -> None:
    """Each image's masks come from its own embedding, whatever else is in the batch."""
    images = _images((256, 256), (120, 300))
    boxes = [np.array([[10, 10, 100, 100], [50, 60, 200, 220]]), np.array([[5, 5, 60, 40]])]
    together = segmenter(images, boxes)
    for i in range(2):
        [(masks, scores)] = segmenter([images[i]], [boxes[i]])
        np.testing.assert_array_equal(masks, together[i][0])
        np.testing.assert_allclose(scores, together[i][1], atol=1e-5)


def test_chunked_embedding_matches(folder: Path, segmenter: Sam2Official) -> None:
    images = _images((256, 256), (120, 300), (64, 90))
    boxes = [np.array([[10, 10, 100, 100]]), np.zeros((0, 4)), np.array([[5, 5, 60, 40], [0, 0, 90, 64]])]
    one_at_a_time = Sam2Official(str(folder), embed_batch_size=1)(images, boxes)
    for (m1, s1), (m2, s2) in zip(one_at_a_time, segmenter(images, boxes), strict=True):
        np.testing.assert_array_equal(m1, m2)
        np.testing.assert_allclose(s1, s2, atol=1e-5)


def test_tiny_name_and_from_checkpoint_load_the_same_model(
    cache: Path, folder: Path, segmenter: Sam2Official, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REXVERSE_CACHE", str(cache))
    by_name = Sam2Official("tiny:sam2-official")
    spec = json.loads((folder / "build.json").read_text())
    assert spec["config"] == "configs/sam2.1/sam2.1_hiera_t.yaml" and spec["image_size"] == 128
    short = Path(spec["config"]).name  # "sam2.1_hiera_t.yaml", as a user would write it
    explicit = Sam2Official.from_checkpoint(
        short, folder / "checkpoint.pt", hydra_overrides=spec["hydra_overrides"]
    )
    images, boxes = _images((100, 150)), [np.array([[10, 10, 90, 60]])]
    reference = segmenter(images, boxes)[0]
    for other in (by_name, explicit):
        assert other.model.image_size == 128
        assert other.predictor._bb_feat_sizes == [(32, 32), (16, 16), (8, 8)]
        masks, scores = other(images, boxes)[0]
        np.testing.assert_array_equal(masks, reference[0])
        np.testing.assert_allclose(scores, reference[1], atol=1e-6)


def test_checkpoint_is_official_format(folder: Path) -> None:
    checkpoint = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert list(checkpoint) == ["model"]
    assert any(k.startswith("image_encoder.trunk.") for k in checkpoint["model"])
    assert any(k.startswith("sam_mask_decoder.") for k in checkpoint["model"])


def test_config_names() -> None:
    assert config_name("sam2.1_hiera_l.yaml") == "configs/sam2.1/sam2.1_hiera_l.yaml"
    assert config_name("sam2.1_hiera_b+") == "configs/sam2.1/sam2.1_hiera_b+.yaml"
    assert config_name("sam2_hiera_s.yaml") == "configs/sam2/sam2_hiera_s.yaml"
    assert config_name("configs/sam2.1/sam2.1_hiera_t.yaml") == "configs/sam2.1/sam2.1_hiera_t.yaml"
    package = Path(sam2.__file__).parent
    for name in ("sam2.1_hiera_l.yaml", "sam2.1_hiera_t", "sam2_hiera_l.yaml"):
        assert (package / config_name(name)).is_file(), name


def test_feature_sizes_agree_with_the_predictor_at_1024() -> None:
    """At the released 1024 px input our formula gives the predictor's own hard-coded sizes."""
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    with torch.random.fork_rng(devices=[]):
        model = build_sam2(config_name("sam2.1_hiera_t.yaml"), ckpt_path=None, device="cpu")
    assert model.image_size == 1024
    assert feature_sizes(model) == SAM2ImagePredictor(model)._bb_feat_sizes


def test_rejects_bad_input(segmenter: Sam2Official) -> None:
    with pytest.raises(ValueError, match="2 images but 1"):
        segmenter(_images((10, 10), (10, 10)), [np.zeros((0, 4))])
    with pytest.raises(ValueError, match="uint8 RGB"):
        segmenter([np.zeros((10, 10), np.uint8)], [np.zeros((0, 4))])
    with pytest.raises(ValueError, match="uint8 RGB"):
        segmenter([np.zeros((10, 10, 3), np.float32)], [np.array([[0, 0, 5, 5]])])
