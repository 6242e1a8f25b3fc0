"""Decode and normalise untrusted image bytes, with bounds checked before any pixel is decoded.

The stored image is what every box refers to, so it is the *displayed* image: EXIF orientation applied,
converted to RGB. Bytes are kept as-is when that is already true (no re-encoding loss), otherwise the
normalised pixels are re-encoded (PNG when the source was lossless, JPEG otherwise).
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

LOSSLESS_FORMATS = {"PNG", "BMP", "GIF", "TIFF", "WEBP"}
# `open_image` bounds the pixel count itself (decode.max_pixels) before any pixel is decoded, so PIL's own
# warning for big images says nothing new. Filtered once here: a `catch_warnings` block per image costs
# more than hashing it.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageRejected(Exception):
    """The image is unusable; the message is the reject reason shown to users."""


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int
    max_pixels: int
    min_side: int
    max_aspect: float
    jpeg_quality: int = 95
    keep_lossless: bool = False


@dataclass
class DecodedImage:
    data: bytes
    ext: str
    width: int
    height: int
    reencoded: bool
    sample: bytes  # `sample_pixels` of the stored pixels (for collect's near-constant check)

    @property
    def pixel_std(self) -> float:
        return pixel_spreads([self.sample])[0]


# Pixel statistics are estimated from a regular sample of at most this many pixels (see `sample_pixels`).
SAMPLE_PIXELS = 256


def sample_size(width: int, height: int, pixels: int = SAMPLE_PIXELS) -> tuple[int, int]:
    """A grid of at most `pixels` points with the image's aspect ratio (the whole image when smaller)."""
    columns = max(1, min(width, int(math.sqrt(pixels * width / height))))
    return columns, max(1, min(height, pixels // columns))


def sample_pixels(image: Image.Image) -> bytes:
    """The RGB bytes of a regular nearest-neighbour sample of at most `SAMPLE_PIXELS` of the image's pixels:
    what `pixel_spreads` needs, taken while the pixels are at hand.

    A sample, not every pixel (nor a box-filtered copy): anything that reads every pixel again costs about
    a third of the decode itself. 256 pixels estimate a standard deviation to about 5 % (relative), plenty
    for a threshold near 2 levels. The pixels themselves, not PIL's histogram: its list of 768 ints costs
    more to make and turn into bytes than the sample.
    """
    width, height = image.size
    sample = image.resize(sample_size(width, height), Image.Resampling.NEAREST)
    rgb = sample if sample.mode == "RGB" else sample.convert("RGB")
    return rgb.tobytes()


def pixel_spreads(samples: Sequence[bytes]) -> list[float]:
    """For each `sample_pixels`, the largest per-channel standard deviation (levels 0-255) of its pixels:
    near 0 for a constant image. Per channel, not of grey levels: a yellow shape on a grey background can
    have the same luminance. One numpy pass for a whole batch: per image, numpy's calls would cost more
    than the statistic."""
    if not samples:
        return []
    counts = np.fromiter((len(sample) // 3 for sample in samples), dtype=np.int64, count=len(samples))
    pixels = np.frombuffer(b"".join(samples), dtype=np.uint8).reshape(-1, 3).astype(np.float64)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))  # where each sample's pixels begin
    sums = np.add.reduceat(pixels, starts, axis=0)  # per image and channel (exact in float64)
    squares = np.add.reduceat(pixels * pixels, starts, axis=0)
    n = counts[:, None].astype(np.float64)
    variance = (squares * n - sums * sums) / (n * n)
    return np.sqrt(np.maximum(variance.max(axis=1), 0.0)).tolist()


def pixel_std(image: Image.Image) -> float:
    """`pixel_spreads` of one image."""
    return pixel_spreads([sample_pixels(image)])[0]


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white, 16-bit grey is scaled, not clipped."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        scaled = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(scaled).convert("RGB")
    return image.convert("RGB")


@dataclass
class OpenedImage:
    image: Image.Image  # upright (EXIF orientation applied), mode as stored
    format: str
    orientation: int


def open_image(data: bytes, limits: DecodeLimits) -> OpenedImage:
    """Open and fully decode `data` as an upright image, or raise ImageRejected with the reason."""
    if len(data) == 0:
        raise ImageRejected("empty file: 0 bytes")
    if len(data) > limits.max_bytes:
        raise ImageRejected(f"file too large: {len(data)} bytes > decode.max_bytes={limits.max_bytes}")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageRejected(f"too many pixels: {exc}") from None
    except UnidentifiedImageError:
        raise ImageRejected("not an image: unknown or unsupported format") from None
    except Exception as exc:  # PIL raises many types for broken headers
        raise ImageRejected(f"not an image: {type(exc).__name__}: {exc}") from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageRejected(
            f"too many pixels: {width}x{height} > decode.max_pixels={limits.max_pixels} "
            "(possible decompression bomb)"
        )
    fmt = (image.format or "").upper()
    try:
        orientation = int(image.getexif().get(0x0112, 1) or 1)
        image.load()
        # exif_transpose copies every image it does not turn: only call it for the ones it turns
        upright = ImageOps.exif_transpose(image) if orientation not in (0, 1) else image
    except Exception as exc:
        raise ImageRejected(f"corrupt image: {type(exc).__name__}: {exc}") from None
    return OpenedImage(upright, fmt, orientation)


def decode(data: bytes, limits: DecodeLimits) -> DecodedImage:
    """Validate and normalise; bytes stay untouched when the source is already an upright RGB JPEG.

    Other images are re-encoded as JPEG, or as PNG when `keep_lossless` and the source was lossless.
    """
    opened = open_image(data, limits)
    source, fmt = opened.image, opened.format
    width, height = source.size
    if min(width, height) < limits.min_side:
        raise ImageRejected(f"too small: {width}x{height} < decode.min_side={limits.min_side}")
    if max(width, height) / min(width, height) > limits.max_aspect:
        raise ImageRejected(f"extreme aspect ratio: {width}x{height} > decode.max_aspect={limits.max_aspect}")
    upright_rgb = source.mode == "RGB" and opened.orientation in (0, 1)
    if upright_rgb and (fmt == "JPEG" or (fmt == "PNG" and limits.keep_lossless)):
        ext = "jpg" if fmt == "JPEG" else "png"
        return DecodedImage(data, ext, width, height, reencoded=False, sample=sample_pixels(source))
    rgb = _to_rgb(source)
    buffer = io.BytesIO()
    if fmt in LOSSLESS_FORMATS and limits.keep_lossless:
        rgb.save(buffer, format="PNG", optimize=False)
        ext = "png"
    else:
        rgb.save(buffer, format="JPEG", quality=limits.jpeg_quality)
        ext = "jpg"
    return DecodedImage(buffer.getvalue(), ext, width, height, reencoded=True, sample=sample_pixels(rgb))


def load_rgb(data: bytes, max_side: int | None = None) -> Image.Image:
    """Decode already-normalised bytes (from `decode`) for a model, optionally shrunk to `max_side`.

    Returns the image and never changes coordinates: callers scale boxes by size ratio when they shrink.
    """
    image = Image.open(io.BytesIO(data))
    if max_side and max(image.size) > max_side:
        image.draft("RGB", (max_side, max_side))  # cheap JPEG downscale while decoding
        image = image.convert("RGB")
        image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        return image
    return image.convert("RGB")
