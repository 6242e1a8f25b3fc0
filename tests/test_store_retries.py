"""A failing object store under Ray: the batch is retried, no good image becomes a reject."""

from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "fixture100"


@pytest.mark.timeout(600)
def test_reads_that_fail_past_the_in_process_retries_are_retried_by_ray(s3_bucket, s3_env, tmp_path):
    import ray

    from engine.sources import REMOTE_READ_ATTEMPTS
    from engine.storage import filesystem_for
    from pipelines.rexverse2m import load_job_config, run_job

    scenes = sorted(FIXTURE.glob("scene_*.jpg"))[:6]
    for scene in scenes:
        fs, path = filesystem_for(f"s3://{s3_bucket}/in/{scene.name}")
        with fs.open_output_stream(path) as out:
            out.write(scene.read_bytes())
    log = tmp_path / "failures"
    log.mkdir()
    failures = REMOTE_READ_ATTEMPTS + 1  # more than one task's own retries: Ray must retry the task
    env = {
        **s3_env,
        "PYTHONPATH": str(ROOT),
        "FLAKY_STORE_LOG": str(log),
        "FLAKY_STORE_FAILURES": str(failures),
    }
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": env, "worker_process_setup_hook": "tests.helpers.flaky_store.install"},
    )
    try:
        cfg = load_job_config(ROOT / "configs" / "fixture.yaml", ["ray.show_progress=false"])
        run_job(cfg, [f"s3://{s3_bucket}/in/"], tmp_path / "out", use_ray=True)
    finally:
        ray.shutdown()

    assert len(list(log.iterdir())) >= failures  # the simulated outage happened (decode's reads)
    index = pd.read_parquet(tmp_path / "out" / "index")
    rejects = pd.read_parquet(tmp_path / "out" / "rejects.parquet")
    assert len(index) + len(rejects) == len(scenes)
    assert not rejects["reason"].str.contains("unreadable|object store").any(), rejects["reason"].tolist()
