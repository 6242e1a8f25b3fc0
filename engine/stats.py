"""Per-stage counts and timings, aggregated from the trace each item carries to the sink.

Every stage writes `trace[stage] = {seconds, in, out}` on the items it processed, and drops/rejects carry a
reason of the form "kind: detail". Counting by kind (text before the first colon) keeps the summary
readable while the full reason stays in the record and in rejects.parquet.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.items import Item
from schemas.tiers import TIERS, tier_counts, tier_drops


def reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0].strip()[:80] or "unspecified"


@dataclass
class StageStats:
    images_in: int = 0
    images_out: int = 0
    rejected: Counter = field(default_factory=Counter)
    units_in: int = 0
    units_out: int = 0
    dropped: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "images_in": self.images_in,
            "images_out": self.images_out,
            "rejected": dict(sorted(self.rejected.items())),
            "units_in": self.units_in,
            "units_out": self.units_out,
            "dropped": dict(sorted(self.dropped.items())),
            "seconds": round(self.seconds, 3),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageStats:
        return cls(
            images_in=data["images_in"],
            images_out=data["images_out"],
            rejected=Counter(data["rejected"]),
            units_in=data["units_in"],
            units_out=data["units_out"],
            dropped=Counter(data["dropped"]),
            seconds=data["seconds"],
        )

    def merge(self, other: StageStats) -> None:
        self.images_in += other.images_in
        self.images_out += other.images_out
        self.rejected.update(other.rejected)
        self.units_in += other.units_in
        self.units_out += other.units_out
        self.dropped.update(other.dropped)
        self.seconds += other.seconds


class RunStats:
    """Stats of many items, keyed by stage; mergeable across commits and runs."""

    def __init__(self) -> None:
        self.stages: dict[str, StageStats] = {}
        self.tiers: Counter = Counter({name: 0 for name in TIERS})  # regions written, per tier
        self.tier_drops: dict[str, Counter] = {}  # per tier, why regions of written records lack it

    def stage(self, name: str) -> StageStats:
        stats = self.stages.get(name)
        if stats is None:  # not setdefault: that would build a StageStats (two Counters) every call
            stats = self.stages[name] = StageStats()
        return stats

    def add(self, item: Item, extra_reject: tuple[str, str] | None = None) -> None:
        """Count one item at the sink; `extra_reject` is a rejection made by the sink itself."""
        for name, trace in item.trace.items():
            stats = self.stage(name)
            stats.images_in += 1
            stats.units_in += int(trace.get("in", 0))
            stats.units_out += int(trace.get("out", 0))
            stats.seconds += float(trace.get("seconds", 0.0))
            if item.error_stage == name:
                stats.rejected[reason_kind(item.error_reason)] += 1
            else:
                stats.images_out += 1
        for drop in (item.record or {}).get("dropped", []):
            self.stage(drop["stage"]).dropped[reason_kind(drop["reason"])] += 1
        if extra_reject is not None:
            stage, reason = extra_reject
            stats = self.stage(stage)
            stats.images_in += 1
            stats.rejected[reason_kind(reason)] += 1
        elif item.ok and item.record is not None:
            if item.record.get("regions"):  # image-only records (the pool pass) have none to count
                self.tiers.update(tier_counts(item.record))
            if item.record.get("dropped"):
                for tier, reasons in tier_drops(item.record).items():
                    self.tier_drops.setdefault(tier, Counter()).update(reasons)

    def merge(self, other: RunStats) -> None:
        for name, stats in other.stages.items():
            self.stage(name).merge(stats)
        self.merge_tiers(other.tiers_dict())

    def tiers_dict(self) -> dict[str, Any]:
        """`{tiers: {tier: regions}, tier_drops: {tier: {reason kind: regions}}}` of written records."""
        drops = {t: dict(sorted(c.items())) for t, c in sorted(self.tier_drops.items())}
        return {"tiers": {name: self.tiers[name] for name in TIERS}, "tier_drops": drops}

    def merge_tiers(self, data: dict[str, Any] | None) -> None:
        """Add a `tiers_dict()` (from a commit marker; absent in markers written before tiers existed)."""
        if not data:
            return
        self.tiers.update(data.get("tiers", {}))
        for tier, reasons in data.get("tier_drops", {}).items():
            self.tier_drops.setdefault(tier, Counter()).update(reasons)

    def to_dict(self, order: Sequence[str] = ()) -> dict[str, Any]:
        """Stages in the job's `order`; stages it does not name (the sink's own checks) after them."""
        return {name: self.stages[name].to_dict() for name in ordered(self.stages, order)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunStats:
        run = cls()
        for name, stats in data.items():
            run.stages[name] = StageStats.from_dict(stats)
        return run


def ordered(names: Any, order: Sequence[str]) -> list[str]:
    known = [n for n in order if n in names]
    return known + sorted(n for n in names if n not in order)


def format_table(stats: RunStats, order: Sequence[str] = ()) -> str:
    """A fixed-width per-stage summary for the terminal."""
    header = (
        f"{'stage':<15}{'in':>7}{'out':>7}{'units in':>10}{'units out':>10}{'seconds':>10}"
        "  dropped/rejected by reason"
    )
    lines = [header, "-" * len(header)]
    for name in ordered(stats.stages, order):
        s = stats.stages[name]
        reasons = [f"{k}={v}" for k, v in sorted(s.rejected.items())]
        reasons += [f"[{k}]={v}" for k, v in sorted(s.dropped.items())]
        lines.append(
            f"{name:<15}{s.images_in:>7}{s.images_out:>7}{s.units_in:>10}{s.units_out:>10}"
            f"{s.seconds:>10.2f}  {', '.join(reasons)}"
        )
    lines.append("(in/out: images; units: phrases or regions; [reason]: units dropped; seconds: busy time)")
    return "\n".join(lines)
