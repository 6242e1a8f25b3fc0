"""ChatRex training (Ray Train) and evaluation (Ray Data) on the fixture's ground-truth shards, on CPU."""

import json
import subprocess
import sys
import time

import pytest
from conftest import ROOT, kill_when

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
TRAIN = [
    sys.executable,
    str(ROOT / "pipelines" / "train_chatrex.py"),
    "--config",
    str(ROOT / "configs" / "chatrex_fixture.yaml"),
]


def run(command, env, timeout=600):
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


@pytest.fixture(scope="module")
def trained(gt_shards, engine_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "chatrex"
    done = run([*TRAIN, "--shards", str(gt_shards), "--output", str(out)], engine_env)
    return out, done


def test_training_loss_falls_well_below_the_start(trained):
    out, _ = trained
    summary = json.loads((out / "train_summary.json").read_text())
    stages = summary["stages"]
    assert [s["name"] for s in stages] == ["alignment", "perception", "joint"]
    assert [s["steps"] for s in stages] == [6, 30, 12]
    # perception (detection, grounding, region questions) learns; the joint stage ends well below the start
    assert stages[1]["last_loss"] < 0.75 * stages[1]["first_loss"], stages[1]["losses"]
    assert stages[2]["last_loss"] < 0.7 * stages[0]["first_loss"], [s["losses"] for s in stages]
    assert (out / "model" / "config.json").exists() and (out / "model" / "chatrex_processor.json").exists()


def test_rerun_skips_finished_stages(trained, gt_shards, engine_env):
    out, _ = trained
    start = time.time()
    done = run([*TRAIN, "--shards", str(gt_shards), "--output", str(out)], engine_env)
    assert done.stderr.count("already finished") == 3
    assert time.time() - start < 120


def test_killed_training_resumes_from_its_checkpoint(gt_shards, engine_env, tmp_path):
    out = tmp_path / "killed"
    command = [*TRAIN, "--shards", str(gt_shards), "--output", str(out), "--set", "checkpoint_every=10"]
    # Ray Train records a checkpoint in its run snapshot after the upload: kill once that record exists
    snapshot = out / "runs" / "1-perception" / "checkpoint_manager_snapshot.json"
    kill_when(command, engine_env, snapshot.exists, "a perception-stage checkpoint")
    assert not (out / "model").exists()
    done = run(command, engine_env)
    assert "resumed from the checkpoint of step" in done.stdout + done.stderr
    summary = json.loads((out / "train_summary.json").read_text())
    assert [s["steps"] for s in summary["stages"]] == [6, 30, 12]


def test_eval_scores_detection_referring_and_naming(trained, gt_shards, engine_env, tmp_path):
    out, _ = trained
    report_dir = tmp_path / "eval"
    command = [
        sys.executable,
        str(ROOT / "pipelines" / "eval_chatrex.py"),
        "--model",
        str(out / "model"),
        "--shards",
        str(gt_shards),
        "--output",
        str(report_dir),
        "--limit",
        "12",
        "--quiet",
    ]
    done = run(command, engine_env)
    report = json.loads((report_dir / "metrics.json").read_text())
    metrics = report["metrics"]["all"]
    detection = metrics["detection"]
    assert report["candidates"] == "the shards' proposals" and report["dropped_verbatim_gt_candidates"] == 0
    assert detection["ground_truth"] > 0
    assert 0 < detection["baselines"]["random_k"]["R@0.5"] < detection["oracle_R@0.5"] <= 1
    assert detection["baseline"]["strategy"] == "blind_random_k"  # the recall ceiling is never the baseline
    assert detection["map_scores"].startswith("model") and 0.0 <= detection["mAP"] <= 1.0
    assert set(detection["by_objects"]) <= {"1", "2-3", "4-6", "7-10", "11+"}
    assert 0.0 <= metrics["referring"]["accuracy"] <= 1.0 and 0.0 <= metrics["naming"]["accuracy"] <= 1.0
    rows = [json.loads(line) for line in (report_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == report["questions"] > 0
    for row in rows:  # the answer was never among the inputs
        assert not any(box in row["image_gt_boxes"] for box in row["boxes"])
    assert "R@0.5" in done.stdout
