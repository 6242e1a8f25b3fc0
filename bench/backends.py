"""Seconds per image of each grounding / proposal / segmentation backend, side by side on the same images.

Runs the engine's own stage objects (no Ray) on the first N fixture images that reach each stage, with the
fixture's tiny models, and prints each backend's time per image and its ratio to the transformers default.
Tiny random models measure the pipeline overhead of each backend (pre/post-processing, batching, mask
upsampling), not the cost of the real networks.

    python bench/backends.py [--images 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "grounding": [
        ("transformers", []),
        (
            "groundingdino-py",
            [
                "stages.grounding.backend=groundingdino-py",
                "stages.grounding.model.name=tiny:groundingdino-official",
            ],
        ),
    ],
    "proposals": [
        ("owlv2", []),
        (
            "grounding",
            ["stages.proposals.backend=grounding", "stages.proposals.model.name=tiny:grounding-dino"],
        ),
    ],
    "segment": [
        ("transformers", []),
        ("sam2", ["stages.segment.backend=sam2", "stages.segment.model.name=tiny:sam2-official"]),
    ],
}


def items_at(stage_name: str, cfg, limit: int):
    """Fixture items processed up to (not including) `stage_name`, with the default backends."""
    from engine.dedupe import KeyRegistry
    from engine.items import batch_to_items
    from engine.pipeline import active_stages
    from engine.sources import list_inputs, listing_table
    from pipelines.rexverse2m import STAGES
    from stages.decode import Decode

    table = listing_table(list_inputs([str(ROOT / "tests" / "fixtures" / "fixture100")], limit=limit))
    batch = Decode(cfg.stages.decode, claim=KeyRegistry().claim)(
        {n: table[n].to_numpy(zero_copy_only=False) for n in table.column_names}
    )
    items = batch_to_items(batch)
    for cls, stage_cfg in active_stages(STAGES[1:], cfg):
        if cls.name == stage_name:
            break
        cls(stage_cfg).run(items)
    return [item for item in items if item.ok]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from engine.config import load_config as load_any
    from engine.pipeline import active_stages
    from pipelines.rexverse2m import STAGES, JobConfig

    def load_config(path, overrides=None):
        return load_any(path, JobConfig, overrides)

    torch.set_num_threads(1)
    config_path = ROOT / "configs" / "fixture.yaml"
    for stage_name, variants in VARIANTS.items():
        base = load_config(config_path)
        items = items_at(stage_name, base, args.images)
        results = []
        for label, overrides in variants:
            cfg = load_config(config_path, overrides)
            cls, stage_cfg = next((c, s) for c, s in active_stages(STAGES, cfg) if c.name == stage_name)
            stage = cls(stage_cfg)
            stage.run(copy.deepcopy(items[:2]))  # warm-up
            times = []
            for _ in range(args.repeats):
                batch = copy.deepcopy(items)
                start = time.perf_counter()
                for i in range(0, len(batch), stage_cfg.resources.batch_size):
                    stage.run(batch[i : i + stage_cfg.resources.batch_size])
                times.append((time.perf_counter() - start) / len(batch))
            results.append((label, statistics.median(times)))
        reference = results[0][1]
        for label, seconds in results:
            print(
                f"{stage_name:<10} {label:<17} {seconds * 1000:8.1f} ms/image  x{seconds / reference:.2f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
