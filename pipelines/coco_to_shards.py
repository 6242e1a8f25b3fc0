"""Write Rexverse shards from COCO-format ground truth (training data for ChatRex, or the benchmark's scenes).

    python pipelines/coco_to_shards.py --coco tests/fixtures/fixture100/annotations.json \\
        --output out/fixture-gt [--proposals detections.json] [--distractors 10]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatrex.coco import iter_coco_records  # noqa: E402
from engine.items import Item  # noqa: E402
from engine.sink import PartWriter, merge_rejects  # noqa: E402
from engine.storage import Folder  # noqa: E402


def convert(
    coco: Path,
    output: Path,
    images: Path | None = None,
    proposals: Path | None = None,
    distractors: int = 0,
    seed: int = 0,
    shard_size: int = 1000,
    limit: int | None = None,
) -> int:
    """Convert and commit; returns the number of records written."""
    if output.exists() and any(output.iterdir()):
        raise SystemExit(f"{output} is not empty; choose a new --output")
    out = Folder(output)
    writer = PartWriter(out, "coco", 0, shard_size, max_pending_rejects=10_000)
    for record, data in iter_coco_records(coco, images, proposals, distractors, seed, limit):
        writer.add(Item(record["key"], record["source"]["uri"], data, record))
    results = writer.close()
    merge_rejects(out)
    records = sum(r["records"] for r in results)
    manifest = {
        "source": str(coco),
        "records": records,
        "rejects": sum(r["rejects"] for r in results),
        "distractors": distractors,
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
    parser.add_argument("--distractors", type=int, default=0, help="random proposal boxes per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args(argv)
    n = convert(
        args.coco,
        args.output,
        args.images,
        args.proposals,
        args.distractors,
        args.seed,
        args.shard_size,
        args.limit,
    )
    print(f"{n} records -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
