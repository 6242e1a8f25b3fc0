"""Part writer: atomic parts, readers, rejects, duplicate keys, retried tasks, clean-up, resume state."""

import copy
import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
import webdataset as wds
from test_schema import valid_record

from engine.dedupe import PartitionedRegistry
from engine.items import Item
from engine.sink import OldOutputError, PartWriter, clean_uncommitted, load_committed, merge_rejects
from engine.storage import Folder

FIXTURE = Path(__file__).parent / "fixtures" / "fixture100"
JPEGS = sorted(FIXTURE.glob("scene_*.jpg"))


def record_item(n: int) -> Item:
    data = JPEGS[n].read_bytes()
    record = copy.deepcopy(valid_record())
    key = hashlib.sha256(data).hexdigest()
    record["key"] = key
    record["source"]["uri"] = f"/in/{n}.jpg"
    trace = {"caption": {"seconds": 0.1}}
    return Item(key=key, uri=f"/in/{n}.jpg", image=data, record=record, trace=trace, source="/in", ordinal=n)


def reject_item(n: int, reason: str = "not an image: unknown format") -> Item:
    item = Item(
        key="",
        uri=f"/in/bad{n}.jpg",
        image=b"",
        record=None,
        trace={"decode": {"seconds": 0.0}},
        source="/bad",
        ordinal=n,
    )
    item.reject("decode", reason)
    return item


def test_parts_commit_atomically_and_read_back(tmp_path):
    out = Folder(tmp_path)
    writer = PartWriter(out, "run1", 3, shard_size=2, max_pending_rejects=100)
    for n in range(5):
        writer.add(record_item(n))
    writer.add(reject_item(0))
    broken = record_item(7)
    broken.record["regions"][0]["referring"] = ""
    writer.add(broken)
    duplicate = record_item(1)
    duplicate.uri = duplicate.record["source"]["uri"] = "/in/copy.jpg"
    writer.add(duplicate)
    results = writer.close()
    names = ["run1-00003-000", "run1-00003-001", "run1-00003-002"]
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [f"{n}.tar" for n in names]
    assert [r["part"] for r in results] == names
    assert sum(r["records"] + r["rejects"] for r in results) == 8 and sum(r["records"] for r in results) == 5
    # each marker names the members it covers, per source, as ranges
    assert [r["sources"]["/in"]["ranges"] for r in results] == [[[0, 2]], [[2, 4]], [[1, 2], [4, 5], [7, 8]]]
    assert results[2]["sources"]["/bad"] == {"ranges": [[0, 1]], "stage_errors": []}
    assert not [p for p in tmp_path.rglob(".*.tmp")]

    index = pd.read_parquet(tmp_path / "index")
    assert len(index) == 5 and index["key"].is_unique
    assert set(index["shard"]) <= {f"{n}.tar" for n in names}
    samples = list(
        wds.WebDataset(sorted(str(p) for p in (tmp_path / "shards").glob("*.tar")), shardshuffle=False)
    )
    assert len(samples) == 5
    first = json.loads(samples[0]["json"])
    assert first["key"] == samples[0]["__key__"] and samples[0]["jpg"][:2] == b"\xff\xd8"

    assert merge_rejects(out, max_rows=100) == 3
    rejects = pd.read_parquet(tmp_path / "rejects.parquet").set_index("uri")
    assert rejects.loc["/in/bad0.jpg", "stage"] == "decode"
    assert rejects.loc["/in/7.jpg", "reason"].startswith("invalid record: regions[0].referring")
    assert rejects.loc["/in/copy.jpg", "reason"].startswith("duplicate")

    state = load_committed(out)
    assert state.records == 5 and state.rejects == 3 and state.parts == names
    # the copy of item 1 (ordinal 1 again) is an input written twice as far as the books go
    assert state.ledger.books("/in").twice == 1 and state.ledger.books("/bad").final == [(0, 1)]
    assert state.stats.stages["caption"].images_in == 7  # 5 records + broken + duplicate carried the trace
    assert state.stats.stages["schema"].rejected["invalid record"] == 1


def test_a_retried_write_task_keeps_its_committed_parts_and_writes_nothing_twice(tmp_path):
    out = Folder(tmp_path)
    first = PartWriter(out, "run1", 0, shard_size=2)
    for n in range(3):
        first.add(record_item(n))
    first.commit()  # part 000 and 001 committed; then the task "dies" and Ray runs it again
    retry = PartWriter(out, "run1", 0, shard_size=2)
    for n in range(3):
        retry.add(record_item(n))
    results = retry.close()
    assert [r["records"] for r in results] == [2, 1]
    index = pd.read_parquet(tmp_path / "index")
    assert sorted(index["source_uri"]) == ["/in/0.jpg", "/in/1.jpg", "/in/2.jpg"]


def test_uncommitted_part_is_removed_and_resume_skips_committed_keys(tmp_path):
    out = Folder(tmp_path)
    writer = PartWriter(out, "run1", 0, shard_size=2)
    for n in range(3):
        writer.add(record_item(n))  # part 000 committed, item 2 pending
    # simulate a kill half-way through committing the next part: files written, no marker
    (tmp_path / "shards" / "run1-00000-001.tar").write_bytes(b"partial")
    (tmp_path / "index" / "run1-00000-001.parquet").write_bytes(b"partial")
    (tmp_path / "shards" / ".run1-00000-002.tar.tmp").write_bytes(b"partial")
    removed = clean_uncommitted(out)
    assert sorted(Path(p).name for p in removed) == [
        ".run1-00000-002.tar.tmp",
        "run1-00000-001.parquet",
        "run1-00000-001.tar",
    ]
    state = load_committed(out)
    assert state.records == 2 and state.parts == ["run1-00000-000"]
    assert state.ledger.books("/in").final == [(0, 2)]  # what a resumed reader of "/in" skips
    registry = PartitionedRegistry(partitions=3)
    assert registry.load(out, state.parts) == 2  # the owners come back from the committed index
    again, fresh = record_item(0), record_item(2)
    assert registry.claim([(again.key, "/in/copy.jpg"), (fresh.key, fresh.uri)]) == ["/in/0.jpg", None]


def test_outputs_of_engine_v2_are_refused_with_what_to_do(tmp_path):
    """Engine v2 resumed image by image (its markers name no sources): resuming one is refused, saying how
    to go on, and its parts still read as they are."""
    out = Folder(tmp_path)
    writer = PartWriter(out, "run1", 0, shard_size=5)
    writer.add(record_item(0))
    writer.close()
    marker = json.loads((tmp_path / "_commits" / "run1-00000-000.json").read_text())
    del marker["sources"]
    (tmp_path / "_commits" / "run1-00000-000.json").write_text(json.dumps(marker))
    assert clean_uncommitted(out) == []
    with pytest.raises(OldOutputError, match="engine v2.*new --output"):
        load_committed(out)
    assert len(pd.read_parquet(tmp_path / "index")) == 1


def test_stage_error_rejects_are_read_again_and_superseded(tmp_path):
    """A `stage error` reject is not final: the books list it as pending (a rerun reads it again), and the
    later part that covers the same member replaces it, in the counts and in rejects.parquet."""
    out = Folder(tmp_path)
    first = PartWriter(out, "run1", 0, shard_size=5)
    first.add(record_item(0))
    failed = record_item(1)
    failed.reject("caption", "stage error: RuntimeError: CUDA out of memory")
    first.add(failed)
    first.close()
    state = load_committed(out)
    books = state.ledger.books("/in")
    assert books.final == [(0, 1)] and books.pending == {1}
    second = PartWriter(out, "run2", 0, shard_size=5)
    second.add(record_item(1))
    second.close()
    state = load_committed(out)
    assert state.ledger.books("/in").covered() == [(0, 2)] and state.ledger.superseded == 1
    assert state.records == 2 and state.effective_rejects == 0
    assert state.ledger.problems({"/in": 2}) == []
    assert merge_rejects(out, max_rows=100) == 0


def test_no_merged_rejects_file_past_its_size(tmp_path):
    out = Folder(tmp_path)
    writer = PartWriter(out, "run1", 0, shard_size=5)
    for n in range(3):
        writer.add(reject_item(n))
    writer.close()
    assert merge_rejects(out, max_rows=3) == 3 and (tmp_path / "rejects.parquet").exists()
    assert merge_rejects(out, max_rows=2) is None and not (tmp_path / "rejects.parquet").exists()
    assert len(pd.read_parquet(tmp_path / "rejects")) == 3  # the parts stay the record


def test_parts_on_object_storage_have_the_local_layout_and_resume(s3_bucket):
    """The same writer against a real S3 endpoint on loopback: parts, markers, clean-up, resume state."""
    out = Folder(f"s3://{s3_bucket}/out")
    writer = PartWriter(out, "run1", 0, shard_size=2)
    for n in range(3):
        writer.add(record_item(n))
    writer.add(reject_item(0))
    writer.close()
    out.write_bytes("shards/run1-00000-009.tar", b"partial")  # a part without a marker
    assert clean_uncommitted(out) == ["shards/run1-00000-009.tar"]
    assert out.list("shards") == ["run1-00000-000.tar", "run1-00000-001.tar"]
    assert merge_rejects(out, max_rows=100) == 1
    state = load_committed(out)
    assert state.records == 3 and state.rejects == 1 and state.ledger.books("/in").final == [(0, 3)]
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(out.read_bytes("shards/run1-00000-000.tar"))) as tar:
        assert len([m for m in tar.getnames() if m.endswith(".json")]) == 2
