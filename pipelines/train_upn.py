"""Train UPN (class-agnostic proposals at two granularities) on Rexverse shards with Ray Train, resumable.

    python pipelines/train_upn.py --model tiny:upn --shards out/fixture --output out/upn [--steps 2000]
    cluster: ray job submit --working-dir . -- python pipelines/train_upn.py --model DIR --shards s3://... \\
        --output /shared/upn --workers 8 --gpu

Targets per granularity come from each record's regions (`upn/data.py`: coarse = objects, fine = parts or,
without parts, small objects). Each step encodes a batch once and decodes it once per granularity (the
prompts share the encoder); the loss is DETR's: Hungarian matching, focal objectness, L1 + GIoU, on every
decoder layer and on the encoder's selected proposals (`upn/loss.py`). Checkpoints (model + optimizer +
step) go through Ray Train every `--checkpoint-every` steps; rerunning the same command resumes from the
latest one, and a finished run is not repeated. The model ends in `<output>/model`, the loss curve in
`<output>/train_summary.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.training import (  # noqa: E402
    OPTIMIZER_FILE,
    STATE_FILE,
    fit_to_folder,
    report_checkpoint,
    restored_checkpoint,
    saved_optimizer_state,
    shard_paths,
    warmup_cosine,
)

RUN_NAME = "upn"


def train_step(
    model: Any, examples: list, granularities: list[str], device: Any
) -> tuple[Any, dict[str, float]]:
    """Loss of one batch of (image, {granularity: targets}): one encoding, one decoding per prompt."""
    from upn.data import preprocess
    from upn.loss import upn_loss

    inner = getattr(model, "module", model)
    cfg = inner.config
    pixels = preprocess([image for image, _ in examples], cfg.image_size, cfg.image_mean, cfg.image_std)
    enc = inner.encode(pixels.to(device))
    total, parts = None, {}
    for granularity in granularities:
        out = inner.decode(enc, granularity)
        loss, terms = upn_loss(out, [targets[granularity].to(device) for _, targets in examples])
        total = loss if total is None else total + loss
        parts.update({f"{granularity}/{name}": value for name, value in terms.items()})
    return total, parts


def optimizer_for(model: Any, lr: float, backbone_lr: float, weight_decay: float) -> Any:
    """AdamW; the backbone gets its own learning rate (lower for a pretrained one, as DETRs train)."""
    import torch

    backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
    return torch.optim.AdamW(
        [{"params": backbone, "lr": backbone_lr}, {"params": rest, "lr": lr}], weight_decay=weight_decay
    )


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: load (or restore), train, report losses and checkpoints."""
    import numpy as np
    import ray.train
    import ray.train.torch
    import torch

    from upn import UPNModel
    from upn.data import training_example

    torch.set_num_threads(config["threads"])
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(config["seed"] + rank)
    with restored_checkpoint() as (state, restored):
        model = UPNModel.from_pretrained(restored or config["model"])
        moments = saved_optimizer_state(restored)
    if restored is not None and rank == 0:
        print(f"resumed from the checkpoint of step {state['step']}", flush=True)
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    inner = getattr(model, "module", model)
    optimizer = optimizer_for(inner, config["lr"], config["backbone_lr"], config["weight_decay"])
    if moments is not None:
        optimizer.load_state_dict(moments)
    start = state["step"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s + start, config["steps"], config["warmup"])
    )
    granularities = config["granularities"]
    shard = ray.train.get_dataset_shard("train")
    rng = np.random.default_rng([config["seed"], rank, start])
    window: list[float] = []
    parts_window: dict[str, list[float]] = {}
    started = time.time() - state["seconds"]
    model.train()
    while state["step"] < config["steps"]:
        for batch in shard.iter_batches(
            batch_size=config["batch_size"],
            batch_format="numpy",
            local_shuffle_buffer_size=config["shuffle_buffer"],
            local_shuffle_seed=config["seed"] + state["epoch"],
        ):
            rows = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["__key__"]))]
            examples = [training_example(row, granularities, config["small_side"], rng) for row in rows]
            loss, parts = train_step(model, examples, granularities, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"])
            optimizer.step()
            scheduler.step()
            state["step"] += 1
            window.append(float(loss.detach()))
            for name, value in parts.items():
                parts_window.setdefault(name, []).append(value)
            done = state["step"] >= config["steps"]
            if state["step"] % config["log_every"] == 0 or done:
                state["seconds"] = time.time() - started
                mean = sum(window) / len(window)
                state["losses"].append([state["step"], round(mean, 5)])
                metrics = {"step": state["step"], "loss": mean, "lr": scheduler.get_last_lr()[-1]}
                metrics.update({k: sum(v) / len(v) for k, v in parts_window.items()})
                window, parts_window = [], {}
                if rank == 0:
                    detail = " ".join(f"{k} {v:.3f}" for k, v in metrics.items() if "/" in k)
                    print(
                        f"step {state['step']}/{config['steps']} loss {mean:.3f} ({detail}) "
                        f"lr {metrics['lr']:.2e} {state['seconds']:.0f}s",
                        flush=True,
                    )
                if state["step"] % config["checkpoint_every"] == 0 or done:
                    report_checkpoint(inner.save_pretrained, optimizer, state, metrics, rank)
                else:
                    ray.train.report(metrics)
            if done:
                break
        state["epoch"] += 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="initial UPN: a from_pretrained folder or tiny:upn")
    parser.add_argument(
        "--shards", required=True, action="append", help="shard folder, .tar files/glob, URIs"
    )
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--backbone-lr", type=float, default=None, help="default: --lr (random backbone)")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--grad-clip", type=float, default=0.1)
    parser.add_argument("--granularities", default="coarse,fine")
    parser.add_argument("--small-side", type=float, default=None, help="fine-target threshold (upn/data.py)")
    parser.add_argument("--shuffle-buffer", type=int, default=256)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--cpus-per-worker", type=float, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray

    from engine.config import ConfigError, RayConfig
    from engine.models import resolve_model
    from engine.runtime import init_ray
    from upn.data import SMALL_SIDE

    output = args.output.resolve()
    model_dir = output / "model"
    if (model_dir / "config.json").exists():
        print(f"already trained: {model_dir}", flush=True)
        return 0
    output.mkdir(parents=True, exist_ok=True)
    config = {
        "model": resolve_model(args.model),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "backbone_lr": args.backbone_lr if args.backbone_lr is not None else args.lr,
        "weight_decay": args.weight_decay,
        "warmup": args.warmup,
        "grad_clip": args.grad_clip,
        "granularities": [g.strip() for g in args.granularities.split(",") if g.strip()],
        "small_side": args.small_side if args.small_side is not None else SMALL_SIDE,
        "shuffle_buffer": args.shuffle_buffer,
        "log_every": args.log_every,
        "checkpoint_every": args.checkpoint_every,
        "threads": args.threads,
        "seed": args.seed,
    }
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started_local = init_ray(RayConfig(show_progress=False), namespace="upn-train", train=True)
    try:
        dataset = ray.data.read_webdataset(shard_paths(args.shards), decoder=None)
        fit_to_folder(
            train_loop,
            config,
            dataset,
            name=RUN_NAME,
            storage=output / "runs",
            final=model_dir,
            num_workers=args.workers,
            cpus_per_worker=args.cpus_per_worker,
            use_gpu=args.gpu,
            leave_out=(OPTIMIZER_FILE,),
        )
        state = json.loads((model_dir / STATE_FILE).read_text())
        summary = {
            "config": config,
            "steps": state["step"],
            "seconds": state["seconds"],
            "losses": state["losses"],
        }
        (output / "train_summary.json").write_text(json.dumps(summary, indent=2))
        first, last = state["losses"][0][1], state["losses"][-1][1]
        print(
            f"trained UPN: loss {first:.3f} -> {last:.3f} in {state['step']} steps; {model_dir}", flush=True
        )
    except ConfigError as exc:
        print(f"train_upn: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if started_local:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
