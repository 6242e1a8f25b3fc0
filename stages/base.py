"""What every stage shares: skip rejected items, time the work, contain failures to their items.

A stage is a callable class (design §4): constructed once per Ray actor (model load), called per batch,
same rows out as in. It is equally usable without Ray: `Caption(cfg)(batch)`.
"""

from __future__ import annotations

import copy
import time
import traceback
from typing import Any, ClassVar

from engine.config import Resources, strip_resources
from engine.items import Item, batch_to_items, items_to_batch
from engine.models import params_hash, set_torch_threads


class Stage:
    """Subclasses set `name`, optionally `unit` (what they count inside an image) and implement `process`."""

    name: ClassVar[str]
    unit: ClassVar[str] = "regions"

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        resources: Resources | None = getattr(cfg, "resources", None)
        if resources is not None:
            set_torch_threads(resources.torch_threads)
        params = cfg.model_dump(mode="json")
        strip_resources(params)
        model = getattr(cfg, "model", None)
        self.provenance = {
            "model": getattr(model, "name", None) or getattr(cfg, "spacy_model", ""),
            "revision": getattr(model, "revision", None),
            "params": params_hash(params),
        }

    def process(self, items: list[Item]) -> None:
        """Mutate `items` in place: add to `item.record`, or `item.reject(...)` / `item.drop(...)`."""
        raise NotImplementedError

    def count(self, item: Item) -> int:
        if item.record is None or not self.unit:
            return 0
        return len(item.record.get(self.unit, []))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        items = batch_to_items(batch)
        self.run(items)
        return items_to_batch(items)

    def run(self, items: list[Item]) -> None:
        """Process the live items; if the batch fails as a whole, retry one by one so only culprits reject."""
        live = [item for item in items if item.ok]
        if not live:
            return
        counts_in = [self.count(item) for item in live]
        snapshots = [_snapshot(item) for item in live]
        start = time.perf_counter()
        try:
            self.process(live)
        except Exception:
            for item, snapshot in zip(live, snapshots, strict=True):
                _restore(item, snapshot)
                self._process_alone(item)
        seconds = (time.perf_counter() - start) / len(live)
        for item, n_in in zip(live, counts_in, strict=True):
            n_out = self.count(item) if item.ok else 0
            item.trace[self.name] = {"seconds": seconds, "in": n_in, "out": n_out}
            if item.ok and item.record is not None:
                item.record.setdefault("provenance", {})[self.name] = self.provenance

    def _process_alone(self, item: Item) -> None:
        snapshot = _snapshot(item)
        try:
            self.process([item])
        except Exception as exc:
            _restore(item, snapshot)
            detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
            item.reject(self.name, f"stage error: {detail}")


def _snapshot(item: Item) -> tuple:
    return copy.deepcopy(item.record), item.image, item.error_stage, item.error_reason


def _restore(item: Item, snapshot: tuple) -> None:
    item.record, item.image, item.error_stage, item.error_reason = snapshot
