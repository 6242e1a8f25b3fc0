"""Read, hash, de-duplicate, decode and validate each input image (the first stage, no model).

Everything that can go wrong with untrusted input ends here as a reject with a reason: unreadable,
oversized, empty, not an image, truncated, decompression bomb, too small, duplicate bytes.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Protocol

from engine.config import DecodeConfig
from engine.images import DecodeLimits, ImageRejected, decode
from engine.input_text import decode_text
from engine.items import Item, items_to_batch
from engine.sources import ReadError, read_bytes
from schemas import SCHEMA_VERSION

NAME = "decode"


class Claimer(Protocol):
    def __call__(self, pairs: list[tuple[str, str]]) -> list[str | None]: ...


def ray_claimer(registry_name: str, namespace: str) -> Claimer:
    """A claim function backed by the named registry actor of this run."""
    import ray

    handle = ray.get_actor(registry_name, namespace=namespace)
    return lambda pairs: ray.get(handle.claim.remote(pairs))


class Decode:
    """Callable per design §4; `claim` comes from a registry (in-process) or `registry_name` (Ray actor)."""

    def __init__(
        self,
        cfg: DecodeConfig,
        claim: Claimer | None = None,
        registry_name: str | None = None,
        namespace: str = "",
    ) -> None:
        self.cfg = cfg
        self.limits = DecodeLimits(
            max_bytes=cfg.max_bytes,
            max_pixels=cfg.max_pixels,
            min_side=cfg.min_side,
            max_aspect=cfg.max_aspect,
            jpeg_quality=cfg.reencode_jpeg_quality,
            keep_lossless=cfg.output_format == "keep",
        )
        if claim is None:
            if registry_name is None:
                raise ValueError("Decode needs a claim function or a registry actor name")
            claim = ray_claimer(registry_name, namespace)
        self.claim = claim

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        items = [self._read(batch, i) for i in range(len(batch["uri"]))]
        fresh = [i for i, item in enumerate(items) if item.ok]
        owners = self.claim([(items[i].key, items[i].uri) for i in fresh]) if fresh else []
        for i, owner in zip(fresh, owners, strict=True):
            if owner is not None:
                items[i].reject(NAME, f"duplicate: same bytes as {owner}")
            else:
                text = batch["text"][i] if "text" in batch else ""
                self._decode(items[i], str(batch["dataset"][i]), str(text or ""))
        seconds = (time.perf_counter() - start) / max(len(items), 1)
        for item in items:
            item.trace[NAME] = {"seconds": seconds, "in": 0, "out": 0}
        return items_to_batch(items)

    def _read(self, batch: dict[str, Any], i: int) -> Item:
        uri = str(batch["uri"][i])
        item = Item(key="", uri=uri, image=b"", record=None)
        try:
            data = read_bytes(
                str(batch["path"][i]), int(batch["offset"][i]), int(batch["size"][i]), self.cfg.max_bytes
            )
        except ReadError as exc:
            item.reject(NAME, str(exc))
            return item
        item.key = hashlib.sha256(data).hexdigest()
        item.image = data
        return item

    def _decode(self, item: Item, dataset: str, text: str = "") -> None:
        try:
            image = decode(item.image, self.limits)
        except ImageRejected as exc:
            item.reject(NAME, str(exc))
            return
        item.image = image.data
        own = decode_text(text)  # the input's own caption / conversation (stages.caption.source uses it)
        turns = own.get("conversation")
        item.record = {
            "key": item.key,
            "schema_version": SCHEMA_VERSION,
            "source": {"uri": item.uri, "dataset": dataset},
            "width": image.width,
            "height": image.height,
            "image_ext": image.ext,
            "caption": {"text": "", "model": "", "input": own.get("caption")},
            "phrases": [],
            "regions": [],
            "grounded_caption": None,
            "grounded_conversation": [t | {"spans": []} for t in turns] if turns else None,
            "proposals": [],
            "dropped": [],
            "provenance": {NAME: {"reencoded": image.reencoded}},
        }
