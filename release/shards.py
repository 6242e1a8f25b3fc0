"""Re-pack records into the release shards: fixed size, key order, reproducible bytes.

Members are copied byte for byte (the record JSON and the image exactly as the engine wrote them); only the
tar headers are new, with fixed owner, mode and mtime, so the same inputs give byte-identical tars.
"""

from __future__ import annotations

import tarfile
from typing import Any

import webdataset as wds

from engine.storage import Folder
from release.inputs import EngineOutput, locate_members
from release.plan import Entry

TAR_MTIME = 0  # fixed timestamps: reproducible tars


class MemberIndex:
    """Caches where each key's files sit inside each input tar (one header scan per input tar)."""

    def __init__(self, outputs: list[EngineOutput]) -> None:
        self.outputs = outputs
        self._scanned: dict[tuple[int, str], dict[str, dict[str, tuple[int, int]]]] = {}

    def members(self, entry: Entry) -> dict[str, tuple[int, int]]:
        slot = (entry.source, entry.shard)
        if slot not in self._scanned:
            self._scanned[slot] = locate_members(self.outputs[entry.source], entry.shard)
        found = self._scanned[slot].get(entry.key)
        if not found or entry.image_ext not in found or "json" not in found:
            raise RuntimeError(
                f"{self.outputs[entry.source].uri}/{entry.shard} lacks the members of {entry.key} "
                "that its index lists: the engine output is damaged; rerun the engine into it"
            )
        return found


def write_shard(dest: Folder, rel: str, entries: list[Entry], index: MemberIndex) -> None:
    """Write one release shard; input files are opened once per input tar and read by range."""
    handles: dict[tuple[int, str], Any] = {}
    try:
        with dest.open_write(rel) as stream:
            writer = wds.TarWriter(stream, user="rexverse", group="rexverse", mtime=TAR_MTIME, encoder=False)
            for entry in entries:
                sample: dict[str, Any] = {"__key__": entry.key}
                for ext, (offset, size) in sorted(index.members(entry).items()):
                    slot = (entry.source, entry.shard)
                    if slot not in handles:
                        handles[slot] = index.outputs[entry.source].loc.open_input(entry.shard)
                    handles[slot].seek(offset)
                    sample[ext] = handles[slot].read(size)
                writer.write(sample)
            writer.close()
    finally:
        for handle in handles.values():
            handle.close()


def iter_shard(dest: Folder, rel: str) -> Any:
    """(key, {ext: bytes}) per sample of a release shard, in order (members of a sample are adjacent)."""

    with dest.open_input(rel) as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
        key, sample = None, {}
        for info in tar:
            if not info.isfile():
                continue
            name = info.name.rsplit("/", 1)[-1]
            k, _, ext = name.partition(".")
            if key is not None and k != key:
                yield key, sample
                sample = {}
            key = k
            handle = tar.extractfile(info)
            sample[ext] = handle.read() if handle else b""
        if key is not None:
            yield key, sample
