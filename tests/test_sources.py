"""Listing every supported input kind, in stable order, and bounded reads."""

import json
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from engine.sources import InputError, ReadError, list_inputs, read_bytes

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
