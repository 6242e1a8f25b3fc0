"""Does UPN learn to propose objects? A CPU benchmark (not a CI test).

Generates synthetic scenes of simple shapes with known boxes (the fixture generator, other seeds; the ChatRex
bench uses the same ones), writes the training scenes as Rexverse shards, trains a small random-init UPN on
them with the real training pipeline (Ray Train, both granularity prompts: coarse = every object, fine = the
small objects), and evaluates held-out scenes with the real eval pipeline: AR@10, AR@100, R@0.5 at 100 boxes
per image for every method, beside the data prior (the training boxes' shapes on a grid, ranked by how
many training boxes they cover: the best trivial proposer) and OWLv2 objectness, the engine's previous
stand-in, here a random OWLv2 with 100 patch boxes (a floor: no pretrained OWLv2 can be downloaded here).
The last line reads `AR@100=<a> R@0.5=<r> prior_AR@100=<pa> prior_R@0.5=<p> owlv2_R@0.5=<o>` (coarse).

    python bench/upn_learns.py [--train-scenes 1500] [--steps 800] [--threads 1] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_small_upn(out: Path, image_size: int, seed: int = 0) -> Path:
    """A small random UPN: ConvNeXt 32-64-128-256 (strides 8-32), 64-wide, 2 encoder / 3 decoder layers,
    3 feature levels, 100 queries (~1.4 M parameters)."""
    import torch

    from upn import UPNConfig, UPNModel

    torch.manual_seed(seed)
    config = UPNConfig(
        backbone_config={
            "model_type": "convnext",
            "hidden_sizes": [32, 64, 128, 256],
            "depths": [1, 1, 2, 1],
            "out_features": ["stage2", "stage3", "stage4"],
        },
        d_model=64,
        encoder_layers=2,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=256,
        decoder_ffn_dim=256,
        num_feature_levels=3,
        num_queries=100,
        image_size=image_size,
    )
    UPNModel(config).save_pretrained(out)
    return out


def build_owlv2_100(out: Path) -> Path:
    """The tiny OWLv2 at 160 px: 10 x 10 patches, so it proposes 100 boxes like every other method."""
    import torch
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2Processor

    from scaffold.tiny_models import ensure_tiny_model

    tiny = ensure_tiny_model("owlv2")
    config = Owlv2Config.from_pretrained(tiny)
    config.vision_config.image_size = 160
    torch.manual_seed(0)
    Owlv2ForObjectDetection(config).save_pretrained(out)
    processor = Owlv2Processor.from_pretrained(tiny)
    processor.image_processor.size = {"height": 160, "width": 160}
    processor.save_pretrained(out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/upn-bench"))
    parser.add_argument("--train-scenes", type=int, default=1500)
    parser.add_argument("--test-scenes", type=int, default=200)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--image-size", type=int, default=192)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared 2-core machine 2 threads ran 10-20x slower, measured here)",
    )
    args = parser.parse_args()

    from pipelines import eval_upn, train_upn
    from pipelines.coco_to_shards import convert
    from scaffold.make_fixture import generate_fixture

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    t0 = time.time()
    for split, n, seed in (("train", args.train_scenes, 101), ("test", args.test_scenes, 202)):
        generate_fixture(args.work / f"{split}-scenes", n=n, seed=seed)
    convert(args.work / "train-scenes" / "annotations.json", args.work / "train-shards", shard_size=500)
    print(
        f"data: {args.train_scenes} train / {args.test_scenes} test scenes ({time.time() - t0:.0f}s)",
        flush=True,
    )

    init = build_small_upn(args.work / "init", args.image_size)
    t1 = time.time()
    # The machine may be shared: a Ray instance killed from outside ends the run; rerunning the training
    # command resumes from its latest checkpoint (that is what the pipeline's resume is for).
    for attempt in range(1, 4):
        try:
            train_upn.main(
                [
                    "--model",
                    str(init),
                    "--shards",
                    str(args.work / "train-shards"),
                    "--output",
                    str(args.work / "train"),
                    "--steps",
                    str(args.steps),
                    "--batch-size",
                    str(args.batch_size),
                    "--lr",
                    str(args.lr),
                    "--warmup",
                    "50",
                    "--threads",
                    str(args.threads),
                    "--log-every",
                    "50",
                    "--checkpoint-every",
                    "200",
                ]
            )
            break
        except Exception as exc:  # noqa: BLE001 - any Ray failure: resume, at most three attempts
            if attempt == 3:
                raise
            print(f"training attempt {attempt} failed ({type(exc).__name__}: {exc}); resuming", flush=True)
    train_minutes = (time.time() - t1) / 60
    owlv2 = build_owlv2_100(args.work / "owlv2-100")
    metrics = eval_upn.evaluate(
        eval_upn.parse_args(
            [
                "--model",
                str(args.work / "train" / "model"),
                "--coco",
                str(args.work / "test-scenes" / "annotations.json"),
                "--prior-coco",
                str(args.work / "train-scenes" / "annotations.json"),
                "--owlv2",
                str(owlv2),
                "--threads",
                str(args.threads),
                "--output",
                str(args.work / "eval"),
            ]
        )
    )
    print(eval_upn.table(metrics))
    fine = eval_upn.summary_line(metrics, "fine")
    print(f"fine granularity: {fine}")
    print(
        f"training: {args.steps} steps, batch {args.batch_size}, {args.image_size} px, "
        f"{train_minutes:.1f} min on {args.threads} CPU thread(s); total {(time.time() - t0) / 60:.1f} min; "
        f"COCO-results proposals: {args.work / 'eval'}/proposals_coarse.json",
        flush=True,
    )
    print(eval_upn.summary_line(metrics, "coarse"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
