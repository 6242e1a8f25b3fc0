"""Per-source books: which members of each source the committed parts cover, kept as ranges, never per image.

Each commit marker names, per source, the member ordinals its records and rejects cover (as `[start, end)`
ranges) and which of them are `stage error` rejects. Stage errors are not final (a broken model call says
nothing about the image): a rerun reads those members again, and a later part that covers the same member
supersedes the earlier stage-error reject. Every other ordinal covered twice is an input written twice.

The driver holds, per source, a few ranges and the ordinals of its pending stage errors: its memory grows
with the number of sources (tars, pages, row groups) and of stage errors, not with the number of images.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

Ranges = list[tuple[int, int]]


def to_ranges(ordinals: Iterable[int]) -> Ranges:
    """Sorted ordinals -> disjoint `[start, end)` ranges (duplicates collapse)."""
    ranges: Ranges = []
    for n in sorted(set(ordinals)):
        if ranges and ranges[-1][1] == n:
            ranges[-1] = (ranges[-1][0], n + 1)
        else:
            ranges.append((n, n + 1))
    return ranges


def union(a: Ranges, b: Ranges) -> Ranges:
    merged: Ranges = []
    for start, end in sorted([*a, *b]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def overlap(a: Ranges, b: Ranges) -> int:
    """How many ordinals lie in both (each side disjoint)."""
    total, i, j = 0, 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0, end - start)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def size(ranges: Ranges) -> int:
    return sum(end - start for start, end in ranges)


def clip(ranges: Ranges, total: int) -> Ranges:
    """`ranges` cut to `[0, total)`."""
    return [(start, min(end, total)) for start, end in ranges if start < total]


def contains(ranges: Ranges, n: int) -> bool:
    return any(start <= n < end for start, end in ranges)


def minus_points(ranges: Ranges, points: Iterable[int]) -> Ranges:
    """`ranges` without the given ordinals."""
    drop = set(points)
    if not drop:
        return list(ranges)
    kept = [n for start, end in ranges for n in range(start, end) if n not in drop]
    return to_ranges(kept)


def missing(ranges: Ranges, total: int) -> Ranges:
    """The ordinals of `[0, total)` that `ranges` do not cover."""
    gaps: Ranges = []
    at = 0
    for start, end in ranges:
        if start > at:
            gaps.append((at, min(start, total)))
        at = max(at, end)
    if at < total:
        gaps.append((at, total))
    return [(s, e) for s, e in gaps if s < e]


def marker_sources(ordinals: dict[str, list[int]], stage_errors: dict[str, list[int]]) -> dict[str, Any]:
    """The `sources` entry of a commit marker: per source its covered ranges and stage-error ordinals."""
    return {
        source: {
            "ranges": [list(r) for r in to_ranges(ns)],
            "stage_errors": sorted(stage_errors.get(source, [])),
        }
        for source, ns in sorted(ordinals.items())
    }


@dataclass
class SourceBooks:
    """What the committed parts cover of one source."""

    final: Ranges = field(default_factory=list)  # records and content rejects: never read again
    pending: set[int] = field(default_factory=set)  # stage-error rejects: a rerun reads these again
    twice: int = 0  # ordinals covered twice by final entries (an accounting error)
    superseded: int = 0  # stage-error rejects a later part replaced

    def covered(self) -> Ranges:
        return union(self.final, to_ranges(self.pending))

    def add(self, ranges: Ranges, stage_errors: list[int]) -> None:
        """One part's coverage of this source (parts must be added in commit order)."""
        errors = set(stage_errors)
        final = minus_points(ranges, errors)
        self.twice += overlap(self.final, final)
        replaced = {n for n in self.pending if contains(final, n)} | (self.pending & errors)
        self.superseded += len(replaced)
        self.pending = (self.pending - replaced) | errors
        self.final = union(self.final, final)


@dataclass
class Ledger:
    """Per-source books over a set of commit markers."""

    sources: dict[str, SourceBooks] = field(default_factory=dict)

    def add_marker(self, marker: dict[str, Any]) -> None:
        for source, entry in marker.get("sources", {}).items():
            ranges = [(int(a), int(b)) for a, b in entry["ranges"]]
            self.sources.setdefault(source, SourceBooks()).add(ranges, entry.get("stage_errors", []))

    def books(self, source: str) -> SourceBooks:
        return self.sources.get(source, SourceBooks())

    @property
    def superseded(self) -> int:
        return sum(books.superseded for books in self.sources.values())

    def problems(self, expected: dict[str, int]) -> list[str]:
        """Per source, what does not add up: members seen = records + rejects (+ duplicates), once each."""
        found = []
        for source, total in sorted(expected.items()):
            books = self.books(source)
            covered = books.covered()
            gaps = missing(covered, total)
            beyond = size(covered) - (total - size(gaps))
            if books.twice:
                found.append(f"{source}: {books.twice} members written twice")
            if gaps:
                found.append(
                    f"{source}: {size(gaps)} of {total} members never came back (first: #{gaps[0][0]})"
                )
            if beyond > 0:
                found.append(f"{source}: {beyond} members beyond the {total} the source holds")
        return found
