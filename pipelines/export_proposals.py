"""Write the proposals of Rexverse shards as a COCO detection-results file (class-agnostic, category_id 1).

    python pipelines/export_proposals.py --shards out/coco-shards --output proposals.json
    python pipelines/eval_chatrex.py --model M --coco gt.json --proposals proposals.json --output out/eval

The image ids come from the records' `provenance.coco.image_id` (shards written by `coco_to_shards.py`), so
the file pairs with the COCO ground truth the shards came from; ChatRex's COCO evaluation then takes its
candidate boxes from this file and never from the annotations.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatrex.proposals import proposals_to_results  # noqa: E402


def shard_records(folder: Path):
    """Every record (json member) of the .tar shards in `folder` (or its shards/ subfolder), in order."""
    import webdataset as wds

    base = folder / "shards" if (folder / "shards").is_dir() else folder
    tars = sorted(glob.glob(str(base / "*.tar")))
    if not tars:
        raise SystemExit(f"no .tar shard in {base}")
    for row in wds.WebDataset(tars, shardshuffle=False):
        yield json.loads(row["json"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", required=True, type=Path, help="shard folder")
    parser.add_argument("--output", required=True, type=Path, help="COCO results json to write")
    args = parser.parse_args(argv)
    try:
        results = proposals_to_results(shard_records(args.shards))
    except ValueError as exc:
        print(f"export_proposals: error: {exc}", file=sys.stderr)
        return 2
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results))
    print(f"{len(results)} proposals -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
