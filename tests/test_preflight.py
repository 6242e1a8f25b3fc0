"""`--preflight N`: every enabled stage loaded and run on N images in one process, a per-stage report,
nothing written, exit != 0 when a stage fails."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import MODEL_STAGES

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "fixture100"
JOB = ROOT / "pipelines" / "rexverse2m.py"
CONFIG = ROOT / "configs" / "fixture.yaml"


def preflight(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, str(JOB), "--config", str(CONFIG), "--input", str(FIXTURE), *extra]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.timeout(600)
def test_preflight_reports_every_stage_and_writes_nothing(tmp_path: Path) -> None:
    done = preflight(tmp_path, "--preflight", "4")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "preflight on 4 images (nothing is written)" in out
    table = out.split("scores each threshold")[0]
    for stage in ["decode", "phrases", "box_rules", *MODEL_STAGES]:
        line = next(line for line in table.splitlines() if line.startswith(stage + " "))
        load_seconds, peak_mb, images, per_image = line.split()[1:5]
        assert float(peak_mb) > 0 and int(images) >= 1 and float(per_image) >= 0, line
    scores = out.split("scores each threshold")[1].split("one finished record")[0]
    for label in ("box score", "text score", "verify p_yes", "image-text score"):
        line = next(line for line in scores.splitlines() if label in line)
        assert "median=" in line and "threshold=" in line, line
    assert "one finished record" in out and "  regions: [" in out
    assert out.rstrip().endswith("preflight: ok")
    assert not any(tmp_path.iterdir())  # nothing written where it ran


@pytest.mark.timeout(600)
def test_preflight_fails_on_a_model_that_does_not_load(tmp_path: Path) -> None:
    done = preflight(
        tmp_path, "--preflight", "2", "--set", f"stages.grounding.model.name={tmp_path / 'missing'}"
    )
    assert done.returncode == 1
    assert "grounding: load failed" in done.stdout and "preflight: FAILED" in done.stdout


@pytest.mark.timeout(600)
def test_preflight_fails_on_stage_errors(tmp_path: Path) -> None:
    from engine.config import job_config, load_config
    from engine.preflight import run_preflight
    from pipelines.rexverse2m import STAGES
    from tests.helpers.breakable_stage import Breakable

    flag = tmp_path / "broken"
    flag.touch()
    stages = [*STAGES, Breakable]
    cfg = load_config(CONFIG, job_config(stages), [f"stages.breakable.broken_while={flag}"])
    report = io.StringIO()
    assert run_preflight(cfg, stages, [str(FIXTURE)], 3, out=report) == 1
    text = report.getvalue()
    assert "breakable: " in text and "bias type" in text and "preflight: FAILED" in text
    assert "no image came through every stage" in text


def test_preflight_needs_no_output_but_a_run_does(capsys: pytest.CaptureFixture) -> None:
    from pipelines.rexverse2m import parse_args

    assert parse_args(["--config", "c.yaml", "--input", "x", "--preflight"]).preflight == 4
    with pytest.raises(SystemExit):
        parse_args(["--config", "c.yaml", "--input", "x"])
    assert "--output is required" in capsys.readouterr().err
