"""Test-wide settings: never reach a model hub, keep Ray on loopback, cache tiny models per session."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil  # noqa: E402
import subprocess  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402

import pytest  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "fixture100"
SCRIPT = ROOT / "pipelines" / "rexverse2m.py"
FIXTURE_CONFIG = ROOT / "configs" / "fixture.yaml"


@pytest.fixture(scope="session")
def engine_env(tmp_path_factory) -> dict[str, str]:
    """Environment for engine subprocesses: offline, loopback Ray, one tiny-model cache for the session."""
    env = dict(os.environ)
    env["REXVERSE_CACHE"] = os.environ.get("REXVERSE_CACHE") or str(tmp_path_factory.mktemp("cache"))
    env["PYTHONPATH"] = str(ROOT)
    env["RAY_DEDUP_LOGS"] = "1"
    return env


@pytest.fixture(scope="session")
def input_dir(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The 100 fixture images plus every kind of bad input (truncated, empty, non-image, bomb, duplicate)."""
    from scaffold.make_fixture import write_bad_inputs

    folder = tmp_path_factory.mktemp("inputs")
    for path in FIXTURE.iterdir():
        shutil.copy(path, folder / path.name)
    bad = write_bad_inputs(folder / "bad", FIXTURE / "scene_000.jpg")
    return folder, bad


def run_engine(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run pipelines/rexverse2m.py as a user would; fail the test with its output if it fails."""
    command = [sys.executable, str(SCRIPT), "--config", str(FIXTURE_CONFIG), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, (
        f"engine failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    )
    return done


@pytest.fixture(scope="session")
def fixture_run(tmp_path_factory, engine_env, input_dir):
    """One full Ray run over the fixture + bad inputs, shared by the end-to-end assertions."""
    out = tmp_path_factory.mktemp("run") / "out"
    done = run_engine(["--input", str(input_dir[0]), "--output", str(out)], engine_env)
    return out, done


@pytest.fixture(scope="session")
def gt_shards(tmp_path_factory, engine_env) -> Path:
    """Shards of the fixture's ground truth (regions with real categories) with synthetic proposals, for the
    training pipelines."""
    out = tmp_path_factory.mktemp("gt") / "shards"
    command = [
        sys.executable,
        str(ROOT / "pipelines" / "coco_to_shards.py"),
        "--coco",
        str(FIXTURE / "annotations.json"),
        "--output",
        str(out),
        "--synthetic-proposals",
        "--distractors",
        "4",
        "--shard-size",
        "40",
    ]
    subprocess.run(command, env=engine_env, check=True, timeout=300, capture_output=True)
    return out


def kill_when(command: list[str], env: dict[str, str], ready, what: str, timeout: float = 600) -> None:
    """Start `command` in its own process group and SIGKILL the whole group once `ready()` is true."""
    import signal
    import time

    proc = subprocess.Popen(
        command,
        env=env,
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + timeout
        while not ready():
            assert proc.poll() is None, f"the run ended before {what}"
            assert time.time() < deadline, f"no {what} within {timeout}s"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)  # the driver dies mid-run
        proc.wait(timeout=60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # and whatever local Ray processes it left behind
        except ProcessLookupError:
            pass


# --- a local S3 endpoint (moto's server) for object-storage tests ------------------------------------------

S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never probe a cloud metadata service for credentials
}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serving(command: list[str], port: int, name: str, log: Path) -> Iterator[str]:
    """Run a test server on 127.0.0.1:`port`; yield its URL once it accepts connections (60 s at most), then
    stop it."""
    import socket
    import time

    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{name} exited ({proc.returncode}): {log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"{name} not up within 60 s: {log.read_text()[-2000:]}")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 at a free port for the whole session; yields its endpoint URL."""
    port = _free_port()
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with serving(command, port, "moto server", tmp_path_factory.mktemp("moto") / "server.log") as url:
        yield url


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> dict[str, str]:
    """Point pyarrow (and anything else that reads the standard AWS variables) at the session's S3 server.

    Returns the variables, to merge into the environment of engine subprocesses.
    """
    env = {"AWS_ENDPOINT_URL": s3_server, **S3_CREDENTIALS}
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def s3_bucket(s3_env) -> str:
    """A fresh empty bucket on the session's S3 server (the engine never creates buckets; tests do)."""
    import uuid

    import pyarrow.fs as pafs

    name = f"test-{uuid.uuid4().hex[:12]}"
    pafs.FileSystem.from_uri(f"s3://{name}?allow_bucket_creation=true")[0].create_dir(name)
    return name


# --- a local GCS endpoint (gcp-storage-emulator) for gs:// tests --------------------------------------------


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """gcp-storage-emulator on 127.0.0.1 at a free port for the whole session, in memory; yields its URL."""
    port = _free_port()
    name = "gcp-storage-emulator"
    emulator = shutil.which(name) or str(Path(sys.executable).parent / name)
    command = [emulator, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"]
    with serving(command, port, "GCS emulator", tmp_path_factory.mktemp("gcs") / "server.log") as url:
        yield url


@pytest.fixture
def gcs_env(gcs_server, monkeypatch) -> dict[str, str]:
    """Point the engine's gs:// filesystem at the session's emulator (`STORAGE_EMULATOR_HOST`, anonymous).

    Returns the variables, to merge into the environment of engine subprocesses.
    """
    env = {"STORAGE_EMULATOR_HOST": gcs_server, "GOOGLE_CLOUD_PROJECT": "rexverse-test"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def gcs_bucket(gcs_env) -> str:
    """A fresh empty bucket on the session's GCS emulator (the engine never creates buckets; tests do)."""
    import uuid

    from engine.storage import filesystem_for

    name = f"test-{uuid.uuid4().hex[:12]}"
    filesystem_for(f"gs://{name}")[0].create_dir(name)
    return name
