"""Checks the committed fixture100 dataset and the bad-input generator the engine's tests rely on.

Why: every other test trusts this ground truth, so it must match its generator byte for byte, load
with pycocotools, and really contain the odd files (modes, EXIF, sizes) it claims to contain.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps, UnidentifiedImageError
from pycocotools.coco import COCO

from scaffold.make_fixture import (
    BOMB_SIZE,
    CATEGORIES,
    COLORS,
    EXIF_ORIENTATION_TAG,
    SIZE_RANGES,
    generate_fixture,
    write_bad_inputs,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "fixture100"
ANNOTATIONS = FIXTURE / "annotations.json"

# file name -> (format, mode, stored (raw) size or None to skip)
ODD_IMAGES: dict[str, tuple[str, str, tuple[int, int] | None]] = {
    "odd_grayscale.jpg": ("JPEG", "L", None),
    "odd_rgba.png": ("PNG", "RGBA", None),
    "odd_palette.png": ("PNG", "P", None),
    "odd_gray16.png": ("PNG", "I;16", None),
    "odd_cmyk.jpg": ("JPEG", "CMYK", None),
    "odd_exif_rot6.jpg": ("JPEG", "RGB", (300, 400)),
    "odd_exif_rot8.jpg": ("JPEG", "RGB", (240, 360)),
    "odd_tiny.jpg": ("JPEG", "RGB", (48, 40)),
    "odd_huge.jpg": ("JPEG", "RGB", (4000, 3000)),
    "odd_panorama.jpg": ("JPEG", "RGB", (1600, 200)),
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree_hashes(folder: Path) -> dict[str, str]:
    return {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}


@cache
def _coco_json() -> dict:
    return json.loads(ANNOTATIONS.read_text(encoding="utf-8"))


def _displayed_rgb(path: Path) -> np.ndarray:
    """Upright RGB pixels; 16-bit gray is scaled down rather than clipped."""
    with Image.open(path) as raw:
        image = ImageOps.exif_transpose(raw)
    if image.mode == "I;16":
        image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
    return np.asarray(image.convert("RGB")).astype(np.int16)


def test_committed_fixture_matches_generator(tmp_path: Path) -> None:
    """Text files must match byte for byte; images must decode to the same pixels (encoder builds of
    libjpeg/zlib may differ between Pillow releases, so image bytes are not compared)."""
    info = _coco_json()["info"]
    generate_fixture(tmp_path, n=len(_coco_json()["images"]), seed=info["seed"])
    committed, fresh = _tree_hashes(FIXTURE), _tree_hashes(tmp_path)
    assert sorted(committed) == sorted(fresh), "file lists differ; rerun scaffold/make_fixture.py"
    hint = "regenerate with `python scaffold/make_fixture.py --out tests/fixtures/fixture100` if intended"
    for name in committed:
        if name.endswith((".json", ".md")):
            assert committed[name] == fresh[name], f"{name} differs from the generator; {hint}"
            continue
        old, new = _displayed_rgb(FIXTURE / name), _displayed_rgb(tmp_path / name)
        assert old.shape == new.shape, f"{name} changed size; {hint}"
        assert np.abs(old - new).mean() < 1.0, f"{name} pixels differ from the generator; {hint}"


def test_fixture_is_small_and_complete() -> None:
    files = [p for p in FIXTURE.iterdir() if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 3_000_000
    assert {"annotations.json", "README.md"} <= {p.name for p in files}
    listed = {im["file_name"] for im in _coco_json()["images"]}
    assert len(listed) == 100
    assert listed == {p.name for p in files} - {"annotations.json", "README.md"}


def test_pycocotools_loads_annotations() -> None:
    coco = COCO(str(ANNOTATIONS))
    assert len(coco.getImgIds()) == 100
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CATEGORIES)
    assert len(coco.getAnnIds()) == len(_coco_json()["annotations"]) > 100
    info = _coco_json()["info"]
    assert info["seed"] == 0 and info["version"]


def test_annotations_are_well_formed() -> None:
    data = _coco_json()
    images = {im["id"]: im for im in data["images"]}
    assert len(images) == len(data["images"])
    ann_ids = [a["id"] for a in data["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids)
    for ann in data["annotations"]:
        image = images[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert all(isinstance(v, int) for v in ann["bbox"])
        assert w > 0 and h > 0 and x >= 0 and y >= 0, ann
        assert x + w <= image["width"] and y + h <= image["height"], (image["file_name"], ann)
        assert 0 < ann["area"] <= w * h
        assert ann["iscrowd"] == 0
        assert 1 <= ann["category_id"] <= len(CATEGORIES)
        assert ann["attributes"]["color"] in COLORS
        assert ann["attributes"]["size"] in SIZE_RANGES
    with_objects = {a["image_id"] for a in data["annotations"]}
    assert with_objects == set(images), "every image has at least one object"


def test_captions_mention_every_object() -> None:
    data = _coco_json()
    names = {c["id"]: c["name"] for c in data["categories"]}
    for image in data["images"]:
        caption = image["caption"]
        assert caption.endswith(" background.") and caption[0].islower()
        for ann in (a for a in data["annotations"] if a["image_id"] == image["id"]):
            phrase = f"{ann['attributes']['size']} {ann['attributes']['color']} {names[ann['category_id']]}"
            assert phrase in caption, (image["file_name"], phrase, caption)


def test_every_image_opens_with_its_annotated_size() -> None:
    for image in _coco_json()["images"]:
        with Image.open(FIXTURE / image["file_name"]) as raw:
            upright = ImageOps.exif_transpose(raw)
            assert upright.size == (image["width"], image["height"]), image["file_name"]


def test_normal_scenes_are_mostly_jpeg_within_size_range() -> None:
    scenes = [im for im in _coco_json()["images"] if im["file_name"].startswith("scene_")]
    assert len(scenes) == 90
    assert 3 <= sum(im["file_name"].endswith(".png") for im in scenes) < 20
    assert all(192 <= im["width"] <= 512 and 192 <= im["height"] <= 512 for im in scenes)


@pytest.mark.parametrize("file_name", sorted(ODD_IMAGES))
def test_odd_images_have_claimed_properties(file_name: str) -> None:
    fmt, mode, raw_size = ODD_IMAGES[file_name]
    with Image.open(FIXTURE / file_name) as im:
        assert (im.format, im.mode) == (fmt, mode)
        if raw_size is not None:
            assert im.size == raw_size
        orientation = im.getexif().get(EXIF_ORIENTATION_TAG)
        if file_name.startswith("odd_exif_rot"):
            assert orientation == int(file_name.removesuffix(".jpg")[-1])
        else:
            assert orientation in (None, 1)
        if mode == "RGBA":
            alpha = np.asarray(im.getchannel("A"))
            assert alpha.min() == 0 and alpha.max() == 255
        if mode == "I;16":
            assert int(np.asarray(im).max()) > 255


def test_objects_show_their_annotated_colour() -> None:
    """Guards boxes and EXIF handling: a quarter of each box must be close to the object's colour."""
    data = _coco_json()
    for image in data["images"]:
        pixels = _displayed_rgb(FIXTURE / image["file_name"])
        for ann in (a for a in data["annotations"] if a["image_id"] == image["id"]):
            x, y, w, h = ann["bbox"]
            crop = pixels[y : y + h, x : x + w]
            target = np.array(COLORS[ann["attributes"]["color"]], dtype=np.int16)
            share = float((np.abs(crop - target).max(axis=-1) <= 60).mean())
            assert share >= 0.25, (image["file_name"], ann, share)


def test_generator_runs_as_a_script(tmp_path: Path) -> None:
    script = REPO_ROOT / "scaffold" / "make_fixture.py"
    cmd = [sys.executable, str(script), "--out", str(tmp_path), "--n", "12", "--seed", "3"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path)
    data = json.loads((tmp_path / "annotations.json").read_text(encoding="utf-8"))
    assert len(data["images"]) == 12 and data["info"]["seed"] == 3


# ---------------------------------------------------------------------------------------------
# Bad inputs


@pytest.fixture
def bad_inputs(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    good = FIXTURE / "scene_000.jpg"
    start = time.perf_counter()
    kinds = write_bad_inputs(tmp_path / "bad", good)
    assert time.perf_counter() - start < 1.0
    return tmp_path / "bad", good, kinds


def _by_kind(kinds: dict[str, str]) -> dict[str, str]:
    return {kind: name for name, kind in kinds.items()}


def test_bad_inputs_cover_every_kind(bad_inputs: tuple[Path, Path, dict[str, str]]) -> None:
    out, _, kinds = bad_inputs
    expected = {"truncated", "empty", "not_an_image", "decompression_bomb", "corrupt", "duplicate"}
    assert set(kinds.values()) == expected
    assert sorted(p.name for p in out.iterdir()) == sorted(kinds)


def test_bad_inputs_are_deterministic(tmp_path: Path, bad_inputs: tuple[Path, Path, dict[str, str]]) -> None:
    out, good, _ = bad_inputs
    write_bad_inputs(tmp_path / "again", good)
    assert _tree_hashes(out) == _tree_hashes(tmp_path / "again")


def test_truncated_jpeg(bad_inputs: tuple[Path, Path, dict[str, str]]) -> None:
    out, good, kinds = bad_inputs
    path = out / _by_kind(kinds)["truncated"]
    data = path.read_bytes()
    assert good.read_bytes().startswith(data)
    assert abs(len(data) - 0.4 * good.stat().st_size) <= 1
    with Image.open(path) as im:
        assert im.format == "JPEG"
        with pytest.raises(OSError):
            im.load()


@pytest.mark.parametrize("kind", ["empty", "not_an_image"])
def test_non_images_are_unidentified(kind: str, bad_inputs: tuple[Path, Path, dict[str, str]]) -> None:
    out, _, kinds = bad_inputs
    path = out / _by_kind(kinds)[kind]
    assert path.suffix == ".jpg"
    assert (path.stat().st_size == 0) == (kind == "empty")
    if kind == "not_an_image":
        path.read_text(encoding="ascii")
    with pytest.raises(UnidentifiedImageError):
        Image.open(path)


def test_decompression_bomb_png(
    bad_inputs: tuple[Path, Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, _, kinds = bad_inputs
    path = out / _by_kind(kinds)["decompression_bomb"]
    assert path.stat().st_size < 8_000
    with pytest.raises(Image.DecompressionBombError):  # Pillow's default guard trips on open
        Image.open(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with Image.open(path) as im:  # header only; never load this
        assert im.format == "PNG"
        assert im.size == BOMB_SIZE


def test_corrupt_jpeg_keeps_valid_header(bad_inputs: tuple[Path, Path, dict[str, str]]) -> None:
    out, good, kinds = bad_inputs
    path = out / _by_kind(kinds)["corrupt"]
    data, original = path.read_bytes(), good.read_bytes()
    assert len(data) == len(original) and data != original
    scan_start = original.find(b"\xff\xda")
    assert data[: scan_start + 2] == original[: scan_start + 2]
    with Image.open(path) as im, Image.open(good) as ref:
        assert im.size == ref.size
        try:
            im.load()
        except OSError:
            return
        diff = np.abs(np.asarray(im).astype(np.int16) - np.asarray(ref).astype(np.int16))
        assert diff.mean() > 5, "decoded without error, so the pixels at least must be damaged"


def test_duplicate_is_exact(bad_inputs: tuple[Path, Path, dict[str, str]]) -> None:
    out, good, kinds = bad_inputs
    path = out / _by_kind(kinds)["duplicate"]
    assert path.name != good.name
    assert _sha256(path) == _sha256(good)


def test_bad_inputs_from_png_source(tmp_path: Path) -> None:
    kinds = write_bad_inputs(tmp_path, FIXTURE / "odd_rgba.png")
    by_kind = _by_kind(kinds)
    assert (tmp_path / by_kind["truncated"]).read_bytes()[:2] == b"\xff\xd8"
    assert by_kind["duplicate"].endswith(".png")
    with Image.open(tmp_path / by_kind["corrupt"]) as im:
        assert im.format == "JPEG" and im.size == (300, 300)
