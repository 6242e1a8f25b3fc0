"""Listing every supported input kind (local and on S3), in stable order, bounded reads, hostile tars."""

import io
import json
import os
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from engine.sources import InputError, ReadError, list_inputs, listing_table, read_bytes
from engine.storage import filesystem_for

FIXTURE = Path(__file__).parent / "fixtures" / "fixture100"


def test_folder_lists_images_only_sorted_and_limit_is_a_prefix():
    items = list_inputs([str(FIXTURE)])
    assert len(items) == 100
    assert [i.uri for i in items] == sorted(i.uri for i in items)
    assert all(not i.uri.endswith((".json", ".md")) for i in items)
    assert [i.uri for i in list_inputs([str(FIXTURE)], limit=7)] == [i.uri for i in items[:7]]


def test_tar_members_are_read_by_offset(tmp_path):
    tar_path = tmp_path / "a.tar"
    names = ["scene_001.jpg", "scene_002.jpg"]
    with tarfile.open(tar_path, "w") as tar:
        for name in names:
            tar.add(FIXTURE / name, arcname=f"sub/{name}")
        tar.add(FIXTURE / "annotations.json", arcname="annotations.json")
    items = list_inputs([str(tmp_path / "*.tar")])
    assert [i.uri.split("#")[1] for i in items] == [f"sub/{n}" for n in names]
    for item, name in zip(items, names, strict=True):
        assert read_bytes(item.path, item.offset, item.size, 1 << 20) == (FIXTURE / name).read_bytes()
    with pytest.raises(ReadError, match="file too large"):
        read_bytes(items[0].path, items[0].offset, items[0].size, 10)


def test_tables_and_coco_json(tmp_path):
    uris = [str(FIXTURE / "scene_003.jpg"), "file://" + str(FIXTURE / "scene_004.jpg")]
    pd.DataFrame({"uri": uris, "dataset": ["x", "y"]}).to_parquet(tmp_path / "t.parquet")
    items = list_inputs([str(tmp_path / "t.parquet")])
    assert [i.dataset for i in items] == ["x", "y"] and items[1].path.endswith("scene_004.jpg")
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"uri": u}) for u in uris))
    assert len(list_inputs([str(tmp_path / "t.jsonl")])) == 2
    coco = list_inputs([str(FIXTURE / "annotations.json")])
    assert len(coco) == 100 and all(Path(i.path).exists() for i in coco)


def test_missing_and_unsupported_inputs_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        list_inputs([str(tmp_path / "nope")])
    with pytest.raises(InputError, match="matches nothing"):
        list_inputs([str(tmp_path / "*.tar")])
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(InputError, match="unsupported input"):
        list_inputs([str(tmp_path / "x.csv")])
    pd.DataFrame({"path": ["a"]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(InputError, match="'uri' column"):
        list_inputs([str(tmp_path / "bad.parquet")])


# --- untrusted tars: every bad member is a reject with a reason, nothing touches the file system -----------

SCENES = [FIXTURE / f"scene_{n:03d}.jpg" for n in range(3)]


def _member(
    tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""
):
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, len(data), link
    tar.addfile(info, io.BytesIO(data) if data else None)


def _write_tar(path: Path, extra=None) -> Path:
    """A tar with the three scene images under ok/, then whatever `extra(tar)` adds."""
    with tarfile.open(path, "w") as tar:
        for scene in SCENES:
            _member(tar, f"ok/{scene.name}", scene.read_bytes())
        if extra is not None:
            extra(tar)
    return path


def _decoded_captions(items: list) -> dict[str, str | None]:
    """{uri: the input caption decode put into the record} (workers read the caption files)."""
    from engine.items import batch_to_items
    from stages.decode import Decode, DecodeConfig

    table = listing_table(items)
    batch = {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}
    out = Decode(DecodeConfig(), claim=lambda pairs: [None] * len(pairs))(batch)
    return {item.uri: item.record["caption"]["input"] for item in batch_to_items(out)}


def _decode(items: list, max_bytes: int = 1 << 24) -> dict[str, str]:
    """Run the real decode stage over a listing; {uri: reject reason or ""}."""
    from stages.decode import Decode, DecodeConfig

    table = listing_table(items)
    batch = {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}
    out = Decode(DecodeConfig(max_bytes=max_bytes), claim=lambda pairs: [None] * len(pairs))(batch)
    return dict(zip(out["uri"], out["error_reason"], strict=True))


def _decode_units(path: Path, max_bytes: int = 1 << 24) -> dict[str, str]:
    """The same through work units: the tar read in one streaming pass by a worker (engine.units)."""
    from engine.units import list_units, rows_table, unit_rows
    from stages.decode import Decode, DecodeConfig

    rows = [row for unit in list_units([str(path)]) for row in unit_rows(unit, max_bytes)]
    table = rows_table(rows)
    batch = {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}
    out = Decode(DecodeConfig(max_bytes=max_bytes), claim=lambda pairs: [None] * len(pairs))(batch)
    return dict(zip(out["uri"], out["error_reason"], strict=True))


@pytest.fixture(params=["listing", "units"])
def reasons_of(request):
    """{uri: reject reason or ""} of a tar through decode: listed by headers on the driver and read by
    offset (item-level, engine v2), or read front to back by a worker (work units): the same verdicts."""
    if request.param == "listing":
        return lambda path, max_bytes=1 << 24: _decode(list_inputs([str(path)]), max_bytes)
    return _decode_units


BAD_MEMBERS = {
    "dotdot": (lambda t: _member(t, "../evil.jpg", b"x" * 10), "unsafe member name: '../evil.jpg'"),
    "nested_dotdot": (
        lambda t: _member(t, "a/../../evil.jpg", b"x"),
        "unsafe member name: 'a/../../evil.jpg'",
    ),
    "absolute": (lambda t: _member(t, "/tmp/evil.jpg", b"x" * 10), "unsafe member name: '/tmp/evil.jpg'"),
    "symlink": (
        lambda t: _member(t, "link.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd"),
        "unsafe member: symlink 'link.jpg' -> '/etc/passwd'",
    ),
    "hardlink": (
        lambda t: _member(t, "hard.jpg", kind=tarfile.LNKTYPE, link="ok/scene_000.jpg"),
        "unsafe member: hard link 'hard.jpg'",
    ),
    "device": (
        lambda t: _member(t, "dev.jpg", kind=tarfile.CHRTYPE),
        "unsafe member: device or fifo 'dev.jpg'",
    ),
    "fifo_no_image_suffix": (
        lambda t: _member(t, "pipe", kind=tarfile.FIFOTYPE),
        "unsafe member: device or fifo 'pipe'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_MEMBERS))
def test_unsafe_tar_members_are_rejects_with_reasons(tmp_path, case, reasons_of):
    add, reason = BAD_MEMBERS[case]
    tar_path = _write_tar(tmp_path / "bad.tar", add)
    before = sorted(tmp_path.parent.rglob("*"))
    reasons = reasons_of(tar_path)
    assert sorted(tmp_path.parent.rglob("*")) == before  # nothing extracted or created anywhere
    good = {f"{tar_path}#ok/{s.name}" for s in SCENES}
    assert {uri for uri, why in reasons.items() if not why} == good
    (bad_uri, bad_reason), *others = [(u, r) for u, r in reasons.items() if r]
    assert not others and bad_uri.startswith(f"{tar_path}#") and bad_reason.startswith(reason)


def test_truncated_tar_keeps_complete_members_and_rejects_the_rest(tmp_path, reasons_of):
    tar_path = _write_tar(tmp_path / "full.tar")
    with tarfile.open(tar_path) as tar:
        last = tar.getmembers()[-1]
    data = tar_path.read_bytes()
    cut_data = tmp_path / "cut_data.tar"
    cut_data.write_bytes(data[: last.offset_data + 100])  # inside the last member's data
    reasons = reasons_of(cut_data)
    assert [r for r in reasons.values()][:2] == ["", ""]
    assert reasons[f"{cut_data}#ok/scene_002.jpg"].startswith(
        f"truncated tar: member 'ok/scene_002.jpg' needs bytes up to {last.offset_data + last.size}"
    )
    cut_header = tmp_path / "cut_header.tar"
    cut_header.write_bytes(data[: last.offset + 100])  # inside the last member's header
    reasons = reasons_of(cut_header)
    assert list(reasons.values())[:2] == ["", ""] and len(reasons) == 3
    assert reasons[f"{cut_header}#@{last.offset}"].startswith(
        f"truncated tar: unreadable header at byte {last.offset}"
    )
    first_cut = tmp_path / "first.tar"
    first_cut.write_bytes(data[:1000])  # even the first member is incomplete: one reject, not a failed run
    assert list(reasons_of(first_cut).values()) == [
        f"truncated tar: member 'ok/scene_000.jpg' needs bytes up to {512 + SCENES[0].stat().st_size} "
        "but the file ends at byte 1000; anything after it is lost"
    ]


def test_huge_members_and_headers_are_bounded(tmp_path, reasons_of):
    def huge_pax(tar):
        info = tarfile.TarInfo("PaxHeaders/x")
        info.type, info.size = tarfile.XHDTYPE, 2 << 20  # tarfile would read this header whole
        tar.addfile(info)

    tar_path = _write_tar(tmp_path / "pax.tar", huge_pax)
    reasons = reasons_of(tar_path, max_bytes=SCENES[1].stat().st_size)
    assert reasons[f"{tar_path}#ok/scene_000.jpg"].startswith("file too large: ")  # bigger than scene_001
    assert reasons[f"{tar_path}#ok/scene_001.jpg"] == ""
    (cut,) = [r for u, r in reasons.items() if "#@" in u]
    assert cut.startswith("corrupt tar after byte") and "metadata header of 2097152 bytes" in cut


def test_not_a_tar_is_an_input_error_naming_the_file(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar archive\n" * 100)
    with pytest.raises(InputError, match=r"junk\.tar: not a readable \(uncompressed\) tar"):
        list_inputs([str(tmp_path / "junk.tar")])
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(InputError, match="empty.tar: not a readable"):
        list_inputs([str(tmp_path / "empty.tar")])


def test_webdataset_siblings_locate_caption_members(tmp_path):
    def captions(tar):
        _member(tar, "ok/scene_000.txt", b"a caption")
        _member(tar, "ok/scene_000.json", b'{"k": 1}')

        _member(tar, "long/" + "x" * 200 + ".jpg", SCENES[0].read_bytes())  # a pax long-name header

    tar_path = _write_tar(tmp_path / "wds.tar", captions)
    items = list_inputs([str(tar_path)])
    assert [i.uri.split("#")[1] for i in items] == [f"ok/{s.name}" for s in SCENES] + [
        "long/" + "x" * 200 + ".jpg"
    ]
    assert read_bytes(items[3].path, items[3].offset, items[3].size, 1 << 20) == SCENES[0].read_bytes()
    siblings = json.loads(items[0].siblings)
    assert sorted(siblings) == ["json", "txt"] and items[1].siblings == ""
    offset, size = siblings["txt"]
    assert read_bytes(items[0].path, offset, size, 100) == b"a caption"


# --- object storage (S3 on 127.0.0.1 through moto's server) -----------------------------------------------


def _put(bucket: str, key: str, data: bytes) -> str:
    fs, path = filesystem_for(f"s3://{bucket}/{key}")
    with fs.open_output_stream(path) as out:
        out.write(data)
    return f"s3://{bucket}/{key}"


def _tree(root: Path) -> dict[str, bytes]:
    """A small folder tree with nested folders, a hidden folder, hidden and non-image files."""
    files = {
        "z_root.jpg": SCENES[0].read_bytes(),
        "b/scene_001.jpg": SCENES[1].read_bytes(),
        "a/scene_002.jpg": SCENES[2].read_bytes(),
        "a/deeper/odd_rgba.png": (FIXTURE / "odd_rgba.png").read_bytes(),
        "a/notes.md": b"not an image",
        "b/scene_001.txt": b"alt text beside the image",
        "a/scene_002.json": json.dumps({"caption": "caption in metadata"}).encode(),
        "a/.hidden.jpg": b"hidden",
        ".cache/x.jpg": b"hidden folder",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_s3_prefix_lists_like_a_local_folder_and_reads_bytes(tmp_path, s3_bucket):
    files = _tree(tmp_path / "tree")
    for rel, data in files.items():
        _put(s3_bucket, f"tree/{rel}", data)
    local = list_inputs([str(tmp_path / "tree")])
    remote = list_inputs([f"s3://{s3_bucket}/tree/"])
    rel = [i.uri[len(f"s3://{s3_bucket}/tree/") :] for i in remote]
    assert rel == [os.path.relpath(i.uri, tmp_path / "tree") for i in local]  # same images, same order
    assert [i.siblings for i in remote] == [i.siblings for i in local]  # captions beside them, same sizes
    assert rel == ["z_root.jpg", "a/scene_002.jpg", "a/deeper/odd_rgba.png", "b/scene_001.jpg"]
    assert {i.dataset for i in remote} == {"tree"} and all(i.path == i.uri for i in remote)
    for item, name in zip(remote, rel, strict=True):
        assert read_bytes(item.path, item.offset, item.size, 1 << 20) == files[name]
    assert list_inputs([f"s3://{s3_bucket}/tree"], limit=2) == remote[:2]
    with pytest.raises(ReadError, match=r"file too large: \d+ bytes > decode.max_bytes=100"):
        read_bytes(remote[0].path, -1, -1, 100)
    with pytest.raises(ReadError, match="unreadable"):
        read_bytes(f"s3://{s3_bucket}/tree/gone.jpg", -1, -1, 100)
    reasons = _decode(remote)
    assert list(reasons.values()) == ["", "", "", ""]
    captions = {uri: text for uri, text in _decoded_captions(remote).items() if text}
    assert captions == {
        f"s3://{s3_bucket}/tree/a/scene_002.jpg": "caption in metadata",
        f"s3://{s3_bucket}/tree/b/scene_001.jpg": "alt text beside the image",
    }


def test_s3_tar_glob_lists_headers_and_reads_members_by_range(tmp_path, s3_bucket):
    for name in ("000", "001"):
        _put(s3_bucket, f"shards/{name}.tar", _write_tar(tmp_path / f"{name}.tar").read_bytes())
    _put(s3_bucket, "shards/nested/002.tar", (tmp_path / "000.tar").read_bytes())  # one level down: no match
    _put(s3_bucket, "shards/readme.txt", b"x")
    data = _write_tar(tmp_path / "cut.tar").read_bytes()
    with tarfile.open(tmp_path / "cut.tar") as tar:
        last = tar.getmembers()[-1]
    _put(s3_bucket, "cut/003.tar", data[: last.offset_data + 100])  # the last member loses its tail
    items = list_inputs([f"s3://{s3_bucket}/shards/*.tar", f"s3://{s3_bucket}/cut/003.tar"])
    uris = [i.uri for i in items]
    assert uris[:6] == [
        f"s3://{s3_bucket}/shards/{n}.tar#ok/{s.name}" for n in ("000", "001") for s in SCENES
    ]
    assert uris[6:8] == [f"s3://{s3_bucket}/cut/003.tar#ok/{s.name}" for s in SCENES[:2]] and len(uris) == 9
    for item in items[:8]:
        expected = (FIXTURE / item.uri.rsplit("/", 1)[1]).read_bytes()
        assert item.offset > 0 and read_bytes(item.path, item.offset, item.size, 1 << 20) == expected
    assert items[8].problem.startswith("truncated tar: member 'ok/scene_002.jpg'")
    reasons = _decode(items)
    assert [r for r in reasons.values() if r] == [items[8].problem]
    with pytest.raises(InputError, match="matches nothing"):
        list_inputs([f"s3://{s3_bucket}/shards/*.parquet"])


def test_s3_tables_of_uris_and_limit(tmp_path, s3_bucket):
    uris = [_put(s3_bucket, f"img/{s.name}", s.read_bytes()) for s in SCENES]
    rows = [{"uri": uris[0], "dataset": "d0"}, {"uri": uris[1]}, {"uri": "../img/scene_002.jpg"}]
    _put(s3_bucket, "tables/t.jsonl", "\n".join(json.dumps(r) for r in rows).encode())
    items = list_inputs([f"s3://{s3_bucket}/tables/t.jsonl"])
    assert [i.uri for i in items] == [uris[0], uris[1], "../img/scene_002.jpg"]
    assert [i.path for i in items] == uris and [i.dataset for i in items] == ["d0", "t", "t"]
    assert [read_bytes(i.path, i.offset, i.size, 1 << 20) for i in items] == [s.read_bytes() for s in SCENES]
    pd.DataFrame({"uri": uris}).to_parquet(tmp_path / "local.parquet")  # a local table of s3 URIs
    assert [i.path for i in list_inputs([str(tmp_path / "local.parquet")], limit=2)] == uris[:2]


def test_s3_missing_bucket_prefix_and_unsupported_uris_are_clear_errors(tmp_path, s3_bucket):
    with pytest.raises(InputError, match="bucket 'no-such-bucket' does not exist .*never creates buckets"):
        list_inputs(["s3://no-such-bucket/prefix"])
    with pytest.raises(InputError, match="bucket 'no-such-bucket' does not exist"):
        list_inputs(["s3://no-such-bucket/shards/*.tar"])
    with pytest.raises(InputError, match="does not exist"):
        list_inputs([f"s3://{s3_bucket}/nothing/here"])
    (tmp_path / "t.jsonl").write_text(json.dumps({"uri": "http://example.invalid/a.jpg"}))
    with pytest.raises(InputError, match="unsupported URI scheme 'http'"):
        list_inputs([str(tmp_path / "t.jsonl")])


# --- an object store that fails for reasons of its own ------------------------------------------------------


class FlakyStore:
    """A pyarrow-like filesystem whose reads fail `failures` times with a network error, then succeed."""

    def __init__(self, data: bytes, failures: int, error: OSError) -> None:
        self.data, self.failures, self.error, self.opened = data, failures, error, 0

    def open_input_file(self, path: str):
        self.opened += 1
        if self.opened <= self.failures:
            raise self.error
        return _Handle(self.data)


class _Handle(io.BytesIO):
    def size(self) -> int:
        return len(self.getvalue())

    def read_at(self, size: int, offset: int) -> bytes:
        return self.getvalue()[offset : offset + size]


def _flaky(monkeypatch, failures: int, error: OSError | None = None) -> FlakyStore:
    import engine.sources as sources

    error = error or OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 7")
    store = FlakyStore(b"jpeg bytes", failures, error)
    monkeypatch.setattr(sources, "filesystem_for", lambda uri: (store, uri.split("://", 1)[1]))
    monkeypatch.setattr(sources, "RETRY_BACKOFF_S", 0.0)
    return store


def test_a_network_blip_is_retried_and_the_image_read(monkeypatch):
    store = _flaky(monkeypatch, failures=2)
    assert read_bytes("s3://bucket/a.jpg", -1, -1, 100) == b"jpeg bytes"
    assert store.opened == 3


def test_a_store_that_keeps_failing_stops_the_batch_instead_of_rejecting_its_images(monkeypatch):
    """A reject is committed and skipped on resume: an outage must not turn good images into rejects."""
    from engine.errors import RetryableError
    from engine.items import Item
    from engine.sources import TransientReadError
    from engine.stage import Stage

    store = _flaky(monkeypatch, failures=99)
    with pytest.raises(TransientReadError, match="NETWORK_CONNECTION.*3 attempts"):
        read_bytes("s3://bucket/a.jpg", -1, -1, 100)
    assert store.opened == 3 and issubclass(TransientReadError, RetryableError)

    class Reads(Stage):  # the contract every stage runs under: an item's own failure rejects only it
        name = "reads"

        def __init__(self) -> None:
            self.provenance = {}

        def process(self, items: list[Item]) -> None:
            for item in items:
                item.image = read_bytes(item.uri, -1, -1, 100)

    items = [Item("", "s3://bucket/a.jpg", b"", {}), Item("", "s3://bucket/b.jpg", b"", {})]
    with pytest.raises(TransientReadError):
        Reads().run(items)
    assert all(item.ok for item in items)  # nothing rejected: Ray retries the task, or a rerun resumes


@pytest.mark.parametrize("error", [FileNotFoundError("no such key"), PermissionError("access denied")])
def test_a_missing_or_forbidden_object_is_a_reject_without_retries(monkeypatch, error):
    store = _flaky(monkeypatch, failures=99, error=error)
    with pytest.raises(ReadError, match="unreadable"):
        read_bytes("s3://bucket/a.jpg", -1, -1, 100)
    assert store.opened == 1
