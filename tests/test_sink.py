"""Shard sink: atomic parts, readers, rejects, duplicate keys, interrupted-part clean-up, resume state."""

import copy
import hashlib
import json
from pathlib import Path

import pandas as pd
import webdataset as wds
from test_schema import valid_record

from engine.items import Item
from engine.sink import ShardSink, clean_uncommitted, load_committed, merge_rejects

FIXTURE = Path(__file__).parent / "fixtures" / "fixture100"
JPEGS = sorted(FIXTURE.glob("scene_*.jpg"))


def record_item(n: int) -> Item:
    data = JPEGS[n].read_bytes()
    record = copy.deepcopy(valid_record())
    key = hashlib.sha256(data).hexdigest()
    record["key"] = key
    record["source"]["uri"] = f"/in/{n}.jpg"
    return Item(key=key, uri=f"/in/{n}.jpg", image=data, record=record, trace={"caption": {"seconds": 0.1}})


def reject_item(n: int) -> Item:
    item = Item(key="", uri=f"/in/bad{n}.jpg", image=b"", record=None, trace={"decode": {"seconds": 0.0}})
    item.reject("decode", "not an image: unknown format")
    return item


def test_parts_commit_atomically_and_read_back(tmp_path):
    sink = ShardSink(tmp_path, shard_size=2, max_pending_rejects=100, committed=load_committed(tmp_path))
    for n in range(5):
        sink.add(record_item(n))
    sink.add(reject_item(0))
    broken = record_item(7)
    broken.record["regions"][0]["referring"] = ""
    sink.add(broken)
    duplicate = record_item(1)
    duplicate.uri = duplicate.record["source"]["uri"] = "/in/copy.jpg"
    sink.add(duplicate)
    sink.close()
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        "000000.tar",
        "000001.tar",
        "000002.tar",
    ]
    assert not list((tmp_path / "_tmp").iterdir())

    index = pd.read_parquet(tmp_path / "index")
    assert len(index) == 5 and index["key"].is_unique
    samples = list(wds.WebDataset(str(tmp_path / "shards" / "{000000..000002}.tar"), shardshuffle=False))
    assert len(samples) == 5
    first = json.loads(samples[0]["json"])
    assert first["key"] == samples[0]["__key__"] and samples[0]["jpg"][:2] == b"\xff\xd8"

    assert merge_rejects(tmp_path) == 3
    rejects = pd.read_parquet(tmp_path / "rejects.parquet").set_index("uri")
    assert rejects.loc["/in/bad0.jpg", "stage"] == "decode"
    assert rejects.loc["/in/7.jpg", "reason"].startswith("invalid record: regions[0].referring")
    assert rejects.loc["/in/copy.jpg", "reason"].startswith("duplicate")

    state = load_committed(tmp_path)
    assert state.records == 5 and state.rejects == 3 and state.next_part == 3
    assert {"/in/0.jpg", "/in/bad0.jpg", "/in/copy.jpg"} <= state.uris
    assert state.stats.stages["caption"].images_in == 7  # 5 records + broken + duplicate carried the trace
    assert state.stats.stages["schema"].rejected["invalid record"] == 1


def test_uncommitted_part_is_removed_and_numbering_continues(tmp_path):
    sink = ShardSink(tmp_path, shard_size=2, max_pending_rejects=100, committed=load_committed(tmp_path))
    for n in range(3):
        sink.add(record_item(n))  # part 0 committed, item 2 pending in _tmp
    # simulate a kill half-way through committing the next part: files renamed, no marker
    (tmp_path / "shards" / "000001.tar").write_bytes(b"partial")
    (tmp_path / "index" / "000001.parquet").write_bytes(b"partial")
    removed = clean_uncommitted(tmp_path)
    assert sorted(Path(p).name for p in removed) == ["000001.parquet", "000001.tar"]
    assert not (tmp_path / "_tmp").exists()
    state = load_committed(tmp_path)
    assert state.records == 2 and state.next_part == 1
    resumed = ShardSink(tmp_path, shard_size=2, max_pending_rejects=100, committed=state)
    resumed.add(record_item(0))  # already committed key -> reject, not a second copy
    resumed.add(record_item(2))
    resumed.close()
    index = pd.read_parquet(tmp_path / "index")
    assert sorted(index["source_uri"]) == ["/in/0.jpg", "/in/1.jpg", "/in/2.jpg"]
