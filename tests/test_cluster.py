"""The engine as its users run it: a Ray cluster of a head and two worker nodes, S3 in and out, a worker node
and a stage actor killed mid-run. The first command must complete (exit 0), and every input must end as
exactly one record or reject, none lost or doubled.
"""

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from conftest import FIXTURE, FIXTURE_CONFIG, ROOT, SCRIPT

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
N_IMAGES = 30


def upload_fixture(fs: pafs.FileSystem, prefix: str, n: int) -> list[str]:
    names = sorted(p.name for p in FIXTURE.glob("*.jpg"))[:n]
    for name in names:
        with fs.open_output_stream(f"{prefix}/{name}") as handle:
            handle.write((FIXTURE / name).read_bytes())
    return names


def committed_parts(fs: pafs.FileSystem, out: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(f"{out}/_commits", allow_not_found=True))
    return [i.path for i in infos if i.path.endswith(".json")]


def read_index(fs: pafs.FileSystem, out: str) -> pd.DataFrame:
    return pq.read_table(f"{out}/index", filesystem=fs).to_pandas()


def run_driver(env: dict[str, str], args: list[str]) -> subprocess.Popen:
    command = [sys.executable, str(SCRIPT), "--config", str(FIXTURE_CONFIG), *args, "--quiet"]
    return subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def kill_stage_actor(stage: str, session: int) -> int | None:
    """SIGKILL one actor process of a stage (Ray titles them `ray::MapWorker(MapBatches(Stage))`) among the
    processes of the cluster's session."""
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            ours = os.getsid(proc.info["pid"]) == session
        except OSError:
            continue
        if ours and any(f"MapBatches({stage})" in part for part in proc.info["cmdline"] or []):
            os.kill(proc.info["pid"], signal.SIGKILL)
            return proc.info["pid"]
    return None


@pytest.fixture
def cluster(engine_env, s3_env):
    """Head + two worker nodes on loopback, one CPU each (recipe: shared/notes/facts.md), in a process of
    their own; yields (its stdin/stdout handle, the environment a driver needs to join it).

    Token auth stays on, with a token of this test's own (not a file that another Ray on the machine may
    rewrite). The nodes get the S3 endpoint and credentials and find the session's tiny models.
    """
    env = {**engine_env, **s3_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "helpers" / "cluster_node.py")],
        env=env,
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("address "), f"the cluster did not start: {line!r}"
        yield proc, {**env, "RAY_ADDRESS": line.split()[1]}
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_multi_node_s3_run_survives_a_lost_node_and_a_killed_actor(cluster, s3_bucket):
    nodes, env = cluster
    fs, _ = pafs.FileSystem.from_uri(f"s3://{s3_bucket}")
    names = upload_fixture(fs, f"{s3_bucket}/in", N_IMAGES)
    out = f"{s3_bucket}/out"
    args = ["--input", f"s3://{s3_bucket}/in", "--output", f"s3://{out}", "--set", "sink.shard_size=4"]

    driver = run_driver(env, args)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(driver.stdout), daemon=True)
    reader.start()
    deadline = time.time() + 600
    while not committed_parts(fs, out):  # the run is under way and writing from the workers
        assert driver.poll() is None, "".join(log)[-4000:]
        assert time.time() < deadline, "no commit within 600 s"
        time.sleep(0.2)
    parts_at_kill = len(committed_parts(fs, out))
    nodes.stdin.write("kill-worker\n")  # a worker node dies mid-run
    nodes.stdin.flush()
    assert nodes.stdout.readline().strip() == "killed"
    killed_actor = kill_stage_actor("StageGroup", nodes.pid)  # and a stage actor (a fused group) crashes
    assert driver.poll() is None, "the run ended before the kills; nothing was tested"
    finished = driver.wait(timeout=600)
    reader.join(timeout=10)
    # A lost node costs a retry inside the run (restarted actors, retried tasks, or another pass over the
    # sources not yet committed): the first command itself completes.
    assert finished == 0, "".join(log)[-4000:]

    index = read_index(fs, out)
    rejects = pq.read_table(f"{out}/rejects", filesystem=fs).to_pandas()  # per part, as at pool scale
    uris = list(index["source_uri"]) + list(rejects["uri"])
    assert sorted(uris) == sorted(f"s3://{s3_bucket}/in/{n}" for n in names)  # nothing lost, nothing twice
    assert index["key"].is_unique and len(index) > 0 and killed_actor is not None
    manifest = json.loads(fs.open_input_stream(f"{out}/manifest.json").read())
    assert manifest["counts"]["records"] == len(index) and manifest["counts"]["rejects"] == len(rejects)
    passes = "".join(log).count("resuming the remaining sources") + 1
    layout = {i.base_name for i in fs.get_file_info(pafs.FileSelector(out))}
    assert {"shards", "index", "rejects", "_commits", "rejects.parquet", "manifest.json"} <= layout
    print(
        f"cluster run: exit {finished} in {passes} pass(es), {parts_at_kill} parts committed at the kill, "
        f"killed actor pid {killed_actor}, {len(index)} records, {len(rejects)} rejects"
    )
