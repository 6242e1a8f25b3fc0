"""Region tiers, counted as non-null fields (a region reaches a tier when its text for it is present).

`category` is always present; `short_phrase`, `description` and `referring` may be null where a region did
not pass that tier's checks. Counting presence (not assuming all four) keeps this right for both.
"""

from __future__ import annotations

from typing import Any

TIERS = ("category", "short_phrase", "description", "referring")


def has(region: dict[str, Any], tier: str) -> bool:
    value = region.get(tier)
    return isinstance(value, str) and value.strip() != ""


def tier_counts(regions: list[dict[str, Any]]) -> dict[str, int]:
    counts = {tier: sum(has(r, tier) for r in regions) for tier in TIERS}
    counts["mask"] = sum(r.get("mask") is not None for r in regions)
    return counts
