"""Dataset statistics, accumulated one record at a time (memory does not grow with images), and plots.

Distributions are kept as fixed-bin histograms or counters, never as lists of values, so stats.json stays
small at any dataset size and two builds of the same data give the same numbers and the same PNG bytes.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from release.tiers import TIERS, has, tier_counts

SIZE_BINS = 20  # sqrt(box area / image area) in [0, 1]
ASPECT_RANGE = (-4.0, 4.0)  # log2(width / height)
ASPECT_BINS = 16
TOP_CATEGORIES = 50


def _words(text: Any) -> int | None:
    return len(text.split()) if isinstance(text, str) and text.strip() else None


def reason_kind(reason: str) -> str:
    """`"kind: detail"` -> `"kind"` (the engine's convention for reasons)."""
    return reason.split(":", 1)[0].strip()[:80] or "unspecified"


class StatsCollector:
    """Feed records with `add`; `to_dict` gives stats.json."""

    def __init__(self) -> None:
        self.images = 0
        self.splits: Counter = Counter()
        self.regions_per_image: Counter = Counter()
        self.proposals_per_image: Counter = Counter()
        self.tiers: Counter = Counter()
        self.images_with_tier: Counter = Counter()
        self.lengths: dict[str, Counter] = {
            name: Counter() for name in ("caption", "phrase", "short_phrase", "referring", "description")
        }
        self.categories: Counter = Counter()
        self.box_size = [0] * SIZE_BINS
        self.box_aspect = [0] * ASPECT_BINS
        self.drops: Counter = Counter()  # (stage, kind) of phrases/regions dropped inside kept images

    def add(self, record: dict[str, Any], split: str) -> None:
        self.images += 1
        self.splits[split] += 1
        regions = record.get("regions", [])
        self.regions_per_image[len(regions)] += 1
        self.proposals_per_image[len(record.get("proposals", []))] += 1
        counts = tier_counts(regions)
        for tier, n in counts.items():
            self.tiers[tier] += n
            self.images_with_tier[tier] += n > 0
        self._length("caption", record.get("caption", {}).get("text"))
        for phrase in record.get("phrases", []):
            self._length("phrase", phrase.get("text"))
        width, height = record["width"], record["height"]
        for region in regions:
            for tier in ("short_phrase", "referring", "description"):
                self._length(tier, region.get(tier))
            if has(region, "category"):
                self.categories[region["category"]] += 1
            x0, y0, x1, y1 = region["box"]
            w, h = max(x1 - x0, 1e-6), max(y1 - y0, 1e-6)
            rel = math.sqrt(w * h / (width * height))
            self.box_size[min(int(rel * SIZE_BINS), SIZE_BINS - 1)] += 1
            lo, hi = ASPECT_RANGE
            aspect = min(max(math.log2(w / h), lo), hi - 1e-9)
            self.box_aspect[int((aspect - lo) / (hi - lo) * ASPECT_BINS)] += 1
        for drop in record.get("dropped", []):
            self.drops[(drop.get("stage", "?"), reason_kind(drop.get("reason", "")))] += 1

    def _length(self, name: str, text: Any) -> None:
        n = _words(text)
        if n is not None:
            self.lengths[name][n] += 1

    def to_dict(self, rejects: list[tuple[str, str]]) -> dict[str, Any]:
        """All statistics; `rejects` are (stage, reason) of the rejected inputs."""
        regions = sum(k * v for k, v in self.regions_per_image.items())
        reject_counts = Counter((stage, reason_kind(reason)) for stage, reason in rejects)
        ranked = sorted(self.categories.items(), key=lambda kv: (-kv[1], kv[0]))
        lo, hi = ASPECT_RANGE
        return {
            "images": self.images,
            "splits": dict(sorted(self.splits.items())),
            "regions": regions,
            "regions_per_image": {"histogram": _hist(self.regions_per_image), "mean": _mean(regions, self)},
            "proposals_per_image": {"histogram": _hist(self.proposals_per_image)},
            "tiers": {
                tier: {
                    "regions": self.tiers[tier],
                    "fraction_of_regions": round(self.tiers[tier] / regions, 4) if regions else 0.0,
                    "images": self.images_with_tier[tier],
                }
                for tier in (*TIERS, "mask")
            },
            "text_words": {
                name: {"histogram": _hist(counter), "mean": _counter_mean(counter)}
                for name, counter in self.lengths.items()
            },
            "categories": {
                "distinct": len(self.categories),
                "top": [{"category": c, "regions": n} for c, n in ranked[:TOP_CATEGORIES]],
                "rank_frequency": [n for _, n in ranked],
            },
            "box_size": {
                "what": "sqrt(box area / image area)",
                "bin_edges": [round(i / SIZE_BINS, 4) for i in range(SIZE_BINS + 1)],
                "counts": list(self.box_size),
            },
            "box_aspect": {
                "what": "log2(box width / box height), clipped",
                "bin_edges": [round(lo + i * (hi - lo) / ASPECT_BINS, 4) for i in range(ASPECT_BINS + 1)],
                "counts": list(self.box_aspect),
            },
            "drops": _nested(self.drops),  # phrases/regions removed inside the released records
            "rejects": _nested(reject_counts),
        }


def _hist(counter: Counter) -> dict[str, int]:
    return {str(k): counter[k] for k in sorted(counter)}


def _mean(total: int, stats: StatsCollector) -> float:
    return round(total / stats.images, 4) if stats.images else 0.0


def _counter_mean(counter: Counter) -> float:
    n = sum(counter.values())
    return round(sum(k * v for k, v in counter.items()) / n, 4) if n else 0.0


def _nested(counter: Counter) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (stage, kind), n in sorted(counter.items()):
        out.setdefault(stage, {})[kind] = n
    return out
