"""The fixture job submitted to a real (local, loopback) Ray head with `ray job submit --working-dir .`."""

import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def non_loopback_listeners(marker: str) -> list[str]:
    """Listening sockets of the Ray processes (found by their temp dir) that are not on loopback."""
    import psutil

    pids = {p.pid for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])}
    return [
        f"{c.pid}:{c.laddr.ip}:{c.laddr.port}"
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.pid in pids and not is_loopback(c.laddr.ip)
    ]


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


@pytest.fixture
def ray_head(engine_env, tmp_path):
    """`ray start --head` on 127.0.0.1 with token auth; stopped (and its temp dir removed) afterwards."""
    env = dict(engine_env, RAY_AUTH_MODE="token", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.pop("RAY_ADDRESS", None)
    gcs_port, dashboard_port = free_port(), free_port()
    temp_dir = Path("/tmp") / f"rxray{os.getpid()}"  # Ray's socket paths must stay short
    start = [
        RAY,
        "start",
        "--head",
        "--num-cpus=2",
        f"--port={gcs_port}",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    started = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        assert non_loopback_listeners(str(temp_dir)) == []
        yield env, f"http://127.0.0.1:{dashboard_port}", f"127.0.0.1:{gcs_port}"
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_job_submit_runs_the_fixture_on_a_cluster(ray_head, tmp_path):
    env, dashboard, gcs = ray_head
    out = tmp_path / "job-out"
    runtime_env = {
        "env_vars": {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "REXVERSE_CACHE": env["REXVERSE_CACHE"],
            "TOKENIZERS_PARALLELISM": "false",
        }
    }
    submit = [
        RAY,
        "job",
        "submit",
        "--address",
        dashboard,
        "--working-dir",
        ".",
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
        "python",
        "pipelines/rexverse2m.py",
        "--config",
        "configs/fixture.yaml",
        "--input",
        str(ROOT / "tests" / "fixtures" / "fixture100"),
        "--output",
        str(out),
        "--limit",
        "16",
        "--quiet",
    ]
    start = time.time()
    for _ in range(12):
        done = subprocess.run(submit, env=env, cwd=ROOT, capture_output=True, text=True, timeout=800)
        # a head that just started may not have registered its job agent yet: Ray refuses the submission
        # (nothing runs) and says to try again
        if "No available agent to submit job" not in done.stderr:
            break
        time.sleep(5)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "succeeded" in (done.stdout + done.stderr).lower()
    index = pd.read_parquet(out / "index")
    rejects = pd.read_parquet(out / "rejects.parquet")
    assert len(index) + len(rejects) == 16 and len(index) > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runs"][-1]["mode"] == "ray"
    print(f"job submit round trip: {time.time() - start:.1f}s")
