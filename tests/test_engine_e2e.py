"""End-to-end: fixture + bad inputs through the whole engine on an embedded Ray, read with stock readers."""

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from conftest import FIXTURE_CONFIG, ROOT, SCRIPT, kill_when, run_engine
from PIL import Image
from pycocotools import mask as mask_utils

from pipelines.rexverse2m import STAGES
from schemas import validate

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def n_inputs(input_dir) -> int:
    folder, bad = input_dir
    return sum(1 for p in folder.rglob("*") if p.suffix in {".jpg", ".png"})


def shard_records(out: Path) -> list[dict]:
    urls = [str(p) for p in sorted((out / "shards").glob("*.tar"))]
    return [
        json.loads(sample["json"]) | {"_sample": sample}
        for sample in wds.WebDataset(urls, shardshuffle=False)
    ]


def check_masks_and_proposals(record: dict, margin: float = 0.1) -> None:
    """Masks decode to the image size and lie inside their box (+ margin); proposals lie inside the image."""
    width, height = record["width"], record["height"]
    for region in record["regions"]:
        if region["mask"] is None:
            continue
        rle = {"size": region["mask"]["size"], "counts": region["mask"]["counts"].encode()}
        mask = mask_utils.decode(rle)
        assert mask.shape == (height, width) and mask.any()
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = region["box"]
        dx, dy = (x1 - x0) * margin + 1, (y1 - y0) * margin + 1
        assert x0 - dx <= xs.min() and xs.max() <= x1 + dx and y0 - dy <= ys.min() and ys.max() <= y1 + dy
        assert np.isfinite(region["scores"]["mask"])  # the predicted IoU
    for proposal in record["proposals"]:
        x0, y0, x1, y1 = proposal["box"]
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height and np.isfinite(proposal["score"])


def test_counts_add_up_and_every_stage_processed_items(fixture_run, input_dir):
    out, done = fixture_run
    index = pd.read_parquet(out / "index")
    rejects = pd.read_parquet(out / "rejects.parquet")
    assert len(index) + len(rejects) == n_inputs(input_dir) == 106
    assert index["key"].is_unique
    assert set(index["source_uri"]).isdisjoint(rejects["uri"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["records"] == len(index) and manifest["counts"]["rejects"] == len(rejects)
    assert list(manifest["stages"])[: len(STAGES)] == [stage.name for stage in STAGES]
    for stage in manifest["stage_order"]:
        assert manifest["stages"][stage]["images_in"] > 0, stage
        assert manifest["stages"][stage]["seconds"] > 0, stage
    assert manifest["stages"]["filter"]["images_out"] == len(index)
    assert len(index) >= 60, "fixture thresholds must let most images through"
    assert "decode" in done.stdout and "records" in done.stdout  # the per-stage summary was printed


def test_bad_inputs_are_rejects_with_reasons(fixture_run, input_dir):
    out, _ = fixture_run
    folder, bad = input_dir
    rejects = pd.read_parquet(out / "rejects.parquet")
    reasons = {Path(uri).name: reason for uri, reason in zip(rejects["uri"], rejects["reason"], strict=True)}
    assert reasons["empty.jpg"].startswith("empty file")
    assert reasons["not_an_image.jpg"].startswith("not an image")
    assert reasons["truncated.jpg"].startswith("corrupt image")
    assert reasons["bomb.png"].startswith("too many pixels")
    duplicate = next(name for name, kind in bad.items() if kind == "duplicate")
    assert reasons[duplicate] == f"duplicate: same bytes as {folder / 'scene_000.jpg'}"


def test_every_record_validates_and_matches_its_image_and_index(fixture_run):
    out, _ = fixture_run
    records = shard_records(out)
    index = pd.read_parquet(out / "index").set_index("key")
    assert len(records) == len(index)
    for record in records:
        sample = record.pop("_sample")
        assert validate(record) == [], record["key"]
        assert sample["__key__"] == record["key"]
        image = Image.open(io.BytesIO(sample[record["image_ext"]]))
        assert image.size == (record["width"], record["height"]) and image.mode == "RGB"
        row = index.loc[record["key"]]
        assert row["num_regions"] == len(record["regions"]) > 0
        assert row["caption"] == record["caption"]["text"]
        for region in record["regions"]:  # tiers: a category always, the other texts where they passed
            assert region["category"] and all(
                k in region for k in ("short_phrase", "description", "referring")
            )
            assert region["referring"] is None or "," not in region["referring"]
        spans = record["grounded_caption"]["spans"]
        assert {rid for s in spans for rid in s["regions"]} == {r["id"] for r in record["regions"]}
        check_masks_and_proposals(record)
    assert sum(r["mask"] is not None for rec in records for r in rec["regions"]) > 0
    assert sum(len(rec["proposals"]) for rec in records) > 0
    exif = [r for r in records if r["source"]["uri"].endswith("odd_exif_rot6.jpg")]
    assert not exif or (exif[0]["width"], exif[0]["height"]) == (400, 300)


def test_shards_read_with_ray_data(fixture_run):
    import ray

    out, _ = fixture_run
    ray.init(num_cpus=1, include_dashboard=False, namespace="test-read")
    try:
        rows = ray.data.read_webdataset(str(out / "shards")).take_all()
    finally:
        ray.shutdown()
    index = pd.read_parquet(out / "index")
    assert sorted(row["__key__"] for row in rows) == sorted(index["key"])
    for row in rows:  # Ray's default decoder: images as arrays, json as dicts
        record = row["json"]
        assert record["key"] == row["__key__"]
        assert row["jpg"].shape == (record["height"], record["width"], 3)


def test_second_run_adds_nothing(fixture_run, input_dir, engine_env):
    out, _ = fixture_run
    before = sorted(p.name for p in out.rglob("*") if p.is_file() and p.name != "manifest.json")
    start = time.time()
    done = run_engine(["--input", str(input_dir[0]), "--output", str(out)], engine_env)
    assert "0 sources to read" in done.stderr
    after = sorted(p.name for p in out.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert after == before
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["runs"]) == 2 and manifest["runs"][-1]["processed"] == 0
    assert time.time() - start < 60


def test_changed_config_is_refused_on_resume(fixture_run, input_dir, engine_env):
    out, _ = fixture_run
    command = [sys.executable, str(SCRIPT), "--config", str(FIXTURE_CONFIG), "--input", str(input_dir[0])]
    command += ["--output", str(out), "--set", "stages.grounding.box_threshold=0.5"]
    done = subprocess.run(command, env=engine_env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "different config" in done.stderr


def test_killed_run_resumes_to_the_same_keys(fixture_run, input_dir, engine_env, tmp_path):
    """SIGKILL the driver after its first commit; the rerun finishes with no key written twice."""
    full, _ = fixture_run
    out = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), "--config", str(FIXTURE_CONFIG), "--input", str(input_dir[0])]
    command += ["--output", str(out), "--set", "sink.shard_size=5", "--quiet"]
    kill_when(command, engine_env, lambda: bool(list(out.glob("_commits/*.json"))), "its first commit")
    assert not (out / "manifest.json").exists(), "the kill came after the run finished; nothing was tested"
    partial = pd.read_parquet(out / "index") if list((out / "index").glob("*.parquet")) else None
    done = run_engine(
        ["--input", str(input_dir[0]), "--output", str(out), "--set", "sink.shard_size=5"], engine_env
    )
    assert "already committed" in done.stderr
    resumed, reference = pd.read_parquet(out / "index"), pd.read_parquet(full / "index")
    rejects, reference_rejects = (
        pd.read_parquet(out / "rejects.parquet"),
        pd.read_parquet(full / "rejects.parquet"),
    )
    assert resumed["key"].is_unique and rejects["uri"].is_unique
    not_duplicates = rejects[~rejects["reason"].str.startswith("duplicate")]
    assert set(resumed["key"]).isdisjoint(not_duplicates["key"])  # a key is a record or a reject, never both
    assert len(resumed) + len(rejects) == n_inputs(input_dir)
    # every image the uninterrupted run keyed is keyed again, once, as a record or a reject
    keyed = set(resumed["key"]) | set(rejects["key"]) - {""}
    assert keyed == set(reference["key"]) | set(reference_rejects["key"]) - {""}
    if partial is not None:
        assert set(partial["key"]) <= set(resumed["key"])
    # Records equal the uninterrupted run's up to images whose scores sit on a fixture threshold: the tiny
    # random models score in a narrow band and batches are composed differently after a resume, so float
    # rounding can flip one of those (seen: 1 of 79).
    assert len(set(resumed["key"]) ^ set(reference["key"])) <= 3


def test_sequential_mode_gives_valid_records(engine_env, tmp_path):
    out = tmp_path / "seq"
    fixture = ROOT / "tests" / "fixtures" / "fixture100"
    run_engine(["--input", str(fixture), "--output", str(out), "--limit", "12", "--no-ray"], engine_env)
    records = shard_records(out)
    rejects = pd.read_parquet(out / "rejects.parquet")
    assert len(records) + len(rejects) == 12
    assert all(validate({k: v for k, v in r.items() if k != "_sample"}) == [] for r in records)


ALTERNATIVE_BACKENDS = [
    "stages.grounding.backend=groundingdino-py",
    "stages.grounding.model.name=tiny:groundingdino-official",
    "stages.segment.backend=sam2",
    "stages.segment.model.name=tiny:sam2-official",
    "stages.proposals.backend=grounding",
    "stages.proposals.model.name=tiny:grounding-dino",
]


def test_official_backends_on_ray(engine_env, tmp_path):
    """groundingdino-py grounding, official sam2 masks and detector proposals, switched on with --set."""
    out = tmp_path / "alt"
    fixture = ROOT / "tests" / "fixtures" / "fixture100"
    args = ["--input", str(fixture), "--output", str(out), "--limit", "16", "--quiet"]
    run_engine(args + [a for s in ALTERNATIVE_BACKENDS for a in ("--set", s)], engine_env)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["stages"]["segment"]["backend"] == "sam2"
    assert manifest["stages"]["segment"]["images_in"] > 0 and manifest["stages"]["proposals"]["units_out"] > 0
    records = [{k: v for k, v in r.items() if k != "_sample"} for r in shard_records(out)]
    assert records and all(validate(r) == [] for r in records)
    for record in records:
        check_masks_and_proposals(record)
    assert sum(r["mask"] is not None for rec in records for r in rec["regions"]) > 0
