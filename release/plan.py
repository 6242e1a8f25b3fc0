"""Which records go where: first-wins dedupe across inputs, the stable split, and fixed-size shards.

Order is by key (a sha256 of the image bytes), so the same inputs always give the same shards, and adding
inputs later only inserts records between existing ones. The split of a key depends on the key alone
(a hash of it), so a record never changes split between releases.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from release.inputs import EngineOutput, index_keys

DEFAULT_SPLIT = "train"


@dataclass(frozen=True)
class Entry:
    key: str
    source: int  # which --from (0-based)
    shard: str  # input shard path relative to that output
    image_ext: str


@dataclass
class Duplicate:
    key: str
    kept: int
    dropped: int


@dataclass
class Plan:
    """Per split, the release shards (relative path -> entries in key order); duplicates found."""

    shards: dict[str, dict[str, list[Entry]]] = field(default_factory=dict)
    duplicates: list[Duplicate] = field(default_factory=list)
    records_per_input: dict[int, int] = field(default_factory=dict)

    def all_shards(self) -> list[tuple[str, str, list[Entry]]]:
        return [(split, rel, ents) for split, shards in self.shards.items() for rel, ents in shards.items()]

    @property
    def records(self) -> int:
        return sum(len(e) for _, _, e in self.all_shards())


def parse_split(text: str | None) -> dict[str, float]:
    """`val=0.01,test=0.01` -> {"val": 0.01, "test": 0.01}; the rest of the keys is `train`."""
    if not text:
        return {}
    fractions: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        try:
            fraction = float(value)
        except ValueError:
            fraction = -1.0
        if not sep or not name or not 0 < fraction < 1 or name == DEFAULT_SPLIT or name in fractions:
            raise ValueError(
                f"--split {text!r}: expected NAME=FRACTION[,NAME=FRACTION] with fractions in (0, 1) and "
                f"names other than {DEFAULT_SPLIT!r} (which takes the rest), e.g. --split val=0.01"
            )
        fractions[name] = fraction
    if sum(fractions.values()) >= 1:
        raise ValueError(f"--split {text!r}: the fractions must sum to less than 1")
    return fractions


def key_unit(key: str) -> float:
    """A number in [0, 1) from the key alone (salted, so it is independent of the key's sort order)."""
    digest = hashlib.sha256(b"rexverse-split:" + key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(key: str, fractions: dict[str, float]) -> str:
    unit, edge = key_unit(key), 0.0
    for name, fraction in fractions.items():
        edge += fraction
        if unit < edge:
            return name
    return DEFAULT_SPLIT


def make_plan(outputs: list[EngineOutput], fractions: dict[str, float], shard_size: int) -> Plan:
    plan = Plan()
    owner: dict[str, Entry] = {}
    for out in outputs:
        table = index_keys(out)
        plan.records_per_input[out.number] = 0
        for key, ext, shard in zip(
            table["key"].to_pylist(), table["image_ext"].to_pylist(), table["shard"].to_pylist(), strict=True
        ):
            if key in owner:
                plan.duplicates.append(Duplicate(key, owner[key].source, out.number))
                continue
            owner[key] = Entry(key, out.number, shard, ext)
            plan.records_per_input[out.number] += 1
    by_split: dict[str, list[Entry]] = {name: [] for name in (DEFAULT_SPLIT, *fractions)}
    for key in sorted(owner):
        by_split[split_of(key, fractions)].append(owner[key])
    for name, entries in by_split.items():
        folder = f"shards/{name}/" if fractions else "shards/"
        plan.shards[name] = {
            f"{folder}{i // shard_size:06d}.tar": entries[i : i + shard_size]
            for i in range(0, len(entries), shard_size)
        }
    plan.duplicates.sort(key=lambda d: (d.key, d.dropped))
    return plan
