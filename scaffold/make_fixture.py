"""Deterministic generator for the committed ``tests/fixtures/fixture100`` dataset and for bad inputs.

Why: the engine's tests need a small dataset whose ground truth (boxes, colours, sizes, captions) is
known exactly, that includes the awkward-but-valid files real crawls contain (grayscale, CMYK,
16-bit, palette, EXIF-rotated, tiny, huge, panorama), and that can be rebuilt byte for byte so the
committed copy can be checked for drift. ``write_bad_inputs`` makes the broken files a robust loader
must reject, on the fly, so they never need to be committed.

Usage: ``python scaffold/make_fixture.py --out tests/fixtures/fixture100 [--n 100] [--seed 0]``
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = "1.0.0"
JPEG_QUALITY = 85
EXIF_ORIENTATION_TAG = 0x0112

CATEGORIES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "ring",
    "cross",
    "diamond",
    "hexagon",
)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 30),
    "orange": (245, 140, 20),
    "purple": (130, 50, 170),
    "pink": (245, 120, 180),
    "brown": (130, 80, 40),
    "cyan": (30, 200, 220),
    "black": (15, 15, 15),
    "white": (250, 250, 250),
    "gray": (128, 128, 128),
}
ACHROMATIC_COLORS: tuple[str, ...] = ("black", "gray", "white")

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "light gray": (215, 215, 215),
    "beige": (238, 228, 205),
    "light blue": (205, 225, 245),
    "pale green": (215, 238, 215),
    "dark gray": (60, 60, 60),
    "dark blue": (25, 35, 80),
}

# Colour hidden under alpha 0; loaders that drop alpha see white, so white objects are not used there.
TRANSPARENT_RGB = (255, 255, 255)

# Object side as a fraction of the image's shorter side; the gaps keep the size classes unambiguous.
SIZE_RANGES: dict[str, tuple[float, float]] = {
    "small": (0.10, 0.17),
    "medium": (0.20, 0.30),
    "large": (0.34, 0.46),
}
MIN_OBJECT_PX = 8
MIN_COLOR_DISTANCE = 100.0  # objects must stand out from the background for colour checks
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")


@dataclass(frozen=True)
class Background:
    """A background: a named colour plus how it is painted (plain, gradient, textured, transparent)."""

    name: str
    style: str

    @property
    def rgb(self) -> tuple[int, int, int]:
        return TRANSPARENT_RGB if self.style == "transparent" else BACKGROUNDS[self.name]

    def phrase(self) -> str:
        """Caption fragment, e.g. 'a textured beige background'."""
        if self.style == "transparent":
            return "a transparent background"
        if self.style == "gradient":
            return f"a {self.name} gradient background"
        if self.style == "textured":
            return f"a textured {self.name} background"
        return f"a {self.name} background"


@dataclass(frozen=True)
class SceneObject:
    """One drawn object and its ground truth; bbox is the visible extent (x, y, w, h) in pixels."""

    shape: str
    color: str
    size: str
    bbox: tuple[int, int, int, int]
    area: int


@dataclass
class Scene:
    """A rendered upright scene (RGB or RGBA) with its objects and background."""

    image: Image.Image
    objects: list[SceneObject]
    background: Background

    def caption(self) -> str:
        return make_caption(self.objects, self.background)


@dataclass(frozen=True)
class ImageRecord:
    """What the COCO writer needs to know about one written file."""

    file_name: str
    width: int
    height: int
    variant: str
    scene: Scene


Saver = Callable[[Path], None]
OddMaker = Callable[[np.random.Generator], tuple[ImageRecord, Saver]]


# ---------------------------------------------------------------------------------------------
# Drawing


def _shape_mask(shape: str, side: int) -> Image.Image:
    """Draw one shape filling a side x side square; the mask decides the exact pixels (and bbox)."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    last = side - 1
    mid = last / 2
    if shape == "circle":
        draw.ellipse((0, 0, last, last), fill=255)
    elif shape == "square":
        draw.rectangle((0, 0, last, last), fill=255)
    elif shape == "ring":
        draw.ellipse((0, 0, last, last), fill=255)
        inset = max(2.0, side * 0.2)
        draw.ellipse((inset, inset, last - inset, last - inset), fill=0)
    elif shape == "triangle":
        draw.polygon([(mid, 0), (last, last), (0, last)], fill=255)
    elif shape == "diamond":
        draw.polygon([(mid, 0), (last, mid), (mid, last), (0, mid)], fill=255)
    elif shape == "hexagon":
        draw.polygon(_regular_polygon(mid, 6, 0.0), fill=255)
    elif shape == "star":
        draw.polygon(_star_points(mid), fill=255)
    elif shape == "cross":
        half = side / 6
        draw.rectangle((0, mid - half, last, mid + half), fill=255)
        draw.rectangle((mid - half, 0, mid + half, last), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def _regular_polygon(radius: float, sides: int, start_deg: float) -> list[tuple[float, float]]:
    step = 2 * math.pi / sides
    start = math.radians(start_deg)
    return [
        (radius + radius * math.cos(start + i * step), radius + radius * math.sin(start + i * step))
        for i in range(sides)
    ]


def _star_points(radius: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        r = radius if i % 2 == 0 else radius * 0.45
        angle = -math.pi / 2 + i * math.pi / 5
        points.append((radius + r * math.cos(angle), radius + r * math.sin(angle)))
    return points


def _paint_background(rng: np.random.Generator, width: int, height: int, bg: Background) -> Image.Image:
    """Plain, gradient or low-frequency texture: light variation that still compresses well."""
    if bg.style == "transparent":
        return Image.new("RGBA", (width, height), (*TRANSPARENT_RGB, 0))
    base = np.array(bg.rgb, dtype=np.float32)
    if bg.style == "plain":
        return Image.new("RGB", (width, height), bg.rgb)
    if bg.style == "gradient":
        horizontal = bool(rng.integers(0, 2))
        n = width if horizontal else height
        ramp = np.linspace(-1.0, 1.0, n, dtype=np.float32) * float(rng.uniform(10, 20))
        shade = ramp[None, :] if horizontal else ramp[:, None]
        field = np.broadcast_to(shade, (height, width))
    elif bg.style == "textured":
        coarse = rng.normal(0.0, 1.0, size=(height // 24 + 2, width // 24 + 2)).astype(np.float32)
        small = Image.fromarray(coarse, mode="F").resize((width, height), Image.Resampling.BICUBIC)
        field = np.asarray(small) * 7.0
    else:
        raise ValueError(f"unknown background style {bg.style!r}")
    pixels = np.clip(np.rint(base[None, None, :] + field[:, :, None]), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def _allowed_colors(bg: Background, palette: Sequence[str]) -> list[str]:
    return [c for c in palette if math.dist(COLORS[c], bg.rgb) >= MIN_COLOR_DISTANCE]


def _boxes_compatible(a: tuple[int, int, int], b: tuple[int, int, int], allow_overlap: bool) -> bool:
    """Square boxes (x, y, side). Overlap, when allowed, is partial and never hides a centre."""
    ax, ay, asz = a
    bx, by, bsz = b
    gap = 0 if allow_overlap else 3
    ix = min(ax + asz, bx + bsz) - max(ax, bx) + gap
    iy = min(ay + asz, by + bsz) - max(ay, by) + gap
    if ix <= 0 or iy <= 0:
        return True
    if not allow_overlap:
        return False
    if ix * iy > 0.25 * min(asz, bsz) ** 2:
        return False
    return not (_covers_core(a, b) or _covers_core(b, a))


def _covers_core(box: tuple[int, int, int], other: tuple[int, int, int]) -> bool:
    """Whether `other` reaches into the middle 40% of `box` (its centre must stay visible)."""
    x, y, side = box
    ox, oy, oside = other
    lo, hi = 0.3 * side, 0.7 * side
    return ox < x + hi and ox + oside > x + lo and oy < y + hi and oy + oside > y + lo


def _place(
    rng: np.random.Generator,
    width: int,
    height: int,
    side: int,
    placed: list[tuple[int, int, int]],
    allow_overlap: bool,
) -> tuple[int, int, int] | None:
    if side > width or side > height:
        return None
    for _ in range(60):
        x = int(rng.integers(0, width - side + 1))
        y = int(rng.integers(0, height - side + 1))
        box = (x, y, side)
        if all(_boxes_compatible(box, other, allow_overlap) for other in placed):
            return box
    return None


def _object_side(rng: np.random.Generator, size: str, width: int, height: int) -> int:
    lo, hi = SIZE_RANGES[size]
    return max(MIN_OBJECT_PX, round(float(rng.uniform(lo, hi)) * min(width, height)))


def render_scene(
    rng: np.random.Generator,
    width: int,
    height: int,
    bg: Background,
    *,
    n_objects: int,
    palette: Sequence[str] = tuple(COLORS),
    sizes: Sequence[str] = tuple(SIZE_RANGES),
    allow_overlap: bool = False,
) -> Scene:
    """Draw up to n_objects shapes; ground truth comes from a label map, so boxes are pixel exact."""
    image = _paint_background(rng, width, height, bg)
    colors = _allowed_colors(bg, palette)
    labels = np.full((height, width), -1, dtype=np.int16)
    placed: list[tuple[int, int, int]] = []
    specs: list[tuple[str, str, str]] = []
    for _ in range(n_objects):
        if specs and rng.random() < 0.3:
            shape, color, size = specs[-1]  # repeats make counted captions ("two small blue squares")
        else:
            shape = CATEGORIES[int(rng.integers(0, len(CATEGORIES)))]
            color = colors[int(rng.integers(0, len(colors)))]
            size = sizes[int(rng.integers(0, len(sizes)))]
        box = _place(rng, width, height, _object_side(rng, size, width, height), placed, allow_overlap)
        if box is None:
            continue
        x, y, side = box
        mask = _shape_mask(shape, side)
        fill = COLORS[color] + ((255,) if image.mode == "RGBA" else ())
        image.paste(fill, (x, y), mask)
        labels[y : y + side, x : x + side][np.asarray(mask) > 0] = len(specs)
        placed.append(box)
        specs.append((shape, color, size))
    objects = [_visible_object(labels, placed[i], i, *specs[i]) for i in range(len(specs))]
    return Scene(image=image, objects=objects, background=bg)


def _visible_object(
    labels: np.ndarray, box: tuple[int, int, int], index: int, shape: str, color: str, size: str
) -> SceneObject:
    """Box and area of the pixels still showing after later objects were drawn on top."""
    x, y, side = box
    visible = labels[y : y + side, x : x + side] == index
    rows = np.flatnonzero(visible.any(axis=1))
    cols = np.flatnonzero(visible.any(axis=0))
    bbox = (x + int(cols[0]), y + int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1))
    return SceneObject(shape=shape, color=color, size=size, bbox=bbox, area=int(visible.sum()))


# ---------------------------------------------------------------------------------------------
# Captions


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x", "ss", "sh", "ch")) else "s")


def make_caption(objects: Sequence[SceneObject], bg: Background) -> str:
    """'a large red circle next to two small blue squares on a gray background.' style caption."""
    groups: dict[tuple[str, str, str], int] = {}
    for obj in objects:
        key = (obj.size, obj.color, obj.shape)
        groups[key] = groups.get(key, 0) + 1
    order = {size: i for i, size in enumerate(("large", "medium", "small"))}
    phrases = []
    for (size, color, shape), count in sorted(groups.items(), key=lambda kv: order[kv[0][0]]):
        if count == 1:
            phrases.append(f"a {size} {color} {shape}")
        else:
            phrases.append(f"{NUMBER_WORDS[count]} {size} {color} {_plural(shape)}")
    if len(phrases) == 1:
        subject = phrases[0]
    elif len(phrases) == 2:
        subject = f"{phrases[0]} next to {phrases[1]}"
    else:
        subject = f"{', '.join(phrases[:-1])} and {phrases[-1]}"
    return f"{subject} on {bg.phrase()}."


# ---------------------------------------------------------------------------------------------
# Normal scenes


def _scene_record(rng: np.random.Generator, index: int) -> tuple[ImageRecord, Saver]:
    """Scene images: mostly JPEG on varied backgrounds, every tenth a PNG on a plain background."""
    width = int(rng.integers(192, 513))
    height = int(rng.integers(192, 513))
    as_png = index % 10 == 4
    style = "plain" if as_png else ("plain", "gradient", "textured")[int(rng.integers(0, 3))]
    bg = Background(list(BACKGROUNDS)[int(rng.integers(0, len(BACKGROUNDS)))], style)
    scene = render_scene(
        rng,
        width,
        height,
        bg,
        n_objects=int(rng.integers(1, 7)),
        allow_overlap=rng.random() < 0.35,
    )
    file_name = f"scene_{index:03d}.{'png' if as_png else 'jpg'}"
    record = ImageRecord(file_name, width, height, "scene", scene)
    if as_png:
        return record, lambda path: scene.image.save(path, "PNG", optimize=True)
    return record, lambda path: _save_jpeg(scene.image, path)


def _save_jpeg(image: Image.Image, path: Path | BytesIO, **extra: object) -> None:
    image.save(path, "JPEG", quality=JPEG_QUALITY, optimize=True, **extra)


# ---------------------------------------------------------------------------------------------
# Odd but valid images


def _odd_grayscale(rng: np.random.Generator) -> tuple[ImageRecord, Saver]:
    scene = render_scene(
        rng, 320, 256, Background("dark gray", "gradient"), n_objects=4, palette=ACHROMATIC_COLORS
    )
    gray = scene.image.convert("L")  # R == G == B everywhere, so this conversion is exact
    return ImageRecord("odd_grayscale.jpg", 320, 256, "grayscale_jpeg", scene), lambda p: _save_jpeg(gray, p)


def _odd_rgba(rng: np.random.Generator) -> tuple[ImageRecord, Saver]:
    scene = render_scene(rng, 300, 300, Background("transparent", "transparent"), n_objects=4)
    record = ImageRecord("odd_rgba.png", 300, 300, "rgba_png", scene)
    return record, lambda p: scene.image.save(p, "PNG", optimize=True)


def _odd_palette(rng: np.random.Generator) -> tuple[ImageRecord, Saver]:
    scene = render_scene(rng, 360, 240, Background("beige", "plain"), n_objects=5, allow_overlap=True)
    paletted = scene.image.quantize(colors=16, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    if paletted.convert("RGB").tobytes() != scene.image.tobytes():
        raise RuntimeError("palette conversion lost colours")
    record = ImageRecord("odd_palette.png", 360, 240, "palette_png", scene)
    return record, lambda p: paletted.save(p, "PNG", optimize=True)


def _odd_gray16(rng: np.random.Generator) -> tuple[ImageRecord, Saver]:
    scene = render_scene(
        rng, 256, 256, Background("light gray", "plain"), n_objects=3, palette=ACHROMATIC_COLORS
    )
    wide = np.asarray(scene.image.convert("L")).astype(np.uint16) * 257  # full 16-bit range
    gray16 = Image.fromarray(wide)  # mode I;16
    return ImageRecord("odd_gray16.png", 256, 256, "gray16_png", scene), lambda p: gray16.save(p, "PNG")


def _odd_cmyk(rng: np.random.Generator) -> tuple[ImageRecord, Saver]:
    scene = render_scene(rng, 320, 320, Background("light blue", "plain"), n_objects=4)
    cmyk = scene.image.convert("CMYK")
    return ImageRecord("odd_cmyk.jpg", 320, 320, "cmyk_jpeg", scene), lambda p: _save_jpeg(cmyk, p)


def _odd_exif(orientation: int, width: int, height: int) -> OddMaker:
    """Pixels are stored rotated; only applying the EXIF orientation shows the upright scene."""
    # exif_transpose undoes 6 with a 270-degree turn and 8 with a 90-degree turn; store the inverse.
    store = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation]

    def make(rng: np.random.Generator) -> tuple[ImageRecord, Saver]:
        scene = render_scene(rng, width, height, Background("pale green", "plain"), n_objects=4)
        stored = scene.image.transpose(store)
        exif = Image.Exif()
        exif[EXIF_ORIENTATION_TAG] = orientation
        name = f"odd_exif_rot{orientation}.jpg"
        record = ImageRecord(name, width, height, f"exif_orientation_{orientation}", scene)
        return record, lambda p: _save_jpeg(stored, p, exif=exif.tobytes())

    return make


def _odd_tiny(rng: np.random.Generator) -> tuple[ImageRecord, Saver]:
    scene = render_scene(
        rng, 48, 40, Background("light gray", "plain"), n_objects=2, sizes=("medium", "large")
    )
    return ImageRecord("odd_tiny.jpg", 48, 40, "tiny", scene), lambda p: _save_jpeg(scene.image, p)


def _odd_huge(rng: np.random.Generator) -> tuple[ImageRecord, Saver]:
    scene = render_scene(rng, 4000, 3000, Background("light gray", "plain"), n_objects=4)
    return ImageRecord("odd_huge.jpg", 4000, 3000, "huge", scene), lambda p: _save_jpeg(scene.image, p)


def _odd_panorama(rng: np.random.Generator) -> tuple[ImageRecord, Saver]:
    scene = render_scene(rng, 1600, 200, Background("dark blue", "gradient"), n_objects=6)
    record = ImageRecord("odd_panorama.jpg", 1600, 200, "panorama", scene)
    return record, lambda p: _save_jpeg(scene.image, p)


ODD_MAKERS: tuple[OddMaker, ...] = (
    _odd_grayscale,
    _odd_rgba,
    _odd_palette,
    _odd_gray16,
    _odd_cmyk,
    _odd_exif(6, 400, 300),
    _odd_exif(8, 360, 240),
    _odd_tiny,
    _odd_huge,
    _odd_panorama,
)


# ---------------------------------------------------------------------------------------------
# Fixture assembly


def _coco(records: Sequence[ImageRecord], seed: int) -> dict:
    """COCO ground truth; width/height and boxes are in the displayed (EXIF-applied) orientation."""
    images, annotations = [], []
    for image_id, rec in enumerate(records, start=1):
        images.append(
            {
                "id": image_id,
                "file_name": rec.file_name,
                "width": rec.width,
                "height": rec.height,
                "caption": rec.scene.caption(),
                "variant": rec.variant,
                "background": rec.scene.background.phrase().removeprefix("a "),
            }
        )
        for obj in rec.scene.objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": CATEGORIES.index(obj.shape) + 1,
                    "bbox": list(obj.bbox),
                    "area": obj.area,
                    "iscrowd": 0,
                    "attributes": {"color": obj.color, "size": obj.size},
                }
            )
    return {
        "info": {
            "description": "Rexverse synthetic shapes test fixture",
            "version": GENERATOR_VERSION,
            "generator": "scaffold/make_fixture.py",
            "seed": seed,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CATEGORIES)
        ],
    }


ODD_NOTES: dict[str, str] = {
    "grayscale_jpeg": "mode L JPEG (black/gray/white objects)",
    "rgba_png": "RGBA PNG, transparent background (alpha 0), opaque objects",
    "palette_png": "mode P PNG (16-colour palette, exact colours)",
    "gray16_png": "16-bit grayscale PNG, mode I;16 (values scaled by 257; naive 8-bit conversion clips)",
    "cmyk_jpeg": "CMYK JPEG",
    "exif_orientation_6": "JPEG with EXIF orientation 6; pixels stored rotated, 300x400 on disk",
    "exif_orientation_8": "JPEG with EXIF orientation 8; pixels stored rotated, 240x360 on disk",
    "tiny": "48x40 JPEG",
    "huge": "4000x3000 JPEG, plain background so it stays small on disk",
    "panorama": "1600x200 JPEG panorama",
}


def _readme(records: Sequence[ImageRecord], seed: int) -> str:
    n_scenes = sum(r.variant == "scene" for r in records)
    odd_lines = "\n".join(
        f"  - `{r.file_name}`: {ODD_NOTES[r.variant]}" for r in records if r.variant != "scene"
    )
    return f"""# Synthetic shapes test fixture

Generated by `scaffold/make_fixture.py` (version {GENERATOR_VERSION}, seed {seed}); do not edit by hand.
Rebuild with:

    python scaffold/make_fixture.py --out tests/fixtures/fixture100 --n {len(records)} --seed {seed}

`tests/test_fixture.py` regenerates it and compares the sha256 of every file, so drift fails the tests.

Contents:

- {n_scenes} scenes `scene_NNN.jpg` (JPEG quality {JPEG_QUALITY}) and `scene_NNN.png`, 192-512 px per
  side: 1-6 shapes ({", ".join(CATEGORIES)}) in named colours and three size classes, on plain,
  gradient or lightly textured backgrounds, some partially overlapping.
- {len(records) - n_scenes} odd but valid images that a robust loader must handle:
{odd_lines}
- `annotations.json`: COCO ground truth (loads with `pycocotools.coco.COCO`). Image width/height and
  boxes are in the displayed orientation (after applying EXIF orientation); boxes are the visible
  extent of each object. Each annotation has `attributes` `color` and `size` (small/medium/large);
  each image has a reference `caption`, a `variant` and a `background`.
"""


def build_records(n: int, seed: int) -> list[tuple[ImageRecord, Saver]]:
    """Odd images use fixed child seeds so n changes only how many scenes there are."""
    n_scenes = n - len(ODD_MAKERS)
    if n_scenes < 0:
        raise ValueError(f"n must be at least {len(ODD_MAKERS)} (the odd images)")
    built = [_scene_record(np.random.default_rng([seed, 0, i]), i) for i in range(n_scenes)]
    built += [make(np.random.default_rng([seed, 1, k])) for k, make in enumerate(ODD_MAKERS)]
    return built


def generate_fixture(out_dir: Path, n: int = 100, seed: int = 0) -> dict:
    """Write images, annotations.json and README.md into out_dir; returns the COCO dict."""
    out_dir.mkdir(parents=True, exist_ok=True)
    built = build_records(n, seed)
    for record, save in built:
        save(out_dir / record.file_name)
    records = [record for record, _ in built]
    _remove_stale(out_dir, {r.file_name for r in records})
    coco = _coco(records, seed)
    (out_dir / "annotations.json").write_text(json.dumps(coco, indent=1) + "\n", encoding="utf-8")
    (out_dir / "README.md").write_text(_readme(records, seed), encoding="utf-8")
    return coco


def _remove_stale(out_dir: Path, keep: set[str]) -> None:
    """Drop images from an earlier run with a larger n, so the folder matches annotations.json."""
    for path in sorted(out_dir.glob("scene_*")) + sorted(out_dir.glob("odd_*")):
        if path.is_file() and path.name not in keep:
            path.unlink()


# ---------------------------------------------------------------------------------------------
# Bad inputs (for tests; never committed)

BOMB_SIZE = (60000, 60000)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def bomb_png_bytes(width: int, height: int, rows: int = 16) -> bytes:
    """A PNG whose IHDR claims width x height but whose IDAT holds only a few rows (a few KB)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    scanlines = bytes(rows * (width + 1))  # filter byte 0 + zero pixels per row
    return (
        PNG_SIGNATURE
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(scanlines, 9))
        + _png_chunk(b"IEND", b"")
    )


def _jpeg_bytes(image_path: Path) -> bytes:
    """The file itself when it is a JPEG, else a JPEG re-encoding of it."""
    data = image_path.read_bytes()
    if data[:2] == b"\xff\xd8":
        return data
    buffer = BytesIO()
    with Image.open(image_path) as im:
        _save_jpeg(im.convert("RGB"), buffer)
    return buffer.getvalue()


def _scan_start(jpeg: bytes) -> int:
    """Offset of the first byte of entropy-coded data (just past the first SOS segment)."""
    sos = jpeg.find(b"\xff\xda")
    if sos < 0:
        raise ValueError("no SOS marker in JPEG")
    (length,) = struct.unpack(">H", jpeg[sos + 2 : sos + 4])
    return sos + 2 + length


def corrupt_middle(jpeg: bytes, seed: int = 1234) -> bytes:
    """Overwrite the middle third of the scan data with seeded noise; headers stay valid."""
    start = _scan_start(jpeg)
    scan_len = len(jpeg) - 2 - start
    lo = start + scan_len // 3
    hi = start + 2 * scan_len // 3
    noise = np.random.default_rng(seed).integers(0, 256, hi - lo, dtype=np.uint8).tobytes()
    return jpeg[:lo] + noise + jpeg[hi:]


def write_bad_inputs(out_dir: Path, good_image: Path) -> dict[str, str]:
    """Write broken/hostile inputs a loader must reject or flag; returns {file_name: kind}."""
    out_dir = Path(out_dir)
    good_image = Path(good_image)
    out_dir.mkdir(parents=True, exist_ok=True)
    jpeg = _jpeg_bytes(good_image)
    contents: dict[str, tuple[bytes, str]] = {
        "truncated.jpg": (jpeg[: len(jpeg) * 2 // 5], "truncated"),
        "empty.jpg": (b"", "empty"),
        "not_an_image.jpg": (b"This is a plain text file, not a JPEG.\n" * 4, "not_an_image"),
        "bomb.png": (bomb_png_bytes(*BOMB_SIZE), "decompression_bomb"),
        "corrupt_middle.jpg": (corrupt_middle(jpeg), "corrupt"),
    }
    for name, (data, _) in contents.items():
        (out_dir / name).write_bytes(data)
    duplicate = f"duplicate_{good_image.stem}{good_image.suffix}"
    shutil.copyfile(good_image, out_dir / duplicate)
    kinds = {name: kind for name, (_, kind) in contents.items()}
    kinds[duplicate] = "duplicate"
    return kinds


# ---------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/fixture100"))
    parser.add_argument("--n", type=int, default=100, help="total images, including the odd ones")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    coco = generate_fixture(args.out, n=args.n, seed=args.seed)
    total = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    print(
        f"wrote {len(coco['images'])} images, {len(coco['annotations'])} boxes "
        f"to {args.out} ({total / 1e6:.2f} MB)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
