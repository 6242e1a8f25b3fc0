"""A stage that fails on every image stops the run (exit != 0); a rerun after the fix retries those images,
while content rejects (undecodable inputs) stay final."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from engine.errors import StageFailing
from engine.stage import StageHealth
from tests.helpers.breakable_stage import Breakable

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "fixture100"


def job(flag: Path, *overrides: str):
    from engine.config import job_config, load_config
    from engine.pipeline import map_stage, stage_groups
    from pipelines.rexverse2m import STAGES

    stages = [*STAGES, Breakable]

    def chain(ds, cfg, context):  # the job's chain with the breakable stage last
        for group in stage_groups(stages, cfg):
            ds = map_stage(ds, group, context)
        return ds

    cfg = load_config(
        ROOT / "configs" / "fixture.yaml",
        job_config(stages),
        ["ray.show_progress=false", f"stages.breakable.broken_while={flag}", *overrides],
    )
    return cfg, stages, chain


def inputs(tmp_path: Path, n: int) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for scene in sorted(FIXTURE.glob("scene_*.jpg"))[:n]:
        shutil.copy(scene, folder / scene.name)
    (folder / "not_an_image.jpg").write_bytes(b"this is text, not a JPEG")  # a content reject
    return folder


def test_health_counts_errors_in_a_row_and_in_the_first_window():
    from engine.config import FailFast

    health = StageHealth("grounding", FailFast(consecutive=3, window=8, max_fraction=0.5))
    for failed in (True, True, False, True, True):  # never three in a row
        health.observe(failed, "stage error: boom")
    with pytest.raises(
        StageFailing, match=r"'grounding' failed on 3 images in a row; first error: stage error"
    ):
        health.observe(True, "stage error: later")
    window = StageHealth("segment", FailFast(consecutive=0, window=8, max_fraction=0.5))
    for failed in (True, False, True, False, True, False, True, False):
        window.observe(failed, "stage error: x")  # 4 of 8 is not more than half
    for _ in range(20):
        window.observe(True, "stage error: x")  # past the window: only the in-a-row rule would apply
    off = StageHealth("caption", FailFast(consecutive=0, window=0))
    for _ in range(100):
        off.observe(True, "stage error: x")
    with pytest.raises(StageFailing, match="5 of its first 6 images"):
        strict = StageHealth("refine", FailFast(consecutive=0, window=8, max_fraction=0.5))
        for failed in (True, True, False, True, True, True):
            strict.observe(failed, "stage error: x")


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_a_broken_stage_stops_the_run_and_a_rerun_retries_its_images(tmp_path, monkeypatch):
    from engine.pipeline import run

    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    folder = inputs(tmp_path, 12)
    flag = tmp_path / "broken"
    flag.touch()
    out = tmp_path / "out"

    # 1. Broken, fail-fast off: every image becomes a `stage error` reject and the run "succeeds".
    cfg, stages, chain = job(
        flag,
        "stages.breakable.resources.fail_fast.consecutive=0",
        "stages.breakable.resources.fail_fast.window=0",
    )
    first = run(cfg, stages, chain, [str(folder)], out, use_ray=False)
    assert first.records == 0 and first.rejects == 13
    rejects = pd.read_parquet(out / "rejects.parquet")
    broken = int(rejects["reason"].str.startswith("stage error").sum())
    content = len(rejects) - broken  # undecodable input + the collection filters' rejects
    assert broken >= 8 and content >= 1

    # 2. Still broken, fail-fast on (the default): the run stops naming the stage and the error, and
    #    commits nothing for the images it stopped on.
    cfg, stages, chain = job(flag, "stages.breakable.resources.fail_fast.consecutive=4")
    with pytest.raises(StageFailing, match=r"'breakable' failed on 4 images in a row.*bias type"):
        run(cfg, stages, chain, [str(folder)], out, use_ray=False)

    # 3. Fixed: the same command processes the 12 stage-error images again; the content reject stays.
    flag.unlink()
    cfg, stages, chain = job(flag)
    third = run(cfg, stages, chain, [str(folder)], out, use_ray=False)
    assert third.skipped == content  # content rejects are final: not processed again
    assert third.records + third.rejects == broken
    assert third.records >= broken - 2  # the fixture thresholds let most images through
    rejects = pd.read_parquet(out / "rejects.parquet")
    assert not rejects["reason"].str.startswith("stage error").any(), rejects["reason"].tolist()
    assert len(rejects) == content + third.rejects
    index = pd.read_parquet(out / "index")
    assert len(index) == third.records and index["key"].is_unique
    assert third.manifest["counts"] == {
        "records": third.records,
        "rejects": content + third.rejects,
        "shards": third.manifest["counts"]["shards"],
    }

    # 4. A fourth run has nothing left to do.
    fourth = run(cfg, stages, chain, [str(folder)], out, use_ray=False)
    assert fourth.skipped == 13 and fourth.records == fourth.rejects == 0


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_under_ray_the_run_stops_with_the_stage_named(tmp_path, monkeypatch):
    from engine.pipeline import run

    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    folder = inputs(tmp_path, 40)
    flag = tmp_path / "broken"
    flag.touch()
    cfg, stages, chain = job(flag, "stages.breakable.resources.fail_fast.consecutive=8")
    with pytest.raises(StageFailing) as caught:
        run(cfg, stages, chain, [str(folder)], tmp_path / "out", use_ray=True)
    assert caught.value.stage == "breakable" and caught.value.errors == 8
    assert "bias type" in caught.value.first_error


def test_the_command_exits_non_zero_naming_the_stage(monkeypatch, capsys, tmp_path):
    import pipelines.rexverse2m as job_module

    def broken(*args, **kwargs):
        raise StageFailing("grounding", 16, "16 images in a row", "stage error: RuntimeError: dtype")

    monkeypatch.setattr(job_module, "run_job", broken)
    code = job_module.main(
        [
            "--config",
            str(ROOT / "configs" / "fixture.yaml"),
            "--input",
            str(FIXTURE),
            "--output",
            str(tmp_path / "o"),
        ]
    )
    assert code == 3
    err = capsys.readouterr().err
    assert "'grounding' failed on 16 images in a row" in err and "rerun the same command" in err
