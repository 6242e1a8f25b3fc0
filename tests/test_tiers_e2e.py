"""The fixture run yields the paper's tiered dataset, the audit reads it against the fixture's ground truth,
and a webdataset's own alt text becomes the caption with `stages.caption.source=input` (sequential runs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds
from conftest import FIXTURE, FIXTURE_CONFIG, ROOT
from test_input_text import ALT, write_wds

from pipelines.audit import CategoryNamer, audit
from pipelines.coco_to_shards import convert
from pipelines.rexverse2m import load_job_config as load_config
from pipelines.rexverse2m import run_job as run
from schemas import validate

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
GT = FIXTURE / "annotations.json"


def shard_records(out: Path) -> list[dict]:
    urls = [str(p) for p in sorted((out / "shards").glob("*.tar"))]
    return [json.loads(s["json"]) for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]


@pytest.fixture(scope="module")
def fixture_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiers") / "out"
    run(load_config(FIXTURE_CONFIG), [str(FIXTURE)], out, use_ray=False)
    return out


def test_fixture_manifest_counts_tiers_and_refine_drops_no_region(fixture_out):
    manifest = json.loads((fixture_out / "manifest.json").read_text())
    tiers = manifest["tiers"]
    assert tiers["category"] > tiers["referring"] >= 1
    assert tiers["category"] >= max(tiers["short_phrase"], tiers["description"]) >= tiers["referring"]
    refine = manifest["stages"]["refine"]
    assert refine["units_in"] == refine["units_out"] and not refine["rejected"]
    assert manifest["counts"]["records"] >= 70
    assert set(manifest["stages"]["collect"]["rejected"]) <= {"nsfw", "low-content", "near-constant image"}
    records = shard_records(fixture_out)
    assert len(records) == manifest["counts"]["records"]
    counted = {t: sum(1 for r in records for g in r["regions"] if g[t]) for t in tiers}
    assert counted == tiers  # the manifest counts what the shards hold
    assert "description mismatch" in manifest["tier_drops"]["description"]
    for record in records:
        assert validate(record) == []
        for region in record["regions"]:
            assert region["category"] and region["scores"]["grounding"] == region["score"]
            for tier in ("short_phrase", "description", "referring"):
                assert tier in region  # null, not absent
            if region["referring"] is not None:
                assert 5 <= len(region["referring"].split()) <= 10 and "," not in region["referring"]
                assert region["description"] is not None


def test_audit_runs_on_the_fixture_output(fixture_out):
    done = subprocess.run(
        [sys.executable, "pipelines/audit.py", "--output", str(fixture_out), "--coco", str(GT)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    fields = dict(part.split("=") for part in last.split())
    assert list(fields) == ["box_recall@0.5", "box_precision@0.5", "regions_category", "regions_referring"]
    report = json.loads((fixture_out / "audit.json").read_text())
    tiers = json.loads((fixture_out / "manifest.json").read_text())["tiers"]
    assert int(fields["regions_category"]) == report["tiers_matched"]["category"] == tiers["category"]
    assert report["matched_images"] == report["records"]  # every record found its GT image by file name
    assert (fixture_out / "audit.md").read_text().startswith("# Audit")


def test_audit_of_ground_truth_shards_is_perfect_and_falls_when_boxes_move(tmp_path):
    convert(GT, tmp_path / "gt")
    report = audit(tmp_path / "gt", GT)
    assert report["boxes"]["box_recall@0.5"] == report["boxes"]["box_precision@0.5"] == 1.0
    assert report["boxes"]["gt_boxes"] > 300
    moved = json.loads(GT.read_text())
    circles = {c["id"] for c in moved["categories"] if c["name"] == "circle"}
    for ann in moved["annotations"]:
        if ann["category_id"] in circles:
            ann["bbox"][0] = max(0, ann["bbox"][0] - ann["bbox"][2])  # shifted by its width: IoU < 0.5
    (tmp_path / "moved.json").write_text(json.dumps(moved))
    shifted = audit(tmp_path / "gt", tmp_path / "moved.json")["boxes"]
    assert shifted["box_recall@0.5"] < 1.0 and shifted["box_precision@0.5"] < 1.0


def test_category_names_map_by_synonym_head_noun_and_nearest_name():
    namer = CategoryNamer(["circle", "traffic light", "star"], {"disc": "circle"}, cutoff=0.85)
    assert namer("disc") == "circle"
    assert namer("Traffic light") == "traffic light"
    assert namer("big red star") == "star"  # head noun (last word)
    assert namer("circles") == "circle"  # nearest name
    assert namer("dog") is None


def test_input_source_uses_webdataset_alt_text_as_caption(tmp_path):
    names = sorted(n for n in ALT if n.startswith("scene_") and n.endswith(".jpg"))[:6]
    tar = write_wds(tmp_path / "alt.tar", names, conversation=True)
    cfg = load_config(FIXTURE_CONFIG, ["stages.caption.source=input"])
    out = tmp_path / "out"
    run(cfg, [str(tar)], out, use_ray=False)
    records = shard_records(out)
    assert records
    by_member = {r["source"]["uri"].rsplit("#", 1)[1]: r for r in records}
    for i, name in enumerate(names):
        record = by_member.get(f"{i:05d}.jpg")
        if record is not None:  # (the collection filters may reject an image)
            assert record["caption"] == {"text": ALT[name], "model": "input", "input": None}
            caption_phrases = [p for p in record["phrases"] if p["turn"] is None]
            assert all(ALT[name][p["start"] : p["end"]] == p["text"] for p in caption_phrases)
            question, answer = record["grounded_conversation"]  # the .json's conversation, grounded
            assert question["role"] == "human" and answer == answer | {"role": "gpt", "text": "A ring."}
            assert validate(record) == []
