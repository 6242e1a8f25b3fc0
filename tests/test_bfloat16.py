"""Every model stage in bfloat16 (what `dtype: auto` picks on GPUs) on a few fixture images, on CPU: no
image may come out as a `stage error` reject. Float32 stays the fixture's default (docs/engine.md)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import MODEL_STAGES

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "fixture100"
MODEL_DTYPES = [  # every `model` a stage of the fixture config loads
    "stages.collect.nsfw.model.dtype",
    "stages.collect.low_content.model.dtype",
    "stages.caption.model.dtype",
    "stages.grounding.model.dtype",
    "stages.region_caption.model.dtype",
    "stages.refine.model.dtype",
    "stages.filter.model.dtype",
    "stages.proposals.model.dtype",
    "stages.segment.model.dtype",
]
BACKENDS = {  # the other model paths of the same stages
    "default": [],
    "proposals-grounding": [
        "stages.proposals.backend=grounding",
        "stages.proposals.model.name=tiny:grounding-dino",
    ],
    "proposals-upn": ["stages.proposals.backend=upn", "stages.proposals.model.name=tiny:upn"],
}


@pytest.mark.e2e
@pytest.mark.timeout(900)
@pytest.mark.parametrize("variant", sorted(BACKENDS))
def test_every_model_stage_runs_in_bfloat16(tmp_path: Path, variant: str) -> None:
    from engine.pipeline import run
    from pipelines.rexverse2m import STAGES, chain, load_job_config

    folder = tmp_path / "in"
    folder.mkdir()
    for scene in sorted(FIXTURE.glob("scene_*.jpg"))[:6]:
        shutil.copy(scene, folder / scene.name)
    overrides = [f"{key}=bfloat16" for key in MODEL_DTYPES] + BACKENDS[variant]
    overrides += [
        "ray.show_progress=false",
        "stages.collect.nsfw.threshold=1",
        "stages.collect.low_content.threshold=1",
    ]
    cfg = load_job_config(ROOT / "configs" / "fixture.yaml", overrides)
    result = run(cfg, STAGES, chain, [str(folder)], tmp_path / "out", use_ray=False)

    assert result.records + result.rejects == 6
    rejects = pd.read_parquet(tmp_path / "out" / "rejects.parquet")
    errors = rejects[rejects["reason"].str.startswith("stage error")]
    assert errors.empty, errors[["stage", "reason"]].to_dict("records")
    assert result.records >= 4
    stages = result.manifest["stages"]
    for name in MODEL_STAGES:
        assert stages[name]["images_in"] > 0, name  # every model stage saw images
