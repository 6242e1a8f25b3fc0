"""Read, hash, de-duplicate, decode and validate each input image (the first stage, no model).

Everything that can go wrong with untrusted input ends here as a reject with a reason: unreadable,
oversized, empty, not an image, truncated, decompression bomb, too small, duplicate bytes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal, Protocol

from pydantic import Field

from engine.config import Resources, Strict
from engine.images import DecodeLimits, ImageRejected, decode
from engine.input_text import MAX_TEXT_BYTES, decode_text, sample_text
from engine.items import Item, items_to_batch
from engine.sources import LISTING_SCHEMA, ReadError, read_bytes, sidecar_path
from engine.stage import RunContext, Stage
from schemas import SCHEMA_VERSION

NAME = "decode"


class DecodeConfig(Strict):
    """Bounds for untrusted image input."""

    max_bytes: int = Field(64 * 1024 * 1024, ge=1)
    max_pixels: int = Field(50_000_000, ge=1)
    min_side: int = Field(32, ge=1)
    max_aspect: float = Field(20.0, ge=1.0)
    reencode_jpeg_quality: int = Field(95, ge=50, le=100)
    # "jpg": one image format per shard (stock webdataset decoders expect it; upright RGB JPEGs stay
    # byte-identical, everything else is re-encoded). "keep": lossless sources are stored as PNG.
    output_format: Literal["jpg", "keep"] = "jpg"
    resources: Resources = Resources(batch_size=16, num_cpus=0.25)


class Claimer(Protocol):
    def __call__(self, pairs: list[tuple[str, str]]) -> list[str | None]: ...


def ray_claimer(registry_name: str, namespace: str) -> Claimer:
    """A claim function backed by the named registry actor of this run."""
    import ray

    handle = ray.get_actor(registry_name, namespace=namespace)
    return lambda pairs: ray.get(handle.claim.remote(pairs))


class Decode(Stage):
    """The first stage: listing rows (where the bytes are) in, items out (a record or a reject each).

    `claim` comes from a registry (in-process) or `registry_name` (the run's Ray actor).
    """

    name = NAME
    config_class = DecodeConfig
    unit = ""

    def __init__(
        self,
        cfg: DecodeConfig,
        claim: Claimer | None = None,
        registry_name: str | None = None,
        namespace: str = "",
    ) -> None:
        super().__init__(cfg)
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
        self._where: dict[str, dict[str, Any]] = {}

    @classmethod
    def constructor_kwargs(cls, cfg: DecodeConfig, context: RunContext) -> dict[str, Any]:
        if context.registry is not None:
            return {"cfg": cfg, "claim": context.registry.claim}
        return {"cfg": cfg, "registry_name": context.registry_name, "namespace": context.namespace}

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """`batch` holds listing columns (`engine.sources.LISTING_SCHEMA`), not items."""
        columns = {name: batch[name] for name in LISTING_SCHEMA.names}
        self._where = {
            str(uri): {name: columns[name][i] for name in columns} for i, uri in enumerate(columns["uri"])
        }
        items = [Item(key="", uri=uri, image=b"", record=None) for uri in self._where]
        self.run(items)
        return items_to_batch(items)

    def process(self, items: list[Item]) -> None:
        for item in items:
            self._read(item)
        fresh = [item for item in items if item.ok]
        owners = self.claim([(item.key, item.uri) for item in fresh]) if fresh else []
        for item, owner in zip(fresh, owners, strict=True):
            if owner is not None:
                item.reject(NAME, f"duplicate: same bytes as {owner}")
            else:
                self._decode(item, str(self._where[item.uri]["dataset"]), self._input_text(item.uri))

    def _input_text(self, uri: str) -> str:
        """The input's own caption/conversation: listed with it, or read here from its sample's `.txt` /
        `.json` (members of its webdataset sample, or files beside it in a folder or prefix; workers read
        the bytes, the driver only noted where they are and how big)."""
        where = self._where[uri]
        if where.get("text"):
            return str(where["text"])
        siblings = json.loads(where.get("siblings") or "{}")
        path = str(where["path"])
        in_tar = int(where["offset"]) >= 0
        members = {}
        for ext in ("txt", "json"):
            if ext in siblings and siblings[ext][1] <= MAX_TEXT_BYTES:
                offset, size = siblings[ext]
                try:
                    if in_tar:
                        members[ext] = read_bytes(path, offset, size, MAX_TEXT_BYTES)
                    else:  # the file may have changed since listing: its size is checked again on reading
                        members[ext] = read_bytes(sidecar_path(path, ext), -1, -1, MAX_TEXT_BYTES)
                except ReadError:
                    continue  # an unreadable caption is no caption; the image itself was fine
        return sample_text(members) if members else ""

    def _read(self, item: Item) -> None:
        where = self._where[item.uri]
        try:
            data = read_bytes(
                str(where["path"]),
                int(where["offset"]),
                int(where["size"]),
                self.cfg.max_bytes,
                problem=str(where["problem"] or ""),
            )
        except ReadError as exc:
            item.reject(NAME, str(exc))
            return
        item.key = hashlib.sha256(data).hexdigest()
        item.image = data

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
