"""One owner per image key across the whole run: the first uri to claim a content hash keeps it.

Duplicates are caught right after hashing, before any model sees them. The key table is split over several
partitions by key prefix (`ray.dedupe_partitions`; on Ray each is an actor), so no one process holds every
key or answers every claim: a decode batch sends each partition only its own keys, in one call each, and
the calls run in parallel. Exact, first-owner-wins: a key belongs to exactly one partition, which decides.
The same classes work in-process for the sequential runner and tests.

Resume keeps the owners: each partition loads, from the committed index and rejects parts, the keys of its
own prefix range and their uris (the driver passes only the part names).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pyarrow.parquet as pq

from engine.storage import Folder


def partition_of(key: str, partitions: int) -> int:
    """Keys are hex sha256: their first 8 hex digits spread uniformly."""
    return int(key[:8], 16) % partitions if partitions > 1 else 0


class KeyRegistry:
    """key -> owning uri, for one partition of the key space (or all of it). Keys are kept as 32 raw bytes
    (sha256), half the memory of their hex text."""

    def __init__(self, owners: dict[str, str] | None = None) -> None:
        self.owners: dict[bytes, str] = {_raw(k): v for k, v in (owners or {}).items()}

    def claim(self, pairs: list[tuple[str, str]]) -> list[str | None]:
        """For each (key, uri): None if `uri` owns `key` (now or already), else the owner's uri.

        Idempotent for the same pair, so a retried block claims its own keys again without conflict.
        """
        result: list[str | None] = []
        for key, uri in pairs:
            owner = self.owners.setdefault(_raw(key), uri)
            result.append(None if owner == uri else owner)
        return result

    def load(self, out: Folder, parts: Sequence[str], partition: int, partitions: int) -> int:
        """Take the owners of this partition's keys from committed parts (records first owned, then keyed
        rejects: a rejected image still owns its bytes). Returns how many keys this partition holds."""
        for part in parts:
            for relative, uri_column in (
                (f"index/{part}.parquet", "source_uri"),
                (f"rejects/{part}.parquet", "uri"),
            ):
                if not out.exists(relative):
                    continue
                table = pq.read_table(out.path(relative), columns=["key", uri_column], filesystem=out.fs)
                for key, uri in zip(table["key"].to_pylist(), table[uri_column].to_pylist(), strict=True):
                    if key and partition_of(key, partitions) == partition:
                        self.owners.setdefault(_raw(key), uri)
        return len(self.owners)

    def size(self) -> int:
        return len(self.owners)


def _raw(key: str) -> bytes:
    try:
        return bytes.fromhex(key)
    except ValueError:  # not a hex digest (tests use short names): keep the text's bytes
        return key.encode()


Claim = Callable[[list[tuple[str, str]]], list[str | None]]


def partitioned_claim(
    claimers: Sequence[Callable[[list[tuple[str, str]]], Any]],
    resolve: Callable[[list[Any]], list[list[str | None]]] | None = None,
) -> Claim:
    """One claim function over several partitions: each pair goes to its key's partition.

    `claimers[i](pairs)` answers partition i; on Ray they return object refs and `resolve` gets them all
    at once (ray.get), so the partitions answer in parallel.
    """
    n = len(claimers)

    def claim(pairs: list[tuple[str, str]]) -> list[str | None]:
        groups: dict[int, list[int]] = {}
        for i, (key, _) in enumerate(pairs):
            groups.setdefault(partition_of(key, n), []).append(i)
        order = sorted(groups)
        answers = [claimers[p]([pairs[i] for i in groups[p]]) for p in order]
        if resolve is not None:
            answers = resolve(answers)
        result: list[str | None] = [None] * len(pairs)
        for p, answer in zip(order, answers, strict=True):
            for i, owner in zip(groups[p], answer, strict=True):
                result[i] = owner
        return result

    return claim


class PartitionedRegistry:
    """In-process: `partitions` registries behind one claim function (the sequential runner, tests)."""

    def __init__(self, partitions: int = 1, owners: dict[str, str] | None = None) -> None:
        self.parts = [KeyRegistry() for _ in range(partitions)]
        for key, uri in (owners or {}).items():
            self.parts[partition_of(key, partitions)].claim([(key, uri)])
        self.claim = partitioned_claim([part.claim for part in self.parts])

    def load(self, out: Folder, parts: Sequence[str]) -> int:
        return sum(part.load(out, parts, i, len(self.parts)) for i, part in enumerate(self.parts))
