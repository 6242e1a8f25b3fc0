"""Collection filters: near-constant images by pixel statistics, NSFW / low-content classifiers."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from engine.items import Item
from stages.collect import Collect, CollectConfig, pixel_std


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def noisy(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8))


def items(images: list[Image.Image]) -> list[Item]:
    return [Item(key=f"{i:064x}", uri=f"/{i}.jpg", image=jpeg(im), record={}) for i, im in enumerate(images)]


def test_pixel_std_separates_constant_from_content_even_at_equal_luminance():
    assert pixel_std(Image.new("RGB", (50, 40), (200, 30, 30))) < 1.0
    shape = Image.new("RGB", (64, 64), (128, 128, 128))
    shape.paste((160, 120, 40), (16, 16, 48, 48))  # about the same grey level as the background
    assert pixel_std(shape) > 10


def test_near_constant_images_are_rejected_without_loading_any_model():
    stage = Collect(CollectConfig(enabled=True, min_pixel_std=2.0))
    batch = items([Image.new("RGB", (80, 60), "white"), noisy(0)])
    stage.run(batch)
    assert batch[0].error_stage == "collect" and batch[0].error_reason.startswith("near-constant image")
    assert batch[1].ok


def test_near_constant_check_uses_the_value_decode_measured_and_decodes_nothing():
    """An item that went through decode carries its pixel statistic: collect thresholds it without opening
    the image again (the bytes here are not even an image)."""
    stage = Collect(CollectConfig(enabled=True, min_pixel_std=2.0))
    flat, content = (
        Item(key=f"{i:064x}", uri=f"/{i}.jpg", image=b"not decoded again", record=record)
        for i, record in enumerate(
            [{"provenance": {"decode": {"pixel_std": 0.4}}}, {"provenance": {"decode": {"pixel_std": 35.0}}}]
        )
    )
    stage.run([flat, content])
    assert flat.error_reason == "near-constant image: pixel std 0.40 < 2.0"
    assert content.ok


@pytest.mark.parametrize("check", ["nsfw", "low_content"])
def test_classifier_thresholds_reject_with_the_score_in_the_reason(check):
    label = {"nsfw": "nsfw", "low_content": "low-content"}[check]
    model = {"model": {"name": f"tiny:{label}"}}
    strict = Collect(CollectConfig(enabled=True, **{check: model | {"threshold": 0.0}}))
    batch = items([noisy(1), noisy(2)])
    strict.run(batch)
    assert all(i.error_reason.startswith(f"{label}: p=") for i in batch)
    lenient = Collect(CollectConfig(enabled=True, **{check: model | {"threshold": 1.0}}))
    batch = items([noisy(1), noisy(2)])
    lenient.run(batch)
    assert all(i.ok for i in batch)


def test_unknown_reject_label_is_a_config_error_naming_the_labels():
    cfg = CollectConfig(enabled=True, nsfw={"model": {"name": "tiny:nsfw"}, "reject_labels": ["porn"]})
    with pytest.raises(ValueError, match="normal"):
        Collect(cfg)


def test_the_pool_config_runs_decode_and_the_filters_only():
    from engine.pipeline import active_stages
    from pipelines.rexverse2m import STAGES, load_job_config

    cfg = load_job_config("configs/collect.yaml")
    assert [stage.name for stage, _ in active_stages(STAGES, cfg)] == ["decode", "collect"]
    assert cfg.stages.decode.min_side == 224  # the real config's bounds, extended


@pytest.mark.timeout(600)
def test_two_passes_pool_then_engine_read_the_pool_shards(tmp_path):
    """Pass 1 (decode + collect + dedupe) writes shards of kept images; pass 2 (the full engine) reads
    those shards as webdataset input: every kept image once, with the caption its input carried."""
    import json
    from pathlib import Path

    import pandas as pd

    from pipelines.rexverse2m import load_job_config, run_job

    fixture = Path(__file__).parent / "fixtures" / "fixture100"
    pool, full = tmp_path / "pool", tmp_path / "full"
    first = load_job_config("configs/fixture.yaml", ["run_stages=[decode, collect]", "sink.records=image"])
    one = run_job(first, [str(fixture)], pool, use_ray=False)
    kept = pd.read_parquet(pool / "index")
    assert one.records == len(kept) > 50 and one.rejects > 0  # too small, NSFW, near-constant, duplicates
    assert all(not r["regions"] and not r["caption"]["text"] for r in map(json.loads, [_first_json(pool)]))

    second = load_job_config("configs/fixture.yaml")
    two = run_job(second, [str(pool / "shards" / "*.tar")], full, use_ray=False)
    assert two.records + two.rejects == len(kept)
    index, rejects = pd.read_parquet(full / "index"), pd.read_parquet(full / "rejects")
    uris = [*index["source_uri"], *rejects["uri"]]
    assert all("/pool/shards/" in uri for uri in uris)
    assert {uri.rsplit("#", 1)[1].removesuffix(".jpg") for uri in uris} == set(kept["key"])  # each once


def _first_json(out) -> str:
    import tarfile

    tar_path = sorted((out / "shards").glob("*.tar"))[0]
    with tarfile.open(tar_path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".json"))
        return tar.extractfile(member).read().decode()
