"""Region tiers (ChatRex paper §4.1): every grounded box is a category-tier region; the richer texts are added
only where they pass their checks, so a region keeps its category when its description or referring
expression fails.

One place knows which tiers exist, which tier is made from which (a nested tier is lost with its parent),
how a tier is stripped with a reason, and how tiers are counted (the manifest's `tiers` and the audit).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

TIERS = ("category", "short_phrase", "description", "referring")
OPTIONAL_TIERS = TIERS[1:]
# child tier -> the tier whose text it is made from
PARENT = {"referring": "description"}
_TIER_DROP = re.compile(r"^region (\d+)\.(" + "|".join(OPTIONAL_TIERS) + r")$")


def children(tier: str) -> list[str]:
    """Tiers made (directly or not) from `tier`'s text."""
    found = [child for child, parent in PARENT.items() if parent == tier]
    return found + [grand for child in found for grand in children(child)]


def tier_what(region_id: int, tier: str) -> str:
    """The `dropped[].what` of a tier stripped from a region: `region <id>.<tier>`."""
    return f"region {region_id}.{tier}"


def strip_tier(record: dict[str, Any], region: dict[str, Any], tier: str, stage: str, reason: str) -> None:
    """Set `tier` (and every tier made from it) to null, recording why in `dropped`; the region stays.

    A child tier is recorded too ("parent tier lost"), so every tier a region lacks has a reason.
    """
    for name in (tier, *children(tier)):
        region[name] = None
        why = reason if name == tier else f"parent tier lost: {tier}"
        drop = {"stage": stage, "what": tier_what(region["id"], name), "reason": why}
        record.setdefault("dropped", []).append(drop)


def empty_tiers(region: dict[str, Any]) -> dict[str, Any]:
    """`region` with every optional tier present as null (one schema for schema-inferring readers)."""
    for name in OPTIONAL_TIERS:
        region.setdefault(name, None)
    return region


def tier_counts(record: dict[str, Any]) -> Counter:
    """Regions of the record that reached each tier (a text is set)."""
    counts: Counter = Counter({name: 0 for name in TIERS})
    for region in record.get("regions", []):
        for name in TIERS:
            if region.get(name):
                counts[name] += 1
    return counts


def tier_drops(record: dict[str, Any]) -> dict[str, Counter]:
    """Per optional tier, how many regions lost it, by reason kind (text before the first colon)."""
    drops: dict[str, Counter] = {}
    for drop in record.get("dropped", []):
        match = _TIER_DROP.match(drop.get("what", ""))
        if match:
            kind = drop["reason"].split(":", 1)[0].strip()[:80] or "unspecified"
            drops.setdefault(match.group(2), Counter())[kind] += 1
    return drops
