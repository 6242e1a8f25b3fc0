"""Write Rexverse shards from COCO-format ground truth (training data for ChatRex, or the benchmark's scenes).

    python pipelines/coco_to_shards.py --coco tests/fixtures/fixture100/annotations.json \\
        --output out/fixture-gt [--proposals detections.json] [--synthetic-proposals [--distractors 6]]

Proposals (the class-agnostic candidate boxes ChatRex evaluates on) come from `--proposals` (COCO detection
results) and/or `--synthetic-proposals`, the documented stand-in proposal model for the synthetic scenes
(`chatrex/proposals.py`: jittered object boxes, background and partial boxes, uninformative scores). Without
either, records carry no proposals: fine for training (ground truth is an input there), not for evaluation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatrex.coco import iter_coco_records  # noqa: E402
from engine.config import SinkConfig  # noqa: E402
from engine.items import Item  # noqa: E402
from engine.sink import PartWriter, merge_rejects  # noqa: E402
from engine.storage import Folder  # noqa: E402


def convert(
    coco: Path,
    output: Path,
    images: Path | None = None,
    proposals: Path | None = None,
    synthetic_distractors: int | None = None,
    seed: int = 0,
    shard_size: int = 1000,
    limit: int | None = None,
) -> int:
    """Convert and commit; returns the number of records written."""
    if output.exists() and any(output.iterdir()):
        raise SystemExit(f"{output} is not empty; choose a new --output")
    out = Folder(output)
    writer = PartWriter(out, "coco", 0, shard_size, max_pending_rejects=10_000)
    for record, data in iter_coco_records(coco, images, proposals, synthetic_distractors, seed, limit):
        writer.add(Item(record["key"], record["source"]["uri"], data, record))
    results = writer.close()
    merge_rejects(out, SinkConfig().merge_rejects_max)
    records = sum(r["records"] for r in results)
    manifest = {
        "source": str(coco),
        "records": records,
        "rejects": sum(r["rejects"] for r in results),
        "proposals": str(proposals) if proposals else None,
        "synthetic_proposals": synthetic_distractors is not None,
        "synthetic_distractors": synthetic_distractors,
        "seed": seed,
    }
    (output / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--coco", required=True, type=Path, help="COCO json (images + annotations + categories)"
    )
    parser.add_argument("--images", type=Path, default=None, help="image folder (default: the json's folder)")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--proposals", type=Path, default=None, help="COCO detection results as proposals")
    parser.add_argument(
        "--synthetic-proposals",
        action="store_true",
        help="add the synthetic proposal model's boxes (synthetic benchmark scenes only)",
    )
    parser.add_argument(
        "--distractors",
        type=int,
        default=None,
        help="distractor boxes per image of --synthetic-proposals (6)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args(argv)
    if args.distractors is not None and not args.synthetic_proposals:
        parser.error(
            "--distractors sets the synthetic proposal model's distractors: add --synthetic-proposals"
        )
    synthetic = (6 if args.distractors is None else args.distractors) if args.synthetic_proposals else None
    n = convert(
        args.coco,
        args.output,
        args.images,
        args.proposals,
        synthetic,
        args.seed,
        args.shard_size,
        args.limit,
    )
    print(f"{n} records -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
