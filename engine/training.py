"""Ray Train plumbing shared by the training pipelines (ChatRex, UPN): shard lists, the learning-rate
schedule, checkpoints that hold model + optimizer + loop state, resuming, and one run to one final folder.

A training loop (on the workers) loads inside `restored_checkpoint` and calls `report_checkpoint` every so
often; the driver calls `fit_to_folder`, which refuses a cluster whose CPUs the workers would take whole and
copies the run's last checkpoint into place atomically, so a rerun finds either nothing or a whole model.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from engine.config import ConfigError

STATE_FILE = "train_state.json"
OPTIMIZER_FILE = "optimizer.pt"


def shard_paths(specs: list[str]) -> list[str]:
    """Local folders (an engine output or its shards/) become their .tar files; globs expand; remote URIs
    (s3://, gs://) pass through."""
    paths: list[str] = []
    for spec in specs:
        if "://" in spec:
            paths.append(spec)
        elif os.path.isdir(spec):
            folder = os.path.join(spec, "shards") if os.path.isdir(os.path.join(spec, "shards")) else spec
            paths += sorted(glob.glob(os.path.join(folder, "*.tar")))
        else:
            paths += sorted(glob.glob(spec)) if glob.has_magic(spec) else [spec]
    if not paths:
        raise ConfigError(f"--shards {specs} names no .tar shard")
    return paths


def warmup_cosine(step: int, steps: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def new_state() -> dict[str, Any]:
    """The loop state a checkpoint carries beside the weights."""
    return {"step": 0, "epoch": 0, "losses": [], "seconds": 0.0}


@contextmanager
def restored_checkpoint() -> Iterator[tuple[dict[str, Any], Path | None]]:
    """(loop state, folder) of the run's latest checkpoint, read where Ray Train puts it (no copy of ours:
    at 7B a checkpoint with its optimizer is tens of GB); load the model from the folder inside the block.
    (new state, None) when the run starts afresh."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield new_state(), None
        return
    with checkpoint.as_directory() as folder:
        yield json.loads((Path(folder) / STATE_FILE).read_text()), Path(folder)


def saved_optimizer_state(restored: Path | None) -> dict | None:
    """The optimizer's moments in a restored checkpoint, read into memory (None when there are none)."""
    import torch

    if restored is None or not (restored / OPTIMIZER_FILE).exists():
        return None
    return torch.load(restored / OPTIMIZER_FILE, map_location="cpu")


def report_checkpoint(
    save_model: Callable[[Path], None], optimizer: Any, state: dict, metrics: dict, rank: int
) -> None:
    """Rank 0 writes the model (`save_model(folder)`), the optimizer and the loop state; every rank reports
    (Ray Train waits for all of them)."""
    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            save_model(Path(folder))
            torch.save(optimizer.state_dict(), Path(folder) / OPTIMIZER_FILE)
            (Path(folder) / STATE_FILE).write_text(json.dumps(state))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


def require_spare_cpu(num_workers: int, cpus_per_worker: float) -> None:
    """Ray Data reads the shards with tasks of its own: if the workers reserve every CPU, it waits forever."""
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    reserved = num_workers * cpus_per_worker
    if total - reserved < 0.5:
        raise ConfigError(
            f"the training workers reserve {reserved:g} of the cluster's {total:g} CPUs; leave one free for "
            "reading shards (fewer workers or CPUs per worker; torch threads per worker may stay higher)"
        )


def fit_to_folder(
    train_loop: Callable[[dict], None],
    loop_config: dict[str, Any],
    dataset: Any,
    *,
    name: str,
    storage: Path,
    final: Path,
    num_workers: int,
    cpus_per_worker: float,
    use_gpu: bool,
    keep_checkpoints: int = 2,
    leave_out: tuple[str, ...] = (),
) -> Path:
    """One Ray Train run `name` under `storage` (a rerun of the same name resumes from its latest
    checkpoint); its last checkpoint, less `leave_out` patterns, becomes `final` in one rename."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    require_spare_cpu(num_workers, cpus_per_worker)
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
        ),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name} ended without a checkpoint")
    tmp = final.parent / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with result.checkpoint.as_directory() as folder:
        shutil.copytree(folder, tmp, ignore=shutil.ignore_patterns(*leave_out) if leave_out else None)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final
