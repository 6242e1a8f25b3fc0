"""Work units: the driver lists sources without reading them; a worker reads a tar in one forward stream."""

import io
import json
import tarfile
from pathlib import Path

import pytest

from engine import units
from engine.sources import InputError
from engine.storage import Folder
from engine.units import list_units, recorded_members, unit_rows

FIXTURE = Path(__file__).parent / "fixtures" / "fixture100"
SCENES = sorted(FIXTURE.glob("scene_*.jpg"))[:6]


def write_wds(path: Path, captions: bool = True) -> Path:
    with tarfile.open(path, "w") as tar:
        for n, scene in enumerate(SCENES):
            members = [(f"s{n:03d}.jpg", scene.read_bytes())]
            if captions:
                members.append((f"s{n:03d}.txt", f"caption {n}".encode()))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_the_driver_lists_a_tar_without_opening_it(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"not a tar at all")  # listing would fail if it read a byte
    write_wds(tmp_path / "b.tar")
    found = list(list_units([str(tmp_path / "*.tar")]))
    assert [(u.kind, Path(u.source).name) for u in found] == [("tar", "a.tar"), ("tar", "b.tar")]
    with pytest.raises(InputError, match=r"a\.tar: not a readable \(uncompressed\) tar"):
        list(unit_rows(found[0], 1 << 20))  # the worker finds out


def test_a_worker_reads_a_tar_in_one_forward_stream_with_its_captions(tmp_path, monkeypatch):
    path = write_wds(tmp_path / "w.tar")
    calls: list[str] = []
    real = units._filesystem

    class Counting:
        def __init__(self, fs):
            self.fs = fs

        def get_file_info(self, p):
            return self.fs.get_file_info(p)

        def open_input_stream(self, p):
            calls.append("stream")
            return self.fs.open_input_stream(p)

        def open_input_file(self, p):  # a ranged read per member would come through here
            calls.append("file")
            return self.fs.open_input_file(p)

    monkeypatch.setattr(units, "_filesystem", lambda loc: (Counting(real(loc)[0]), real(loc)[1]))
    (unit,) = list_units([str(path)])
    rows = list(unit_rows(unit, 1 << 24, Folder(tmp_path / "out")))
    assert calls == ["stream"]
    assert [r["uri"].split("#")[1] for r in rows] == [f"s{n:03d}.jpg" for n in range(len(SCENES))]
    assert [r["ordinal"] for r in rows] == list(range(len(SCENES)))
    assert rows[2]["data"] == SCENES[2].read_bytes() and not rows[2]["problem"]
    assert json.loads(rows[2]["text"]) == {"caption": "caption 2"}
    assert recorded_members(Folder(tmp_path / "out")) == {unit.source: len(SCENES)}


def test_resume_skips_committed_ordinals_and_limit_stops_early(tmp_path):
    path = write_wds(tmp_path / "w.tar", captions=False)
    (unit,) = list_units([str(path)])
    out = Folder(tmp_path / "out")
    unit.skip = json.dumps([[0, 2], [4, 5]])
    assert [r["ordinal"] for r in unit_rows(unit, 1 << 24, out)] == [2, 3, 5]
    unit.skip, unit.max_members = "", 3
    limited = tmp_path / "limited"
    assert [r["ordinal"] for r in unit_rows(unit, 1 << 24, Folder(limited))] == [0, 1, 2]
    assert recorded_members(Folder(limited)) == {}  # not read to its end: no member count


def test_a_source_that_changed_under_a_resume_is_refused(tmp_path):
    path = write_wds(tmp_path / "w.tar", captions=False)
    out = Folder(tmp_path / "out")
    (unit,) = list_units([str(path)])
    list(unit_rows(unit, 1 << 24, out))
    with tarfile.open(path, "a") as tar:  # one more member
        info = tarfile.TarInfo("extra.jpg")
        data = SCENES[0].read_bytes()
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(InputError, match="held 6 members when first read and 7 now"):
        list(unit_rows(unit, 1 << 24, out))


def test_folders_are_pages_and_parquet_tables_are_row_groups(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pages = list(list_units([str(FIXTURE)], page_files=40))
    assert [u.kind for u in pages] == ["files"] * 3 and [len(json.loads(u.entries)) for u in pages] == [
        40,
        40,
        20,
    ]
    table = pa.table({"uri": [str(s) for s in SCENES]})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=4)
    groups = list(list_units([str(tmp_path / "t.parquet")]))
    assert [u.source.rsplit("#", 1)[1] for u in groups] == ["rowgroup0", "rowgroup1"]
    rows = [r for u in groups for r in unit_rows(u, 1 << 24)]
    assert [r["uri"] for r in rows] == [str(s) for s in SCENES] and all(r["data"] for r in rows)


def test_a_pool_record_json_gives_pass_two_the_input_caption():
    from engine.input_text import decode_text, sample_text

    record = {"key": "k", "caption": {"text": "", "model": "", "input": "a red ball on grass"}}
    assert decode_text(sample_text({"json": json.dumps(record).encode()})) == {
        "caption": "a red ball on grass"
    }
    assert sample_text({"json": json.dumps({"caption": {"text": "", "input": None}}).encode()}) == ""
