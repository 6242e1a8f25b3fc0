"""Release builds (pipelines/release.py) from real engine outputs of the fixture.

Two small engine outputs are made once per session with `--no-ray`: A (the first 20 fixture images) and B
(2 images that are also in A plus 3 that are not), so dedupe, splits and diffs are tested on real records.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from release.build import MARKER, GateError, Options, ReleaseError, build
from release.plan import split_of
from tests.conftest import FIXTURE, FIXTURE_CONFIG, ROOT

SHARD_SIZE = 8
B_SHARED = ("scene_005.jpg", "scene_006.jpg")  # among the first 20 listed images, so also in A
B_NEW = ("scene_050.jpg", "scene_051.jpg", "scene_052.jpg")


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _quiet(_: str) -> None:
    pass


def _build(sources: list[Path | str], dest: Path | str, **kw) -> object:
    opts = Options(
        sources=[str(s) for s in sources],
        dest=str(dest),
        name="rexverse-fixture",
        shard_size=SHARD_SIZE,
        **kw,
    )
    return build(opts, progress=_quiet)


@pytest.fixture(scope="session")
def outputs(tmp_path_factory, engine_env) -> dict[str, object]:
    """Engine outputs A and B, and a digest of their files to prove the release never modifies them."""
    base = tmp_path_factory.mktemp("release_inputs")
    out_a, out_b, input_b = base / "A", base / "B", base / "input_b"
    input_b.mkdir()
    for name in (*B_SHARED, *B_NEW):
        shutil.copy(FIXTURE / name, input_b / name)
    runs = [
        ["--input", str(FIXTURE), "--output", str(out_a), "--limit", "20"],
        ["--input", str(input_b), "--output", str(out_b)],
    ]
    engine = [sys.executable, str(ROOT / "pipelines" / "rexverse2m.py"), "--config", str(FIXTURE_CONFIG)]
    procs = [  # both at once: most of a short --no-ray run is imports and model loading
        subprocess.Popen(
            [*engine, *args, "--no-ray", "--quiet"],
            env=engine_env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for args in runs
    ]
    for proc in procs:
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"engine failed ({proc.returncode}):\n{output[-4000:]}"
    return {"A": out_a, "B": out_b, "digest": {"A": _tree_digest(out_a), "B": _tree_digest(out_b)}}


@pytest.fixture(scope="session")
def release_a(outputs, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("releases") / "A"
    _build([outputs["A"]], dest)
    return dest


def _keys(out: Path) -> list[str]:
    return pq.read_table(out / "index", columns=["key"])["key"].to_pylist()


def _index(release: Path):
    return pq.read_table(release / "index").to_pandas()


def test_release_has_every_artifact_and_checksums_verify(release_a):
    for rel in (
        "README.md",
        "SHA256SUMS",
        "manifest.json",
        "stats.json",
        "gallery/index.html",
        "exports/coco.json",
        "exports/odvg.jsonl",
        "exports/llava.json",
        "rejects.parquet",
        "index/train.parquet",
        "plots/categories_top50.png",
        "plots/categories_rank_frequency.png",
        "plots/drops_rejects.png",
    ):
        assert (release_a / rel).is_file(), rel
    assert sorted((release_a / "shards").glob("*.tar")), "no shards"
    listed = [line.split("  ", 1)[1] for line in (release_a / "SHA256SUMS").read_text().splitlines()]
    on_disk = sorted(str(p.relative_to(release_a)) for p in release_a.rglob("*") if p.is_file())
    assert listed == [p for p in on_disk if p != "SHA256SUMS"]
    if shutil.which("sha256sum"):
        done = subprocess.run(
            ["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=release_a, capture_output=True
        )
        assert done.returncode == 0, done.stdout + done.stderr
    for line in (release_a / "SHA256SUMS").read_text().splitlines():
        digest, rel = line.split("  ", 1)
        assert hashlib.sha256((release_a / rel).read_bytes()).hexdigest() == digest, rel


def test_shards_fixed_size_sorted_and_records_verbatim(release_a, outputs):
    import tarfile

    keys = []
    tars = sorted((release_a / "shards").glob("*.tar"))
    for i, tar_path in enumerate(tars):
        with tarfile.open(tar_path) as tar:
            names = tar.getnames()
            shard_keys = [n.split(".")[0] for n in names if n.endswith(".json")]
            assert len(shard_keys) == SHARD_SIZE or i == len(tars) - 1
            assert all(m.mtime == 0 for m in tar.getmembers())
            keys += shard_keys
    assert keys == sorted(_keys(outputs["A"]))
    index = _index(release_a)
    assert index["key"].tolist() == keys and set(index["split"]) == {"train"}
    manifest = json.loads((release_a / "manifest.json").read_text())
    assert manifest["counts"]["records"] == len(keys)
    a_manifest = json.loads((outputs["A"] / "manifest.json").read_text())
    assert manifest["counts"]["rejects"] == a_manifest["counts"]["rejects"]
    assert manifest["inputs"][0]["config_hash"] == a_manifest["config_hash"]
    regions = sum(len(r) for r in index["regions"])
    assert manifest["counts"]["regions"] == regions and manifest["counts"]["tiers"]["category"] == regions


def test_card_front_matter_loads_and_matches_the_data(release_a):
    datasets = pytest.importorskip("datasets")
    text = (release_a / "README.md").read_text()
    assert text.startswith("---\n")
    header = yaml.safe_load(text.split("---\n")[1])
    assert header["license"] and "object-detection" in header["task_categories"]
    (config,) = header["configs"]
    assert config["data_files"] == [{"split": "train", "path": "index/train.parquet"}]
    schema = pq.read_schema(release_a / "index" / "train.parquet")
    assert header["dataset_info"]["features"] == datasets.Features.from_arrow_schema(schema)._to_yaml_list()
    for section in (
        "## How the data was made",
        "## Known limitations",
        "## How to load",
        "tiny:grounding-dino",
    ):
        assert section in text, section


def test_coco_export_evaluates_to_ap_1_against_itself(release_a):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco = COCO(str(release_a / "exports" / "coco.json"))
    index = _index(release_a)
    assert len(coco.getImgIds()) == len(index)  # every record is an image, with or without regions
    assert len(coco.getAnnIds()) == sum(len(r) for r in index["regions"])
    anns = coco.loadAnns(coco.getAnnIds())
    assert all(a["iscrowd"] == 0 and a["area"] > 0 and len(a["bbox"]) == 4 for a in anns)
    masked = [a for a in anns if "segmentation" in a]
    assert masked, "the fixture's segment stage should give masks"
    for iou_type, dets in (
        (
            "bbox",
            [
                {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
                for a in anns
            ],
        ),
        (
            "segm",
            [
                {
                    "image_id": a["image_id"],
                    "category_id": a["category_id"],
                    "segmentation": a["segmentation"],
                    "score": 1.0,
                }
                for a in masked
            ],
        ),
    ):
        gt = coco
        if iou_type == "segm":  # evaluate masks on the annotations that have one
            gt = COCO()
            gt.dataset = {**coco.dataset, "annotations": masked}
            gt.createIndex()
        result = gt.loadRes(dets)
        evaluator = COCOeval(gt, result, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        assert evaluator.stats[0] == pytest.approx(1.0), iou_type
    captions = json.loads((release_a / "exports" / "coco_captions.json").read_text())
    assert len(captions["annotations"]) == len(index)


def test_odvg_and_llava_exports(release_a):
    from chatrex.parsing import parse_answer

    index = _index(release_a).set_index("key")
    lines = [json.loads(line) for line in (release_a / "exports" / "odvg.jsonl").read_text().splitlines()]
    assert len(lines) == len(index)
    for line in lines:
        row = index.loc[line["filename"].split(".")[0]]
        assert len(line["grounding"]["regions"]) == len(row["regions"])
        assert all(r["phrase"] in line["grounding"]["caption"] for r in line["grounding"]["regions"])
    llava = json.loads((release_a / "exports" / "llava.json").read_text())
    assert len(llava) == len(index)
    checked = 0
    for sample in llava:
        row = index.loc[sample["id"]]
        if not len(row["regions"]):
            continue
        turns = sample["conversations"]
        assert turns[0]["value"].startswith("<image>\n<obj0><roi>") and turns[0]["from"] == "human"
        boxes = sample["boxes"]
        for question, answer in zip(turns[::2], turns[1::2], strict=True):
            if question["value"].startswith("Which object is"):  # referring -> the box of that region
                (grounding,) = parse_answer(answer["value"], len(boxes))
                named = [r["box"] for r in row["regions"] if r["referring"] == grounding.phrase]
                assert any(np.allclose(boxes[grounding.indices[0]], box, atol=1e-3) for box in named)
                checked += 1
    assert checked > 0


def test_rebuild_is_byte_identical_and_rerun_is_a_no_op(release_a, outputs, tmp_path):
    again = tmp_path / "again"
    result = _build([outputs["A"]], again)
    assert not result.up_to_date
    assert _tree_digest(again) == _tree_digest(release_a)
    before = _tree_digest(release_a)
    assert _build([outputs["A"]], release_a).up_to_date
    assert _tree_digest(release_a) == before


def test_interrupted_build_resumes_to_the_same_bytes(release_a, outputs, tmp_path, monkeypatch):
    import release.build as build_module

    real = build_module.write_shard
    calls = []

    def dies_on_second_shard(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    dest = tmp_path / "resumed"
    monkeypatch.setattr(build_module, "write_shard", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        _build([outputs["A"]], dest)
    assert (dest / MARKER).exists() and not (dest / "SHA256SUMS").exists()
    assert not list(dest.rglob(".*.tmp"))  # the shard being written was not left half-written
    monkeypatch.setattr(build_module, "write_shard", real)
    written = []
    monkeypatch.setattr(build_module, "write_shard", lambda *a, **k: (written.append(a[1]), real(*a, **k)))
    _build([outputs["A"]], dest)
    assert calls[0] not in written  # the finished shard was kept
    assert _tree_digest(dest) == _tree_digest(release_a)


def test_dedupe_across_inputs_first_wins_and_previous_diff(release_a, outputs, tmp_path):
    dest = tmp_path / "AB"
    result = _build([outputs["A"], outputs["B"]], dest, version="1.1.0", previous=str(release_a))
    keys_a, keys_b = set(_keys(outputs["A"])), set(_keys(outputs["B"]))
    shared = keys_a & keys_b
    assert len(shared) == len(B_SHARED)
    index = _index(dest)
    assert sorted(index["key"]) == sorted(keys_a | keys_b) and index["key"].is_unique
    assert result.duplicates == len(shared)
    duplicates = pq.read_table(dest / "duplicates.parquet").to_pylist()
    assert {d["key"] for d in duplicates} == shared
    assert all(
        d["kept_from"] == str(outputs["A"]) and d["dropped_from"] == str(outputs["B"]) for d in duplicates
    )
    source_of = dict(zip(index["key"], index["source_uri"], strict=True))
    assert all("input_b" not in source_of[k] for k in shared)  # A's record of the image was kept
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["counts"]["duplicates"] == len(shared)
    diff = manifest["diff"]
    assert diff["added"] == len(keys_b - keys_a) and diff["removed"] == 0
    assert (
        diff["tiers"]["category"]["delta"]
        == manifest["counts"]["tiers"]["category"]
        - json.loads((release_a / "manifest.json").read_text())["counts"]["tiers"]["category"]
    )
    card = (dest / "README.md").read_text()
    assert "## Changes since rexverse-fixture 1.0.0" in card and f"keys added: {diff['added']}" in card


def test_destination_rules(release_a, outputs, tmp_path):
    stranger = tmp_path / "not_a_release"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    with pytest.raises(ReleaseError, match="not empty and holds no release"):
        _build([outputs["A"]], stranger)
    assert (stranger / "notes.txt").read_text() == "keep me"
    copy = tmp_path / "copy"
    shutil.copytree(release_a, copy)
    with pytest.raises(ReleaseError, match="already holds a release"):
        _build([outputs["A"]], copy, version="2.0.0")
    with pytest.raises(ReleaseError, match="--previous"):
        _build([outputs["A"]], tmp_path / "new", previous=str(stranger))
    _build([outputs["A"]], copy, version="2.0.0", overwrite=True)
    assert json.loads((copy / "manifest.json").read_text())["version"] == "2.0.0"
    assert not (copy / MARKER).exists()


def test_split_by_key_hash_is_stable_across_releases(outputs, tmp_path):
    one = tmp_path / "one"
    two = tmp_path / "two"
    _build([outputs["A"]], one, split="val=0.3")
    _build([outputs["B"], outputs["A"]], two, split="val=0.3")
    split_one = dict(zip(*(_index(one)[c] for c in ("key", "split")), strict=True))
    split_two = dict(zip(*(_index(two)[c] for c in ("key", "split")), strict=True))
    assert set(split_one.values()) == {"train", "val"}
    assert all(split_two[k] == s == split_of(k, {"val": 0.3}) for k, s in split_one.items())
    assert sorted((one / "shards").glob("*/*.tar")) and not list((one / "shards").glob("*.tar"))
    header = yaml.safe_load((one / "README.md").read_text().split("---\n")[1])
    (config,) = header["configs"]
    assert {f["split"]: f["path"] for f in config["data_files"]} == {
        "train": "index/train.parquet",
        "val": "index/val.parquet",
    }


def test_quality_gate_refuses_and_writes_nothing(outputs, tmp_path):
    gated = tmp_path / "gated_input"
    shutil.copytree(outputs["A"], gated)
    dest = tmp_path / "refused"
    with pytest.raises(GateError, match="no audit.json"):
        _build([gated], dest, require=["box_recall@0.5>=0.5"])
    (gated / "audit.json").write_text(json.dumps({"box_recall@0.5": 0.7, "box_precision@0.5": 0.4}))
    with pytest.raises(GateError, match=r"box_precision@0.5 = 0.4, required box_precision@0.5>=0.5"):
        _build([gated], dest, require=["box_recall@0.5>=0.6", "box_precision@0.5>=0.5"])
    with pytest.raises(GateError, match="reject_rate"):
        _build([gated], dest, require=["reject_rate<=0.0"])  # the fixture's first 20 include one reject
    assert not dest.exists()
    with pytest.raises(ReleaseError, match="--require"):
        _build([gated], dest, require=["box_recall about 3"])
    _build([gated], dest, require=["box_recall@0.5>=0.6", "reject_rate<=0.5"])
    card = (dest / "README.md").read_text()
    assert "`box_recall@0.5=0.7`" in card and "every requirement passed" in card


def test_cli_gate_failure_exit_code_and_message(outputs, tmp_path):
    dest = tmp_path / "cli"
    command = [
        sys.executable,
        str(ROOT / "pipelines" / "release.py"),
        "--from",
        str(outputs["A"]),
        "--to",
        str(dest),
        "--require",
        "reject_rate<=0.0",
        "--quiet",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 3, done.stderr
    assert "release not written" in done.stderr and "reject_rate" in done.stderr
    assert not dest.exists()


def test_shards_load_in_hf_datasets(release_a):
    datasets = pytest.importorskip("datasets")
    files = sorted(str(p) for p in (release_a / "shards").glob("*.tar"))
    ds = datasets.load_dataset("webdataset", data_files={"train": files}, split="train")
    index = _index(release_a)
    assert len(ds) == len(index)
    row = ds[0]
    assert row["__key__"] == index["key"][0] and row["json"]["key"] == index["key"][0]
    assert row["jpg"].size == (row["json"]["width"], row["json"]["height"])
    table = datasets.load_dataset(str(release_a), split="train")  # the card's own config and features
    assert table["key"] == index["key"].tolist()


def test_inputs_are_never_modified(outputs, release_a):
    assert _tree_digest(outputs["A"]) == outputs["digest"]["A"]
    assert _tree_digest(outputs["B"]) == outputs["digest"]["B"]


def test_tiers_count_present_fields_only(tmp_path):
    """Records with null short_phrase/description/referring (issue #10): counts and exports cope."""
    from engine.storage import Folder
    from release.exports import Exporter
    from release.gallery import render
    from release.stats import StatsCollector

    record = {
        "key": "a" * 64,
        "width": 100,
        "height": 80,
        "image_ext": "jpg",
        "caption": {"text": "a red ball near a box"},
        "phrases": [{"text": "a red ball", "start": 0, "end": 10}, {"text": "a box", "start": 16, "end": 21}],
        "regions": [
            {
                "id": 0,
                "box": [1, 2, 30, 40],
                "score": 0.9,
                "phrase": 0,
                "category": "ball",
                "short_phrase": "red ball",
                "description": "A red ball.",
                "referring": "the red ball on the left",
            },
            {
                "id": 1,
                "box": [50, 10, 90, 70],
                "score": 0.8,
                "phrase": 1,
                "category": "box",
                "short_phrase": None,
                "description": None,
                "referring": None,
            },
        ],
        "grounded_caption": {
            "text": "a red ball near a box",
            "spans": [
                {"start": 0, "end": 10, "phrase": 0, "regions": [0]},
                {"start": 16, "end": 21, "phrase": 1, "regions": [1]},
            ],
        },
        "proposals": [{"box": [0, 0, 50, 50], "score": 0.5}],
    }
    stats = StatsCollector()
    stats.add(record, "train")
    tiers = stats.to_dict([])["tiers"]
    assert [tiers[t]["regions"] for t in ("category", "short_phrase", "description", "referring")] == [
        2,
        1,
        1,
        1,
    ]
    dest = Folder(tmp_path)
    with Exporter(dest, {}) as exporter:
        exporter.add(record, "train", "shards/000000.tar")
    files = {p.name: p.read_bytes() for p in (tmp_path / "exports").iterdir()}
    llava = json.loads(files["llava.json"])[0]
    assert all(isinstance(t["value"], str) and t["value"] for t in llava["conversations"])
    assert sum("<obj" in t["value"] for t in llava["conversations"][1::2]) >= 3  # caption, detect, ground
    coco = json.loads(files["coco.json"])
    assert [("referring" in a) for a in coco["annotations"]] == [True, False]
    page = render("t", [(record, "train")], set(), 1)
    assert page.count("<rect") == 2 and page.count("class=none") == 3


def test_gallery_renders_boxes_in_headless_chromium(release_a, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip(
            "no headless browser: install Debian's chromium (apt-get install -y chromium) to run this test"
        )
    from PIL import Image

    from release.gallery import PALETTE

    def palette_pixels(url: str, name: str) -> int:
        shot = tmp_path / name
        subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--screenshot={shot}",
                "--window-size=1280,900",
                url,
            ],
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert shot.is_file(), f"{browser} wrote no screenshot"
        pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
        colours = np.array([[int(c[i : i + 2], 16) for i in (1, 3, 5)] for c in PALETTE])
        distance = np.abs(pixels[:, None, :] - colours[None, :, :]).sum(-1).min(1)
        return int((distance <= 24).sum())

    page = (release_a / "gallery" / "index.html").as_uri()
    with_boxes = palette_pixels(page, "boxes.png")
    without = palette_pixels(page + "#noboxes", "noboxes.png")
    assert with_boxes - without > 500, (with_boxes, without)  # box strokes, beyond swatches and images

    # the category filter runs in the browser: only cards with a region of that category stay visible
    html_text = (release_a / "gallery" / "index.html").read_text()
    cats = re.findall(r'data-cats="([^"]*)"', html_text)
    category = sorted({c for entry in cats for c in entry.strip("|").split("|") if c})[-1]
    dom = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--dump-dom",
            f"{page}#cat={quote(category)}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    ).stdout
    shown = re.findall(r'<div class="card" data-cats="([^"]*)"( style="display: none;")?', dom)
    assert len(shown) == len(cats)
    assert [not hidden for _, hidden in shown] == [f"|{category}|" in entry for entry in cats]
    assert 0 < sum(not hidden for _, hidden in shown) < len(cats) or len(set(cats)) == 1


@pytest.fixture()
def s3_server(monkeypatch):
    """A moto S3 server on loopback, with the AWS variables pyarrow reads pointing at it."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e .[dev])")
    import socket
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.time() < deadline and proc.poll() is None, "moto server did not start"
            time.sleep(0.2)
    try:
        yield endpoint
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_release_from_and_to_s3(s3_server, outputs, release_a, tmp_path):
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(
        endpoint_override=s3_server,
        access_key="test",
        secret_key="test",
        region="us-east-1",
        scheme="http",
        allow_bucket_creation=True,
    )
    fs.create_dir("rexverse-test")
    pafs.copy_files(str(outputs["A"]), "rexverse-test/out", destination_filesystem=fs)
    _build(["s3://rexverse-test/out"], "s3://rexverse-test/release")
    local = tmp_path / "from_s3"
    local.mkdir()
    pafs.copy_files("rexverse-test/release", str(local), source_filesystem=fs)
    assert (local / "SHA256SUMS").is_file() and not (local / MARKER).exists()
    for line in (local / "SHA256SUMS").read_text().splitlines():
        digest, rel = line.split("  ", 1)
        assert hashlib.sha256((local / rel).read_bytes()).hexdigest() == digest, rel
    same = _tree_digest(local)
    local_release = _tree_digest(release_a)
    assert same.keys() == local_release.keys()
    # only the files that name the input location differ from the local build of the same output
    assert {rel for rel in same if same[rel] != local_release[rel]} <= {
        "manifest.json",
        "README.md",
        "SHA256SUMS",
        "rejects.parquet",
        "duplicates.parquet",
    }
