"""What changed since a previous release (`--previous`): keys added/removed, tier counts, config changes."""

from __future__ import annotations

import json
from typing import Any

import pyarrow.parquet as pq

from engine.storage import Folder

MAX_LISTED = 20  # keys listed in the card; the manifest carries the counts


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def previous_keys(prev: Folder) -> set[str]:
    keys: set[str] = set()
    for rel in prev.files("index", ".parquet"):
        keys.update(pq.read_table(prev.open_input(rel), columns=["key"])["key"].to_pylist())
    return keys


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    """Changed config values (dotted paths) between the configs of two releases."""
    a, b = _flatten(old), _flatten(new)
    return [
        {"path": path, "previous": a.get(path), "now": b.get(path)}
        for path in sorted(set(a) | set(b))
        if a.get(path) != b.get(path)
    ]


def release_diff(prev_uri: str, keys: set[str], manifest: dict[str, Any]) -> dict[str, Any]:
    prev = Folder(prev_uri)
    if not (prev.is_file("manifest.json") and prev.is_file("SHA256SUMS")):
        raise ValueError(f"--previous {prev_uri}: not a finished release (no manifest.json or SHA256SUMS)")
    old = json.loads(prev.read_text("manifest.json"))
    old_keys = previous_keys(prev)
    added, removed = sorted(keys - old_keys), sorted(old_keys - keys)
    old_counts, new_counts = old.get("counts", {}), manifest["counts"]
    tiers = {
        tier: {
            "previous": old_counts.get("tiers", {}).get(tier, 0),
            "now": n,
            "delta": n - old_counts.get("tiers", {}).get(tier, 0),
        }
        for tier, n in new_counts["tiers"].items()
    }
    return {
        "previous": {"uri": prev_uri, "name": old.get("name"), "version": old.get("version")},
        "records": {"previous": old_counts.get("records", 0), "now": new_counts["records"]},
        "added": len(added),
        "removed": len(removed),
        "added_keys": added[:MAX_LISTED],
        "removed_keys": removed[:MAX_LISTED],
        "tiers": tiers,
        "config_changes": config_changes(old.get("configs", {}), manifest.get("configs", {})),
    }
