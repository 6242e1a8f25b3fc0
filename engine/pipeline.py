"""The data engine run: list inputs, skip what is committed, stream through the stages, commit, summarise.

Two executors share the same stage objects: Ray Data (`map_batches` with one actor pool per stage, the
default) and a sequential in-process loop (`--no-ray`, for debugging and as a baseline).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import EngineConfig, Resources
from engine.dedupe import KeyRegistry
from engine.items import Item, batch_to_items
from engine.sink import Committed, ShardSink, atomic_write, clean_uncommitted, load_committed, merge_rejects
from engine.sources import SourceItem, list_inputs, listing_table
from engine.stats import RunStats, format_table
from schemas import SCHEMA_VERSION

log = logging.getLogger("rexverse.pipeline")


class OutputError(ValueError):
    """The output folder cannot be used as asked; the message says what to do."""


def stage_specs(cfg: EngineConfig) -> list[tuple[type, Any]]:
    """(stage class, its config) in pipeline order; imported lazily so listing never imports torch."""
    from stages.box_rules import BoxRules
    from stages.caption import Caption
    from stages.filter import Filter
    from stages.grounding import Grounding
    from stages.phrases import Phrases
    from stages.refine import Refine
    from stages.region_caption import RegionCaption

    s = cfg.stages
    specs: list[tuple[type, Any]] = [
        *_collect_spec(cfg),
        (Caption, s.caption),
        (Phrases, s.phrases),
        (Grounding, s.grounding),
        (BoxRules, s.box_rules),
        (RegionCaption, s.region_caption),
        (Refine, s.refine),
        (Filter, s.filter),
    ]
    if s.proposals.enabled:
        from stages.proposals import Proposals

        specs.append((Proposals, s.proposals))
    if s.segment.enabled:
        from stages.segment import Segment

        specs.append((Segment, s.segment))
    return specs


def _collect_spec(cfg: EngineConfig) -> list[tuple[type, Any]]:
    """The collection filters (stages/collect.py) when enabled: before captioning, so no model time is
    spent on images they reject."""
    if not cfg.stages.collect.enabled:
        return []
    from stages.collect import Collect

    return [(Collect, cfg.stages.collect)]


def prepare_output(out: Path, cfg: EngineConfig, overwrite: bool) -> None:
    """Create, reset (--overwrite) or check an output folder before a run."""
    is_ours = (out / "manifest.json").exists() or (out / "_commits").exists()
    if out.exists() and overwrite:
        if not is_ours and any(out.iterdir()):
            raise OutputError(f"refusing to --overwrite {out}: it is not empty and not a Rexverse output")
        shutil.rmtree(out)
    if out.exists() and not is_ours and any(out.iterdir()):
        raise OutputError(f"{out} is not empty and not a Rexverse output; choose another --output")
    manifest = out / "manifest.json"
    if manifest.exists() and any((out / "_commits").glob("*.json")):
        written = json.loads(manifest.read_text())
        if written.get("schema_version") != SCHEMA_VERSION:
            raise OutputError(
                f"{out} holds records of schema {written.get('schema_version')}, this Rexverse writes "
                f"{SCHEMA_VERSION}; an output keeps one version: pick a new --output (old shards still read)"
            )
        old = written.get("config_hash")
        if old and old != cfg.content_hash():
            raise OutputError(
                f"{out} was written with a different config (hash {old}, now {cfg.content_hash()}): models, "
                "prompts or thresholds changed. Rerun with the same config to resume, add --overwrite to "
                "start over, or choose a new --output"
            )
    out.mkdir(parents=True, exist_ok=True)


def code_version() -> str:
    """Package version plus git commit when run from a checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("rexverse")
    except PackageNotFoundError:
        text = "unknown"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{text}+{commit}" if commit else text


# --- executors -------------------------------------------------------------------------------------------


def run_sequential(
    cfg: EngineConfig, todo: list[SourceItem], registry: KeyRegistry, batch_size: int
) -> Iterator[Item]:
    """The same stages in one process, batch by batch (no Ray)."""
    from stages.decode import Decode

    decode = Decode(cfg.decode, claim=registry.claim)
    stages = [cls(stage_cfg) for cls, stage_cfg in stage_specs(cfg)]
    for start in range(0, len(todo), batch_size):
        table = listing_table(todo[start : start + batch_size])
        batch = decode({name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names})
        items = batch_to_items(batch)
        for stage in stages:
            stage.run(items)
        yield from items


def _compute(resources: Resources) -> Any:
    from ray.data import ActorPoolStrategy

    if isinstance(resources.concurrency, int):
        return ActorPoolStrategy(size=resources.concurrency)
    low, high = resources.concurrency
    return ActorPoolStrategy(min_size=low, max_size=high)


def _map(ds: Any, cls: type, kwargs: dict[str, Any], resources: Resources) -> Any:
    """One stage as an actor pool; restarts and retries so a crashed actor does not fail the run."""
    return ds.map_batches(
        cls,
        fn_constructor_kwargs=kwargs,
        batch_size=resources.batch_size,
        compute=_compute(resources),
        num_cpus=resources.num_cpus,
        num_gpus=resources.num_gpus,
        udf_modifying_row_count=False,
        max_restarts=resources.max_restarts,
        max_task_retries=resources.max_restarts,
    )


def run_ray(
    cfg: EngineConfig, todo: list[SourceItem], registry_owners: dict[str, str], run_id: str
) -> Iterator[Item]:
    """Stream items through one actor pool per stage; the driver consumes the results."""
    import ray

    from stages.decode import Decode

    namespace = ray.get_runtime_context().namespace
    registry_name = f"rexverse-keys-{run_id}"
    registry = ray.remote(KeyRegistry).options(name=registry_name, num_cpus=0).remote(registry_owners)
    try:
        rows = cfg.ray.read_block_rows
        tables = [listing_table(todo[i : i + rows]) for i in range(0, len(todo), rows)]
        ds = ray.data.from_arrow(tables)
        decode_kwargs = {"cfg": cfg.decode, "registry_name": registry_name, "namespace": namespace}
        ds = _map(ds, Decode, decode_kwargs, cfg.decode.resources)
        for cls, stage_cfg in stage_specs(cfg):
            ds = _map(ds, cls, {"cfg": stage_cfg}, stage_cfg.resources)
        for batch in ds.iter_batches(batch_size=64, batch_format="numpy", prefetch_batches=1):
            yield from batch_to_items(batch)
    finally:
        ray.kill(registry)


# --- the run ---------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    listed: int
    skipped: int
    records: int
    rejects: int
    wall_seconds: float
    manifest: dict[str, Any]


def run(
    cfg: EngineConfig,
    inputs: list[str],
    out: Path,
    limit: int | None = None,
    overwrite: bool = False,
    use_ray: bool = True,
    progress_every_s: float = 10.0,
) -> RunResult:
    started = time.time()
    out = Path(out)
    prepare_output(out, cfg, overwrite)
    removed = clean_uncommitted(out)
    if removed:
        log.info("removed %d files of an interrupted run", len(removed))
    committed = load_committed(out)
    listed = list_inputs(inputs, dataset=cfg.sink.dataset_name, limit=limit)
    todo = [item for item in listed if item.uri not in committed.uris]
    log.info(
        "%d inputs listed, %d already committed (%d records, %d rejects), %d to process",
        len(listed),
        len(listed) - len(todo),
        committed.records,
        committed.rejects,
        len(todo),
    )
    sink = ShardSink(out, cfg.sink.shard_size, cfg.sink.max_pending_rejects, committed)
    mode = "ray" if use_ray else "local"
    started_ray = False
    if todo:
        run_id = dt.datetime.now().strftime("%Y%m%d%H%M%S%f")
        if use_ray:
            from engine.runtime import init_ray

            started_ray = init_ray(cfg.ray, namespace="rexverse")
            stream = run_ray(cfg, todo, committed.key_owners, run_id)
        else:
            stream = run_sequential(
                cfg, todo, KeyRegistry(committed.key_owners), cfg.decode.resources.batch_size
            )
        try:
            _consume(stream, sink, len(todo), progress_every_s)
        finally:
            if started_ray:
                import ray

                ray.shutdown()
    sink.close()
    merge_rejects(out)
    wall = time.time() - started
    manifest = write_manifest(out, cfg, inputs, limit, len(listed), len(todo), sink, committed, wall, mode)
    print(format_table(sink.run_stats), flush=True)
    totals = manifest["counts"]
    print(
        f"run: {len(todo)} processed ({sink.records_written} records, {sink.rejects_written} rejects) in "
        f"{wall:.1f}s; output totals: {totals['records']} records, {totals['rejects']} rejects -> {out}",
        flush=True,
    )
    return RunResult(
        len(listed), len(listed) - len(todo), sink.records_written, sink.rejects_written, wall, manifest
    )


def _consume(stream: Iterator[Item], sink: ShardSink, total: int, every_s: float) -> None:
    seen, last = 0, time.time()
    start = last
    for item in stream:
        sink.add(item)
        seen += 1
        now = time.time()
        if now - last >= every_s or seen == total:
            rate = seen / max(now - start, 1e-9)
            log.info(
                "progress: %d/%d images (%.2f img/s), %d records, %d rejects so far",
                seen,
                total,
                rate,
                sink.records_written + len(sink.index_rows),
                sink.rejects_written + len(sink.reject_rows),
            )
            last = now


def write_manifest(
    out: Path,
    cfg: EngineConfig,
    inputs: list[str],
    limit: int | None,
    listed: int,
    todo: int,
    sink: ShardSink,
    before: Committed,
    wall: float,
    mode: str,
) -> dict[str, Any]:
    """manifest.json: config, code version, totals over all committed parts, and this run appended to runs.

    Totals are what was committed before this run plus what this run committed (no second folder scan).
    """
    path = out / "manifest.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    totals = RunStats()
    totals.merge(before.stats)
    totals.merge(sink.run_stats)
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    run_entry = {
        "finished": now,
        "mode": mode,
        "inputs": inputs,
        "limit": limit,
        "listed": listed,
        "processed": todo,
        "records": sink.records_written,
        "rejects": sink.rejects_written,
        "wall_seconds": round(wall, 2),
        "stages": sink.run_stats.to_dict(),
    }
    manifest = {
        "name": cfg.name,
        "schema_version": SCHEMA_VERSION,
        "code_version": code_version(),
        "created": previous.get("created", now),
        "updated": now,
        "config_hash": cfg.content_hash(),
        "config": cfg.model_dump(mode="json"),
        "counts": {
            "records": before.records + sink.records_written,
            "rejects": before.rejects + sink.rejects_written,
            "shards": len(list((out / "shards").glob("*.tar"))),
        },
        "stages": totals.to_dict(),
        **totals.tiers_dict(),  # regions per tier as written to the shards, and why regions lack a tier
        "runs": [*previous.get("runs", []), run_entry],
    }
    atomic_write(path, json.dumps(manifest, indent=2).encode())
    return manifest
