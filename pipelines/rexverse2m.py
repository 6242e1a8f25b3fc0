"""Rexverse-2M data engine: images -> captions, phrases, grounded regions at four granularities -> shards.

Local (embedded Ray):  python pipelines/rexverse2m.py --config configs/fixture.yaml \\
                           --input tests/fixtures/fixture100 --output out/fixture
Cluster:               ray job submit --working-dir . -- python pipelines/rexverse2m.py --config ... \\
                           --input /shared/images --output /shared/out
A rerun into the same --output resumes: committed images are skipped, no key is written twice.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (also under `ray job submit`): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import ConfigError, load_config  # noqa: E402
from engine.pipeline import OutputError, run  # noqa: E402
from engine.sources import InputError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="rexverse2m", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", required=True, help="YAML config (configs/fixture.yaml, configs/rexverse2m.yaml)"
    )
    parser.add_argument(
        "--input",
        required=True,
        action="append",
        help="folder of images, .tar file(s) or a glob of them, .parquet/.jsonl with a 'uri' column, "
        "or a COCO .json; repeat to combine",
    )
    parser.add_argument("--output", required=True, type=Path, help="output folder (resumed if it exists)")
    parser.add_argument("--limit", type=int, default=None, help="process at most the first N listed images")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set stages.grounding.box_threshold=0.3 (repeatable)",
    )
    parser.add_argument("--overwrite", action="store_true", help="delete the output folder first")
    parser.add_argument("--no-ray", action="store_true", help="run the stages sequentially in this process")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cfg = load_config(args.config, args.overrides)
        if args.quiet:
            cfg.ray.show_progress = False
        run(cfg, args.input, args.output, limit=args.limit, overwrite=args.overwrite, use_ray=not args.no_ray)
    except (ConfigError, InputError, OutputError) as exc:
        print(f"rexverse2m: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "rexverse2m: interrupted; committed parts are kept. Rerun the same command to resume.",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
