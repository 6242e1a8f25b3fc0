"""Rexverse-2M data engine: images -> captions, phrases, grounded regions at four granularities -> shards.

Local (embedded Ray):  python pipelines/rexverse2m.py --config configs/fixture.yaml \\
                           --input tests/fixtures/fixture100 --output out/fixture
Cluster:               ray job submit --working-dir . -- python pipelines/rexverse2m.py --config ... \\
                           --input s3://bucket/images --output s3://bucket/rexverse2m
Preflight first:        python pipelines/rexverse2m.py --config ... --input ... --preflight 4
A rerun into the same --output resumes: committed members of each source are skipped, no key is written twice.

This file is the job: the ordered stages (each module owns its config class, so `stages.<name>.<field>`
in YAML and --set), the Ray Data chain, and the run (workers write committed shard parts).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (also under `ray job submit`): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import ConfigError, EngineConfig, job_config, load_config  # noqa: E402
from engine.errors import RetryableError, StageFailing  # noqa: E402
from engine.pipeline import AccountingError, OutputError, map_stage, run, stage_groups  # noqa: E402
from engine.sink import OldOutputError  # noqa: E402
from engine.sources import InputError  # noqa: E402
from engine.stage import RunContext, Stage  # noqa: E402
from stages.box_rules import BoxRules  # noqa: E402
from stages.caption import Caption  # noqa: E402
from stages.collect import Collect  # noqa: E402
from stages.decode import Decode  # noqa: E402
from stages.filter import Filter  # noqa: E402
from stages.grounding import Grounding  # noqa: E402
from stages.phrases import Phrases  # noqa: E402
from stages.proposals import Proposals  # noqa: E402
from stages.refine import Refine  # noqa: E402
from stages.region_caption import RegionCaption  # noqa: E402
from stages.segment import Segment  # noqa: E402

# The paper's engine, in order (§4.1): read and validate, the collection filters (NSFW, low content,
# near-constant images; optional), caption, noun phrases, open-vocabulary grounding,
# cheap box rules (before any model time is spent on junk boxes), phrase-conditioned region captions,
# LLM verification and rewriting, the image-text filter, then class-agnostic proposals and SAM 2 masks
# (both optional: `enabled` in their config).
STAGES: list[type[Stage]] = [
    Decode,
    Collect,
    Caption,
    Phrases,
    Grounding,
    BoxRules,
    RegionCaption,
    Refine,
    Filter,
    Proposals,
    Segment,
]
JobConfig = job_config(STAGES)


def load_job_config(path: str | Path, overrides: list[str] | None = None) -> EngineConfig:
    """This job's config from YAML (+ `--set` overrides), validated against its stage list."""
    return load_config(path, JobConfig, overrides)


def run_job(cfg: EngineConfig, inputs: list[str], output: str | Path, **options: Any) -> Any:
    """Run this job's stages (options as `engine.pipeline.run`: limit, overwrite, use_ray)."""
    return run(cfg, STAGES, chain, inputs, output, **options)


def chain(listing: Any, cfg: EngineConfig, context: RunContext) -> Any:
    """The Ray Data chain: the listing through one actor pool per enabled stage (or per group of stages
    that `ray.fuse` runs in one actor), in the order above. The engine then writes from the workers."""
    ds = listing
    for group in stage_groups(STAGES, cfg):
        ds = map_stage(ds, group, context)
    return ds


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
    parser.add_argument("--output", help="output folder or object-store URI (s3://...); resumed if it exists")
    parser.add_argument(
        "--preflight",
        nargs="?",
        type=int,
        const=4,
        default=None,
        metavar="N",
        help="load every enabled stage and run the first N images (default 4) in this process: per-stage "
        "load time, memory, s/image, rejects, score distributions against their thresholds and one record; "
        "writes nothing (no --output needed); exit != 0 on any stage error. Run it before a big run.",
    )
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
    if args.preflight is not None and args.preflight < 1:
        parser.error("--preflight N must be >= 1")
    if args.preflight is None and not args.output:
        parser.error("--output is required (except with --preflight)")
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
        cfg = load_job_config(args.config, args.overrides)
        if args.quiet:
            cfg.ray.show_progress = False
        if args.preflight is not None:
            from engine.preflight import run_preflight

            return run_preflight(cfg, STAGES, args.input, args.preflight)
        run_job(
            cfg, args.input, args.output, limit=args.limit, overwrite=args.overwrite, use_ray=not args.no_ray
        )
    except (ConfigError, InputError, OutputError, OldOutputError, AccountingError) as exc:
        print(f"rexverse2m: error: {exc}", file=sys.stderr)
        return 2
    except StageFailing as exc:
        print(
            f"rexverse2m: stopped: {exc}. Committed parts are kept; fix the cause (try --preflight) and "
            "rerun the same command: images rejected with a stage error are processed again.",
            file=sys.stderr,
        )
        return 3
    except RetryableError as exc:  # e.g. an object store that kept failing (Ray's retries are spent too)
        message = f"rexverse2m: stopped: {exc}. Committed parts are kept; rerun the same command."
        print(message, file=sys.stderr)
        return 75  # EX_TEMPFAIL: try again later
    except KeyboardInterrupt:
        print(
            "rexverse2m: interrupted; committed parts are kept. Rerun the same command to resume.",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
