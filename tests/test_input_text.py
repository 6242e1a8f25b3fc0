"""An input's own text: webdataset .txt/.json members, table caption/conversation columns, COCO captions,
carried by listing into decode; `stages.caption.source` picks input, VLM or both."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from engine.input_text import decode_text
from engine.items import Item
from engine.sources import list_inputs

FIXTURE = Path(__file__).parent / "fixtures" / "fixture100"
ANNOTATIONS = json.loads((FIXTURE / "annotations.json").read_text())
ALT = {im["file_name"]: im["caption"] for im in ANNOTATIONS["images"]}


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_wds(path: Path, names: list[str], conversation: bool = False) -> Path:
    """A webdataset tar: per sample `{key}.jpg` + `{key}.txt` (alt text), optionally `{key}.json`."""
    with tarfile.open(path, "w") as tar:
        for i, name in enumerate(names):
            key = f"{i:05d}"
            add_bytes(tar, f"{key}.jpg", (FIXTURE / name).read_bytes())
            add_bytes(tar, f"{key}.txt", ALT[name].encode())
            if conversation:
                turns = [
                    {"from": "human", "value": "<image>\\nWhat is shown?"},
                    {"from": "gpt", "value": "A ring."},
                ]
                add_bytes(tar, f"{key}.json", json.dumps({"url": "x", "conversations": turns}).encode())
    return path


def decode_listing(items: list) -> list:
    """Records (None for a reject) of the real decode stage over a listing, in listing order."""
    from engine.dedupe import KeyRegistry
    from engine.items import batch_to_items
    from engine.sources import listing_table
    from stages.decode import Decode, DecodeConfig

    table = listing_table(items)
    batch = {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}
    return [i.record for i in batch_to_items(Decode(DecodeConfig(), claim=KeyRegistry().claim)(batch))]


def test_webdataset_alt_text_and_conversation_travel_with_the_image(tmp_path):
    """The driver notes where a sample's .txt/.json members are; decode (in a worker) reads them."""
    names = ["scene_000.jpg", "scene_001.jpg"]
    items = list_inputs([str(write_wds(tmp_path / "a.tar", names, conversation=True))])
    assert all(set(json.loads(i.siblings)) == {"txt", "json"} and not i.text for i in items)
    records = decode_listing(items)
    assert [r["caption"]["input"] for r in records] == [ALT[n] for n in names]
    turns = records[0]["grounded_conversation"]
    assert turns[1] == {"role": "gpt", "text": "A ring.", "spans": []}


def test_folder_captions_and_metadata_beside_images_are_read_by_decode(tmp_path):
    """`scene.txt` / `scene.json` beside `scene.jpg` act like a webdataset sample's members: listing notes
    them, decode reads them (bounded), and a caption file too large or gone leaves the image unharmed."""
    from engine.input_text import MAX_TEXT_BYTES

    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    names = ["scene_000.jpg", "scene_001.jpg", "scene_002.jpg", "scene_003.jpg", "sub/scene_005.jpg"]
    for name in names:
        (folder / name).write_bytes((FIXTURE / Path(name).name).read_bytes())
    (folder / "scene_000.txt").write_text(ALT["scene_000.jpg"])
    turns = [{"from": "human", "value": "What is shown?"}, {"from": "gpt", "value": "A ring."}]
    (folder / "scene_001.json").write_text(json.dumps({"caption": "from json", "conversations": turns}))
    (folder / "scene_002.txt").write_bytes(b"x" * (MAX_TEXT_BYTES + 1))  # bounded: ignored, not read
    (folder / "sub" / "scene_005.txt").write_text("deeper")
    (folder / "scene_006.txt").write_text("a caption without an image")
    (folder / "notes.json").write_text("{}")

    items = list_inputs([str(folder)])
    assert [Path(i.path).relative_to(folder).as_posix() for i in items] == names
    assert json.loads(items[0].siblings) == {"txt": [-1, len(ALT["scene_000.jpg"])]}
    assert set(json.loads(items[1].siblings)) == {"json"} and items[3].siblings == ""
    assert not any(i.text for i in items)  # the driver read no caption bytes

    (folder / "sub" / "scene_005.txt").unlink()  # gone between listing and decode
    records = decode_listing(items)
    assert all(r is not None for r in records)
    captions = [r["caption"]["input"] for r in records]
    assert captions == [ALT["scene_000.jpg"], "from json", None, None, None]
    assert records[1]["grounded_conversation"][1] == {"role": "gpt", "text": "A ring.", "spans": []}


def test_tables_and_coco_captions_are_carried(tmp_path):
    table = tmp_path / "t.parquet"
    rows = [
        {"uri": str(FIXTURE / "scene_002.jpg"), "caption": "a red ring"},
        {"uri": str(FIXTURE / "scene_003.jpg")},
    ]
    pd.DataFrame(rows).to_parquet(table)
    texts = [decode_text(i.text) for i in list_inputs([str(table)])]
    assert texts[0] == {"caption": "a red ring"} and texts[1] == {}
    coco = list_inputs([str(FIXTURE / "annotations.json")], limit=2)
    assert decode_text(coco[0].text)["caption"] == ALT["scene_000.jpg"]
    captions = tmp_path / "captions.json"  # COCO captions format: annotations[].caption
    images = [{"id": 5, "file_name": str(FIXTURE / "scene_004.jpg")}]
    anns = [{"id": 2, "image_id": 5, "caption": "second"}, {"id": 1, "image_id": 5, "caption": "first"}]
    captions.write_text(json.dumps({"images": images, "annotations": anns, "categories": []}))
    assert decode_text(list_inputs([str(captions)])[0].text) == {"caption": "first"}


@pytest.mark.parametrize("source", ["input", "both", "vlm"])
def test_caption_source_decides_between_input_text_and_vlm(source, monkeypatch):
    import stages.caption as caption_module
    from pipelines.rexverse2m import load_job_config as load_config

    class FakeVLM:
        def __init__(self, *a, **k) -> None:
            pass

        def generate(self, images, prompts):
            return ["a vlm caption of the image."] * len(images)

    monkeypatch.setattr("stages.vlm.ChatVLM", FakeVLM)  # the stage imports it when it first captions
    cfg = load_config(
        Path(__file__).parents[1] / "configs" / "fixture.yaml", [f"stages.caption.source={source}"]
    )
    stage = caption_module.Caption(cfg.stages.caption)
    with_text = Item(
        "d" * 64, "/a.jpg", (FIXTURE / "scene_000.jpg").read_bytes(), {"caption": {"input": "a red ring."}}
    )
    without = Item("e" * 64, "/b.jpg", (FIXTURE / "scene_001.jpg").read_bytes(), {"caption": {"input": None}})
    stage.run([with_text, without])
    assert without.record["caption"]["text"] == "A vlm caption of the image."  # no text: the VLM writes it
    first = with_text.record["caption"]
    expected = {
        "input": {"text": "a red ring.", "model": "input", "input": None},
        "both": {"text": "A vlm caption of the image.", "model": "tiny:qwen2-vl", "input": "a red ring."},
        "vlm": {"text": "A vlm caption of the image.", "model": "tiny:qwen2-vl", "input": None},
    }[source]
    assert first == expected
