"""Build a dataset release from engine outputs: shards, index, card, stats, gallery, exports, checksums.

    python pipelines/release.py --from out/fixture --to releases/fixture-1.0.0 \\
        --name rexverse-fixture --version 1.0.0 [--split val=0.01] [--previous RELEASE] \\
        [--require 'box_recall@0.5>=0.6' --require 'reject_rate<=0.3']

--from and --to take local folders or object-store URIs (s3://bucket/prefix, gs://...). Rerunning the same
command resumes an unfinished build or confirms a finished one; inputs are never modified.
See docs/release.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from release.build import GateError, Options, ReleaseError, build  # noqa: E402
from release.inputs import InputError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="release", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--from",
        dest="sources",
        action="append",
        required=True,
        metavar="OUT",
        help="engine output folder or URI; repeat to merge (a key in several: first wins)",
    )
    parser.add_argument("--to", dest="dest", required=True, metavar="RELEASE", help="release folder or URI")
    parser.add_argument("--name", default="rexverse", help="dataset name (default: rexverse)")
    parser.add_argument("--version", default="1.0.0", help="release version (default: 1.0.0)")
    parser.add_argument(
        "--split",
        default=None,
        metavar="NAME=FRACTION[,...]",
        help="held-out splits by a hash of the key, e.g. val=0.01; the rest is train",
    )
    parser.add_argument(
        "--shard-size", type=int, default=1000, help="records per release shard (default 1000)"
    )
    parser.add_argument("--previous", default=None, metavar="RELEASE", help="earlier release to diff against")
    parser.add_argument(
        "--require",
        action="append",
        default=[],
        metavar="METRIC>=VALUE",
        help="quality gate on each input's audit.json or reject rates, e.g. 'reject_rate<=0.3'",
    )
    parser.add_argument("--license", default="other", help="license id for the card (default: other)")
    parser.add_argument(
        "--gallery-size", type=int, default=24, help="images in the HTML gallery (default 24)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a release (or an unfinished build) of other inputs in --to",
    )
    parser.add_argument("--quiet", action="store_true", help="only the final line")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    opts = Options(**{k: v for k, v in vars(args).items() if k != "quiet"})
    try:
        result = build(opts)
    except GateError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except (ReleaseError, InputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    state = "already up to date" if result.up_to_date else "built"
    print(
        f"release {state}: {result.records} records, {result.duplicates} duplicate keys skipped, "
        f"{len(result.files)} files -> {result.dest}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
