"""The pool pass at scale: driver memory and reads against the number of images, throughput against a plain
multiprocessing baseline, and a resume after the driver is SIGKILLed half-way.

    python bench/pool_scale.py --work /tmp/pool_scale            # 100k and 1M samples (the issue's sizes)
    python bench/pool_scale.py --work /tmp/ps --small 10000 --large 100000 --tars-per-10k 1

It builds a synthetic webdataset of small JPEGs (256 px, each distinct, `--tars-per-10k` tars per 10,000
samples), runs the pool pass (configs/collect.yaml with what a 2-core machine without a GPU needs changed,
classifiers off; a `--check` run of 10,000 samples with the tiny stand-in classifiers on) at the small and
the large size, and the baseline over the large one: a multiprocessing pool over the same cores that reads
each tar sequentially, decodes and hashes every image, applies the same size rules and writes the kept
bytes to tars: the I/O + decode limit of this pass with no engine around it. Driver memory is the engine
process's peak RSS (polled); driver reads are its `rchar` (bytes read through system calls) above a run
over one tar of 100 samples, over the input bytes.
Prints, last: driver_peak_mb_<small>, driver_peak_mb_<large>, driver_mem_ratio_10x, driver_read_frac,
throughput_over_raw (engine img/s / baseline img/s at the large size; the baseline runs right before and
right after the large run, and the ratio takes the mean of the two).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "pipelines" / "rexverse2m.py"
CONFIG = ROOT / "configs" / "collect.yaml"  # the pool pass as users run it, with the real decode bounds
# 256 px: about the smallest side the real pool config keeps (decode.min_side 224). Smaller images would be
# rejected as too small; larger ones only make the decode, which the baseline does too, a bigger share.
SIDE = 256
# What a 2-core machine without a GPU needs changed; the rest is configs/collect.yaml as it stands.
POOL_SETTINGS = [
    "stages.collect.resources.num_gpus=0",  # no GPU here (the classifiers' config asks for a quarter each)
    "stages.decode.resources.concurrency=2",  # one decode actor per core
    "stages.decode.resources.num_cpus=0.5",  # leave room for the read and write tasks
    "stages.collect.resources.num_cpus=0.5",  # (a fused group asks for its members' largest need)
    "ray.fuse=[[decode, collect]]",  # with the classifiers off, collect is only a threshold
    # one key-table partition per core: on 2 cores more processes cost more than they spread (at steady
    # state here 4 partitions took ~6 % of a core, 2 ~3.5 %)
    "ray.dedupe_partitions=2",
    "ray.show_progress=false",
]
CLASSIFIERS_OFF = ["stages.collect.nsfw.model=null", "stages.collect.low_content.model=null"]
# The run with classifiers on: the tiny random stand-ins (no hub here) with the fixture's thresholds
CLASSIFIERS_TINY = [
    "stages.collect.nsfw.model.name=tiny:nsfw",
    "stages.collect.nsfw.threshold=0.531",
    "stages.collect.low_content.model={name: 'tiny:low-content'}",
    "stages.collect.low_content.threshold=0.533",
]


def size_name(n: int) -> str:
    return f"{n // 1_000_000}m" if n % 1_000_000 == 0 else f"{n // 1000}k"


# --- data --------------------------------------------------------------------------------------------------


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)  # a blocky image: content, small file
    image = Image.fromarray(base).resize((SIDE, SIDE), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _write_tar(args: tuple[Path, int, int]) -> int:
    path, start, count = args
    if path.exists():
        return path.stat().st_size
    tmp = path.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tar:
        for n in range(start, start + count):
            data = _jpeg(n)
            info = tarfile.TarInfo(f"{n:09d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tmp.rename(path)
    return path.stat().st_size


def build_dataset(folder: Path, samples: int, per_tar: int, processes: int) -> int:
    """`samples` distinct JPEGs in tars of `per_tar`; returns the input bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [
        (folder / f"{i:05d}.tar", i * per_tar, min(per_tar, samples - i * per_tar))
        for i in range(-(-samples // per_tar))
    ]
    with mp.Pool(processes) as pool:
        return sum(pool.map(_write_tar, jobs))


# --- the baseline ------------------------------------------------------------------------------------------


def _baseline_tar(args: tuple[Path, Path, dict]) -> tuple[int, int]:
    source, out, rules = args
    seen = kept = 0
    with tarfile.open(source, "r|") as tar, tarfile.open(out, "w") as writer:
        for member in tar:
            if not member.isreg():
                continue
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            seen += 1
            key = hashlib.sha256(data).hexdigest()
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                width, height = image.size
            if (
                min(width, height) < rules["min_side"]
                or width * height > rules["max_pixels"]
                or max(width, height) / min(width, height) > rules["max_aspect"]
            ):
                continue
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            writer.addfile(info, io.BytesIO(data))
            kept += 1
    return seen, kept


def decode_rules() -> dict:
    """The pool config's decode size bounds (the engine applies the same)."""
    sys.path.insert(0, str(ROOT / "pipelines"))
    from rexverse2m import load_job_config

    decode = load_job_config(CONFIG).stages.decode
    return {"min_side": decode.min_side, "max_pixels": decode.max_pixels, "max_aspect": decode.max_aspect}


def run_baseline(tars: list[Path], out: Path, processes: int) -> float:
    out.mkdir(parents=True, exist_ok=True)
    rules = decode_rules()
    start = time.time()
    with mp.Pool(processes) as pool:
        counts = pool.map(_baseline_tar, [(t, out / t.name, rules) for t in tars])
    wall = time.time() - start
    subprocess.run(["rm", "-rf", str(out)], check=True)  # ~1 GB per 300k samples; only its speed is kept
    return sum(seen for seen, _ in counts) / wall


# --- the engine --------------------------------------------------------------------------------------------


def _io_chars(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_engine(inputs: str, out: Path, settings: list[str], kill_at: float | None = None) -> dict:
    """The pool pass as a user runs it; polls the driver's RSS and read bytes. `kill_at`: SIGKILL the driver
    once that fraction of the samples (POOL_SCALE_TOTAL) is committed."""
    import psutil

    command = [
        sys.executable,
        str(SCRIPT),
        "--config",
        str(CONFIG),
        "--input",
        inputs,
        "--output",
        str(out),
        "--quiet",
    ]
    for setting in settings:
        command += ["--set", setting]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    start = time.time()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    driver = psutil.Process(proc.pid)
    peak = chars = 0
    killed = False
    log: list[str] = []
    import threading

    reader = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    while proc.poll() is None:
        try:
            peak = max(peak, driver.memory_info().rss)
            chars = max(chars, _io_chars(proc.pid))
        except psutil.Error:
            pass
        if kill_at is not None and not killed and _committed_fraction(out) >= kill_at:
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
        time.sleep(0.2)
    reader.join(timeout=10)
    wall = time.time() - start
    if proc.returncode != 0 and not killed:
        raise SystemExit(f"engine failed ({proc.returncode}):\n{''.join(log)[-4000:]}")
    return {"wall": wall, "peak_mb": peak / 2**20, "rchar": chars, "killed": killed, "log": "".join(log)}


def _committed_fraction(out: Path) -> float:
    markers = list((out / "_commits").glob("*.json")) if (out / "_commits").is_dir() else []
    done = 0
    for marker in markers:
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        done += info["records"] + info["rejects"]
    total = int(os.environ.get("POOL_SCALE_TOTAL", "0") or 0)
    return done / total if total else 0.0


def check_output(out: Path, samples: int) -> tuple[int, int]:
    import pandas as pd

    index = pd.read_parquet(out / "index", columns=["key"])
    rejects = pd.read_parquet(out / "rejects", columns=["uri"]) if any((out / "rejects").glob("*")) else None
    n_rejects = 0 if rejects is None else len(rejects)
    assert index["key"].is_unique, "a key written twice"
    assert len(index) + n_rejects == samples, f"{len(index)} + {n_rejects} != {samples}: something lost"
    return len(index), n_rejects


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument(
        "--check", type=int, default=10_000, help="samples of the run with classifiers on (0: skip)"
    )
    parser.add_argument("--tars-per-10k", type=int, default=1)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--no-resume", action="store_true")
    args = parser.parse_args()
    per_tar = 10_000 // args.tars_per_10k
    work = args.work
    data = work / "data"
    built = build_dataset(data, args.large, per_tar, args.processes)
    tars = sorted(data.glob("*.tar"))
    small_tars = tars[: -(-args.small // per_tar)]
    small_dir = work / "small_inputs"
    small_dir.mkdir(parents=True, exist_ok=True)
    for tar in small_tars:
        link = small_dir / tar.name
        if not link.exists():
            link.symlink_to(tar)
    one_dir = work / "one_input"
    one_dir.mkdir(parents=True, exist_ok=True)
    _write_tar((one_dir / "00000.tar", 10**8, 100))
    print(f"data: {args.large} samples in {len(tars)} tars, {built / 2**20:.0f} MiB", flush=True)

    pool = POOL_SETTINGS + CLASSIFIERS_OFF
    runs = {}
    # The baseline right before and right after the large run: these machines are noisy, and the ratio is
    # taken against the mean of the two.
    baselines = []
    for name, inputs, samples in (
        ("one", one_dir, 100),
        ("small", small_dir, args.small),
        ("large", data, args.large),
    ):
        out = work / f"out_{name}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        if name == "large":
            baselines.append(run_baseline(tars, work / "baseline_out", args.processes))
        runs[name] = run_engine(f"{inputs}/*.tar", out, pool)
        if name == "large":
            baselines.append(run_baseline(tars, work / "baseline_out", args.processes))
        records, rejects = check_output(out, samples)
        print(
            f"engine {name}: {samples} samples, {records} records, {rejects} rejects, "
            f"{runs[name]['wall']:.1f}s, driver peak {runs[name]['peak_mb']:.0f} MB, "
            f"driver rchar {runs[name]['rchar'] / 2**20:.0f} MiB",
            flush=True,
        )
    if args.check:
        out = work / "out_check"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        check_tars = tars[: max(1, args.check // per_tar)]
        check_dir = work / "check_inputs"
        check_dir.mkdir(parents=True, exist_ok=True)
        for tar in check_tars:
            if not (check_dir / tar.name).exists():
                (check_dir / tar.name).symlink_to(tar)
        checked = run_engine(f"{check_dir}/*.tar", out, POOL_SETTINGS + CLASSIFIERS_TINY)
        records, rejects = check_output(out, len(check_tars) * per_tar)
        print(
            f"engine with classifiers: {len(check_tars) * per_tar} samples, {records} records, "
            f"{rejects} rejects, {checked['wall']:.1f}s",
            flush=True,
        )

    baseline_ips = sum(baselines) / len(baselines)
    engine_ips = args.large / runs["large"]["wall"]
    print(
        f"baseline: {baselines[0]:.0f} img/s before the large run, {baselines[1]:.0f} after (mean "
        f"{baseline_ips:.0f}) over {args.processes} processes; engine: {engine_ips:.0f} img/s",
        flush=True,
    )

    if not args.no_resume:
        out = work / "out_resume"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        os.environ["POOL_SCALE_TOTAL"] = str(args.large)
        first = run_engine(f"{data}/*.tar", out, pool, kill_at=0.5)
        os.environ.pop("POOL_SCALE_TOTAL")
        assert first["killed"], "the run finished before half of it was committed"
        partial = sum(1 for _ in (out / "_commits").glob("*.json"))
        run_engine(f"{data}/*.tar", out, pool)
        records, rejects = check_output(out, args.large)
        print(
            f"resume check at {size_name(args.large)}: driver SIGKILLed with {partial} parts committed, "
            f"rerun added the rest: {records} records + {rejects} rejects = {args.large}, no key twice, "
            "nothing lost",
            flush=True,
        )

    small, large = size_name(args.small), size_name(args.large)
    ratio = runs["large"]["peak_mb"] / runs["small"]["peak_mb"]
    read_frac = max(0, runs["large"]["rchar"] - runs["one"]["rchar"]) / built
    print(
        f"driver_peak_mb_{small}={runs['small']['peak_mb']:.0f} "
        f"driver_peak_mb_{large}={runs['large']['peak_mb']:.0f} "
        f"driver_mem_ratio_10x={ratio:.3f} driver_read_frac={read_frac:.4f} "
        f"throughput_over_raw={engine_ips / baseline_ips:.3f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
