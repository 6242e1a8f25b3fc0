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
from engine.images import DecodeLimits, ImageRejected, decode, pixel_spreads
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


def ray_claimer(registry_names: list[str], namespace: str) -> Claimer:
    """A claim function backed by the named key-table partition actors of this run (in parallel)."""
    import ray

    from engine.dedupe import partitioned_claim

    handles = [ray.get_actor(name, namespace=namespace) for name in registry_names]
    return partitioned_claim([handle.claim.remote for handle in handles], resolve=ray.get)


class Decode(Stage):
    """The first stage: listing rows (where the bytes are) in, items out (a record or a reject each).

    `claim` comes from a registry (in-process) or `registry_names` (the run's key-table actors).
    """

    name = NAME
    config_class = DecodeConfig
    unit = ""

    def __init__(
        self,
        cfg: DecodeConfig,
        claim: Claimer | None = None,
        registry_names: list[str] | None = None,
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
            if not registry_names:
                raise ValueError("Decode needs a claim function or the key table's actor names")
            claim = ray_claimer(registry_names, namespace)
        self.claim = claim
        self._where: dict[str, dict[str, Any]] = {}

    @classmethod
    def constructor_kwargs(cls, cfg: DecodeConfig, context: RunContext) -> dict[str, Any]:
        if context.registry is not None:
            return {"cfg": cfg, "claim": context.registry.claim}
        return {"cfg": cfg, "registry_names": context.registry_names, "namespace": context.namespace}

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return items_to_batch(self.run_columns(batch))

    def run_columns(self, batch: dict[str, Any]) -> list[Item]:
        """`batch` holds listing columns (`engine.sources.LISTING_SCHEMA`), not items; rows read by a work
        unit's worker (`engine.units.ROW_SCHEMA`) also carry their bytes (`data`), source and ordinal."""
        names = [name for name in (*LISTING_SCHEMA.names, "data", "source", "ordinal") if name in batch]
        return self.run_rows([{name: batch[name][i] for name in names} for i in range(len(batch["uri"]))])

    def run_rows(self, rows: list[dict[str, Any]]) -> list[Item]:
        """The same as row dicts (a source worker reads them so: no columns in between)."""
        items = [
            Item(
                key="",
                uri=str(row["uri"]),
                image=b"",
                record=None,
                source=str(row.get("source") or ""),
                ordinal=int(row["ordinal"]) if row.get("ordinal") is not None else -1,
            )
            for row in rows
        ]
        self._where = {id(item): row for item, row in zip(items, rows, strict=True)}
        self.run(items)
        return items

    def process(self, items: list[Item]) -> None:
        for item in items:
            self._read(item)
        fresh = [item for item in items if item.ok]
        owners = self.claim([(item.key, item.uri) for item in fresh]) if fresh else []
        decoded = []
        for item, owner in zip(fresh, owners, strict=True):
            if owner is not None:
                item.reject(NAME, f"duplicate: same bytes as {owner}")
                continue
            sample = self._decode(item, str(self._where[id(item)]["dataset"]), self._input_text(item))
            if sample is not None:
                decoded.append((item, sample))
        # collect's near-constant statistic, for the whole batch at once (engine.images.pixel_spreads)
        spreads = pixel_spreads([sample for _, sample in decoded])
        for (item, _), spread in zip(decoded, spreads, strict=True):
            item.record["provenance"][NAME]["pixel_std"] = round(spread, 3)  # type: ignore[index]

    def _input_text(self, item: Item) -> str:
        """The input's own caption/conversation: listed with it, or read here from its sample's `.txt` /
        `.json` (members of its webdataset sample, or files beside it in a folder or prefix; workers read
        the bytes, the driver only noted where they are and how big)."""
        where = self._where[id(item)]
        if where.get("text"):
            return str(where["text"])
        if not where.get("siblings"):
            return ""
        siblings = json.loads(where["siblings"])
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
        where = self._where[id(item)]
        data = where.get("data")
        try:
            if where.get("problem"):
                raise ReadError(str(where["problem"]))
            if data is not None:  # read by the unit's worker
                data = bytes(data)
                if len(data) > self.cfg.max_bytes:
                    raise ReadError(
                        f"file too large: {len(data)} bytes > decode.max_bytes={self.cfg.max_bytes}"
                    )
            else:
                data = self._read_listed(where)
        except ReadError as exc:
            item.reject(NAME, str(exc))
            return
        item.key = hashlib.sha256(data).hexdigest()
        item.image = data

    def _read_listed(self, where: dict[str, Any]) -> bytes:
        """Bytes of an item-level listing row (tests, benches): a file, object or tar member by offset."""
        return read_bytes(
            str(where["path"]),
            int(where["offset"]),
            int(where["size"]),
            self.cfg.max_bytes,
            problem=str(where["problem"] or ""),
        )

    def _decode(self, item: Item, dataset: str, text: str = "") -> bytes | None:
        """Decode and make the record; returns its pixel sample (`engine.images.sample_pixels`; None when
        rejected)."""
        try:
            image = decode(item.image, self.limits)
        except ImageRejected as exc:
            item.reject(NAME, str(exc))
            return None
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
            # pixel_std (set by `process` for the batch): measured here, where the pixels are decoded
            # anyway (collect's near-constant check)
            "provenance": {NAME: {"reencoded": image.reencoded, "pixel_std": None}},
        }
        return image.sample
