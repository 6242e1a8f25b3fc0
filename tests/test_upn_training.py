"""UPN training (Ray Train) on the fixture's ground-truth shards, on CPU: it trains, survives being killed
mid-run, does not repeat a finished run, and refuses a worker layout that would starve the shard readers."""

import json
import math
import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT, kill_when

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
STEPS, EVERY = 30, 5


def train_command(shards, out, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "pipelines" / "train_upn.py"),
        "--model",
        "tiny:upn",
        "--shards",
        str(shards),
        "--output",
        str(out),
        "--steps",
        str(STEPS),
        "--batch-size",
        "4",
        "--warmup",
        "5",
        "--log-every",
        str(EVERY),
        "--checkpoint-every",
        str(EVERY),
        "--shuffle-buffer",
        "16",
        "--threads",
        "1",
        *extra,
    ]


def run(command, env, timeout=600):
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def killed_then_resumed(gt_shards, engine_env, tmp_path_factory):
    """A training run SIGKILLed once its first checkpoint is recorded, then the same command again."""
    out = tmp_path_factory.mktemp("upn-train") / "upn"
    command = train_command(gt_shards, out)
    snapshot = out / "runs" / "upn" / "checkpoint_manager_snapshot.json"
    kill_when(command, engine_env, snapshot.exists, "a UPN checkpoint")
    assert not (out / "model").exists()
    done = run(command, engine_env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return out, command, done


def test_killed_run_resumes_and_finishes_every_step(killed_then_resumed):
    out, _, done = killed_then_resumed
    logs = done.stdout + done.stderr
    resumed_at = int(logs.split("resumed from the checkpoint of step ")[1].split()[0])
    assert 0 < resumed_at < STEPS and resumed_at % EVERY == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == STEPS
    # the loss curve carries on from the checkpoint: one entry per logging step, none repeated or lost
    assert [step for step, _ in summary["losses"]] == list(range(EVERY, STEPS + 1, EVERY))
    assert all(math.isfinite(loss) and loss > 0 for _, loss in summary["losses"])
    # the local Ray has no dashboard; Ray Train's cleaner would warn about its State API every second
    assert "Failed to query Ray Train Controller" not in logs


def test_trained_model_loads_and_differs_from_its_start(killed_then_resumed, engine_env):
    import torch

    from engine.models import resolve_model
    from upn import UPNModel

    out, _, _ = killed_then_resumed
    model_dir = out / "model"
    assert (model_dir / "config.json").exists() and not (model_dir / "optimizer.pt").exists()
    trained = UPNModel.from_pretrained(model_dir).state_dict()
    os.environ["REXVERSE_CACHE"] = engine_env["REXVERSE_CACHE"]  # the same tiny start the run used
    start = UPNModel.from_pretrained(resolve_model("tiny:upn")).state_dict()
    assert trained.keys() == start.keys()
    changed = [name for name in trained if not torch.equal(trained[name], start[name])]
    assert len(changed) > len(trained) // 2


def test_rerun_of_a_finished_run_does_nothing(killed_then_resumed, engine_env):
    out, command, _ = killed_then_resumed
    before = (out / "model" / "model.safetensors").stat().st_mtime_ns
    started = time.time()
    done = run(command, engine_env, timeout=120)
    assert done.returncode == 0 and "already trained" in done.stdout
    assert time.time() - started < 60
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == before


def test_workers_that_take_every_cpu_are_refused(gt_shards, engine_env, tmp_path):
    out = tmp_path / "greedy"
    # the local Ray counts this machine's CPUs; a worker asking for all of them leaves none to read shards
    done = run(train_command(gt_shards, out, "--cpus-per-worker", str(os.cpu_count())), engine_env)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "leave one free for reading shards" in done.stderr
    assert not (out / "model").exists()
