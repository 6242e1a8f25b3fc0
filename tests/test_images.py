"""Decoding untrusted bytes: odd but valid images normalise correctly, bad input rejects with a reason."""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.images import DecodeLimits, ImageRejected, decode
from scaffold.make_fixture import write_bad_inputs

FIXTURE = Path(__file__).parent / "fixtures" / "fixture100"
LIMITS = DecodeLimits(
    max_bytes=1 << 24, max_pixels=20_000_000, min_side=32, max_aspect=20, keep_lossless=True
)


def test_plain_rgb_jpeg_is_kept_byte_for_byte():
    data = (FIXTURE / "scene_000.jpg").read_bytes()
    out = decode(data, LIMITS)
    assert out.data == data and out.ext == "jpg" and not out.reencoded


@pytest.mark.parametrize(
    "name, size, ext",
    [
        ("odd_exif_rot6.jpg", (400, 300), "jpg"),
        ("odd_exif_rot8.jpg", (360, 240), "jpg"),
        ("odd_rgba.png", (300, 300), "png"),
        ("odd_palette.png", (360, 240), "png"),
        ("odd_gray16.png", (256, 256), "png"),
        ("odd_grayscale.jpg", (320, 256), "jpg"),
        ("odd_cmyk.jpg", (320, 320), "jpg"),
    ],
)
def test_odd_images_become_upright_rgb(name, size, ext):
    out = decode((FIXTURE / name).read_bytes(), LIMITS)
    image = Image.open(io.BytesIO(out.data))
    assert out.reencoded and out.ext == ext
    assert image.mode == "RGB" and image.size == size == (out.width, out.height)
    assert image.getexif().get(0x0112, 1) == 1


def test_default_output_is_jpeg_only():
    limits = DecodeLimits(max_bytes=1 << 24, max_pixels=20_000_000, min_side=32, max_aspect=20)
    png = next(FIXTURE.glob("scene_*.png"))
    out = decode(png.read_bytes(), limits)
    assert out.ext == "jpg" and out.reencoded and out.data[:2] == b"\xff\xd8"
    assert decode(png.read_bytes(), LIMITS).data == png.read_bytes()  # keep_lossless keeps PNG bytes


def test_sixteen_bit_grey_is_scaled_not_clipped():
    out = decode((FIXTURE / "odd_gray16.png").read_bytes(), LIMITS)
    values = Image.open(io.BytesIO(out.data)).convert("L").getextrema()
    assert values[1] > 200 and values[0] < values[1]


def test_rgba_transparency_becomes_white():
    out = decode((FIXTURE / "odd_rgba.png").read_bytes(), LIMITS)
    assert Image.open(io.BytesIO(out.data)).getpixel((0, 0)) == (255, 255, 255)


def test_bad_inputs_reject_with_reasons(tmp_path):
    kinds = write_bad_inputs(tmp_path, FIXTURE / "scene_000.jpg")
    expected = {
        "truncated": "corrupt image",
        "empty": "empty file",
        "not_an_image": "not an image",
        "decompression_bomb": "too many pixels",
        "corrupt": "corrupt image",
    }
    for name, kind in kinds.items():
        if kind == "duplicate":
            continue
        with pytest.raises(ImageRejected) as info:
            decode((tmp_path / name).read_bytes(), LIMITS)
        assert str(info.value).startswith(expected[kind]), (name, info.value)


def test_pixel_bound_is_checked_before_decoding():
    big = Image.new("RGB", (3000, 3000))
    buffer = io.BytesIO()
    big.save(buffer, format="PNG")
    limits = DecodeLimits(max_bytes=1 << 24, max_pixels=1_000_000, min_side=1, max_aspect=20)
    with pytest.raises(ImageRejected, match="too many pixels: 3000x3000"):
        decode(buffer.getvalue(), limits)


def test_size_rules():
    tiny = decode((FIXTURE / "odd_tiny.jpg").read_bytes(), LIMITS)
    assert (tiny.width, tiny.height) == (48, 40)
    with pytest.raises(ImageRejected, match="too small"):
        decode((FIXTURE / "odd_tiny.jpg").read_bytes(), DecodeLimits(1 << 24, 10**8, 64, 20))
    with pytest.raises(ImageRejected, match="extreme aspect"):
        decode((FIXTURE / "odd_panorama.jpg").read_bytes(), DecodeLimits(1 << 24, 10**8, 32, 4))
    with pytest.raises(ImageRejected, match="file too large"):
        decode((FIXTURE / "odd_huge.jpg").read_bytes(), DecodeLimits(1000, 10**8, 32, 20))


def test_decode_measures_the_pixel_spread_of_the_stored_pixels():
    """Decode takes collect's near-constant statistic while it holds the pixels: the same value the
    statistic gives on the stored image, near 0 for a flat image (JPEG noise and all), high for content."""
    from engine.images import load_rgb, pixel_std

    flat = io.BytesIO()
    Image.new("RGB", (300, 200), (90, 140, 200)).save(flat, "JPEG", quality=90)
    assert decode(flat.getvalue(), LIMITS).pixel_std < 1.0
    for name in ("scene_000.jpg", "odd_exif_rot6.jpg", "odd_palette.png"):
        out = decode((FIXTURE / name).read_bytes(), LIMITS)
        # re-encoding (rotated, palette) moves the statistic only a little
        assert out.pixel_std == pytest.approx(pixel_std(load_rgb(out.data)), abs=1.0)
        assert out.pixel_std > 10


def test_the_sampled_pixel_spread_estimates_the_spread_of_every_pixel():
    """`pixel_std` looks at 256 pixels: on real images it stays within a few levels of the standard
    deviation of all of them; the sample grid keeps the image's aspect, and a small image is taken whole."""
    from engine.images import SAMPLE_PIXELS, load_rgb, pixel_std, sample_size

    for name in ("scene_000.jpg", "scene_001.jpg", "odd_exif_rot6.jpg", "odd_palette.png"):
        image = load_rgb((FIXTURE / name).read_bytes())
        full = float(np.asarray(image, dtype=np.float64).reshape(-1, 3).std(axis=0).max())
        assert pixel_std(image) == pytest.approx(full, rel=0.15), name
    for width, height in ((256, 256), (4000, 3000), (20, 400), (400, 20), (1, 1), (10, 12), (15, 17)):
        columns, rows = sample_size(width, height)
        assert 1 <= columns <= width and 1 <= rows <= height and columns * rows <= SAMPLE_PIXELS
        if width * height <= SAMPLE_PIXELS:
            assert (columns, rows) == (width, height)  # small images: every pixel


def test_pixel_spreads_of_a_batch_of_samples_of_different_sizes():
    """One numpy pass over samples of different lengths (aspect ratios, tiny images) gives each sample the
    largest per-channel standard deviation of its own pixels: nothing leaks between neighbours."""
    from engine.images import pixel_spreads, sample_pixels

    rng = np.random.default_rng(0)
    sizes = ((300, 40), (1, 1), (9, 7))
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    images += [Image.new("RGB", (640, 480), (12, 200, 40)), Image.new("L", (50, 60), 77)]
    samples = [sample_pixels(image) for image in images]
    expected = [
        float(np.frombuffer(sample, dtype=np.uint8).reshape(-1, 3).astype(np.float64).std(axis=0).max())
        for sample in samples
    ]
    assert pixel_spreads(samples) == pytest.approx(expected, abs=1e-9)
    assert pixel_spreads(samples)[1] == 0.0 and pixel_spreads(samples)[3] == 0.0  # one pixel; one colour
    assert [len(sample) // 3 for sample in samples[1:3]] == [1, 63]  # small images: every pixel
    assert pixel_spreads([]) == []


def test_the_decode_stage_records_each_images_pixel_spread_batch_or_not(tmp_path):
    """Decode measures the statistic for a whole batch at once: each record gets its own image's value,
    the same as measuring that image alone, and rejected images get none."""
    from engine.images import load_rgb, pixel_std
    from engine.items import batch_to_items
    from engine.sources import list_inputs, listing_table
    from stages.decode import Decode, DecodeConfig

    Image.new("RGB", (300, 200), (90, 140, 200)).save(tmp_path / "flat.jpg", quality=90)
    for name in ("scene_000.jpg", "scene_001.jpg", "odd_palette.png"):
        (tmp_path / name).write_bytes((FIXTURE / name).read_bytes())
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    table = listing_table(list_inputs([str(tmp_path)]))
    batch = {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}
    items = batch_to_items(Decode(DecodeConfig(), claim=lambda pairs: [None] * len(pairs))(batch))
    spreads = {Path(i.uri).name: i.record["provenance"]["decode"]["pixel_std"] for i in items if i.ok}
    assert set(spreads) == {"flat.jpg", "scene_000.jpg", "scene_001.jpg", "odd_palette.png"}
    for item in items:
        if item.ok:  # re-encoded images (the palette PNG) were measured before their JPEG encoding
            alone = round(pixel_std(load_rgb(item.image)), 3)
            reencoded = item.record["provenance"]["decode"]["reencoded"]
            assert spreads[Path(item.uri).name] == (pytest.approx(alone, abs=2.0) if reencoded else alone)
    assert spreads["flat.jpg"] < 1.0 < 10 < min(spreads["scene_000.jpg"], spreads["scene_001.jpg"])
