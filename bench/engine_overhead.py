"""What Ray costs the engine, side by side in one run: wall time, memory and time to the first commit.

Runs the fixture config (tiny models) over unique fixture-like images three ways, each as a user would
(`pipelines/rexverse2m.py` in a fresh process): embedded Ray at 1000 images, the plain in-process loop
(`--no-ray`, the same stage objects) at 1000 images, and embedded Ray at 100 images. For each it samples
the summed PSS of every process of the run (driver and everything it started: raylet, GCS, workers)
and notes when the first commit marker appears.

    python bench/engine_overhead.py [--images 1000] [--small 100] [--work DIR] [--config YAML] [--set K=V ...]

Prints, last: ray_over_local=<r> mem_over_local=<m> peak_mem_ratio_10x=<g> first_commit_over_local=<f>
(r: Ray wall / loop wall; m: Ray peak / loop peak; g: Ray peak at --images / at --small; f: seconds to the
first commit under Ray / under the loop).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class Measured:
    wall_s: float
    peak_pss_gb: float
    first_commit_s: float


def tree_pss(root: psutil.Process) -> int:
    """Summed PSS (shared pages split between sharers) of a process and all its descendants."""
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def measure(
    images: Path, out: Path, use_ray: bool, env: dict[str, str], config: Path, overrides: list[str]
) -> Measured:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, str(ROOT / "pipelines" / "rexverse2m.py"), "--config"]
    command += [
        str(config),
        *[arg for override in overrides for arg in ("--set", override)],
        "--input",
        str(images),
        "--output",
        str(out),
        "--quiet",
    ]
    if not use_ray:
        command.append("--no-ray")
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    errors: list[bytes] = []
    threading.Thread(target=lambda: errors.append(proc.stderr.read()), daemon=True).start()
    root = psutil.Process(proc.pid)
    peak, first_commit, next_sample = 0, float("nan"), 0.0
    while proc.poll() is None:
        now = time.perf_counter()
        if now >= next_sample:  # reading every process's smaps costs CPU: once a second is enough
            peak = max(peak, tree_pss(root))
            next_sample = now + 1.0
        if first_commit != first_commit and any((out / "_commits").glob("*.json")):
            first_commit = now - start
        time.sleep(0.1)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"engine failed ({proc.returncode}): {b''.join(errors).decode()[-3000:]}")
    mode = "ray" if use_ray else "loop"
    n = sum(1 for _ in images.glob("*.*"))
    print(
        f"{mode:>4} {n:>5} inputs: {wall:7.1f} s, peak PSS {peak / 1e9:5.2f} GB, "
        f"first commit {first_commit:6.1f} s"
    )
    return Measured(wall, peak / 1e9, first_commit)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "fixture.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override, K=V")
    args = parser.parse_args()

    from scaffold.make_fixture import generate_fixture

    work = args.work or Path(tempfile.mkdtemp(prefix="engine-overhead-"))
    big, small = work / f"images{args.images}", work / f"images{args.small}"
    generate_fixture(big, n=args.images, seed=1)  # seed 1: not the committed fixture's images
    generate_fixture(small, n=args.small, seed=2)
    for folder in (big, small):
        (folder / "annotations.json").unlink()
        (folder / "README.md").unlink()
    env = dict(
        os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"
    )
    env["PYTHONPATH"] = str(ROOT)
    # Build the tiny models once up front so that neither mode pays for it.
    subprocess.run(
        [sys.executable, "-m", "scaffold.tiny_models"], env=env, cwd=ROOT, check=True, capture_output=True
    )

    run = dict(env=env, config=args.config.resolve(), overrides=args.overrides)
    local = measure(big, work / "out-loop", use_ray=False, **run)
    ray_big = measure(big, work / "out-ray", use_ray=True, **run)
    ray_small = measure(small, work / "out-ray-small", use_ray=True, **run)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"ray_over_local={ray_big.wall_s / local.wall_s:.3f} "
        f"mem_over_local={ray_big.peak_pss_gb / local.peak_pss_gb:.3f} "
        f"peak_mem_ratio_10x={ray_big.peak_pss_gb / ray_small.peak_pss_gb:.3f} "
        f"first_commit_over_local={ray_big.first_commit_s / local.first_commit_s:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
