"""One owner per image key across the whole run: the first uri to claim a content hash keeps it.

Duplicates are caught right after hashing, before any model sees them. A Ray actor holds the table when the
engine runs on Ray; the same class works in-process for the sequential runner and tests.
"""

from __future__ import annotations


class KeyRegistry:
    """key -> owning uri. Seeded with what earlier runs committed, so resume keeps the same owners."""

    def __init__(self, owners: dict[str, str] | None = None) -> None:
        self.owners: dict[str, str] = dict(owners or {})

    def claim(self, pairs: list[tuple[str, str]]) -> list[str | None]:
        """For each (key, uri): None if `uri` owns `key` (now or already), else the owner's uri.

        Idempotent for the same pair, so a retried block claims its own keys again without conflict.
        """
        result: list[str | None] = []
        for key, uri in pairs:
            owner = self.owners.setdefault(key, uri)
            result.append(None if owner == uri else owner)
        return result

    def size(self) -> int:
        return len(self.owners)
