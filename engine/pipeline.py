"""Run any ordered list of stages: list inputs, skip what is committed, stream, write, account, summarise.

The engine imports no stage: a job file (`pipelines/rexverse2m.py`) names the stages and the Ray Data
chain. Two executors share the same stage objects: Ray Data (one actor pool per stage, shard parts written
by the workers through a Datasink; the default) and a sequential in-process loop (`--no-ray`, for
debugging and as a baseline). Either way the run checks at the end that every input it processed is
exactly one record or one reject, and fails loudly, naming the gap, if not.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import EngineConfig, Resources
from engine.dedupe import KeyRegistry
from engine.errors import StageFailing, find_cause
from engine.items import Item, batch_to_items
from engine.sink import Committed, PartWriter, clean_uncommitted, load_committed, make_datasink, merge_rejects
from engine.sources import SourceItem, list_inputs, listing_table
from engine.stage import RunContext, Stage, StageGroup
from engine.stats import RunStats, format_table
from engine.storage import Folder
from engine.version import code_version
from schemas import SCHEMA_VERSION

log = logging.getLogger("rexverse.pipeline")

# The Ray Data chain of a job: (listing dataset, config, run context) -> dataset of items to write.
Chain = Callable[[Any, EngineConfig, RunContext], Any]


class OutputError(ValueError):
    """The output folder cannot be used as asked; the message says what to do."""


class AccountingError(RuntimeError):
    """What came back from the workers does not match what was sent; the message names the gap."""


def active_stages(stages: Sequence[type[Stage]], cfg: EngineConfig) -> list[tuple[type[Stage], Any]]:
    """(stage class, its config) for every enabled stage, in the job's order."""
    pairs = [(stage, cfg.stage_config(stage.name)) for stage in stages]
    return [(stage, stage_cfg) for stage, stage_cfg in pairs if stage.enabled(stage_cfg)]


def prepare_output(out: Folder, cfg: EngineConfig, overwrite: bool) -> None:
    """Create, reset (--overwrite) or check an output folder before a run."""
    is_ours = out.exists("manifest.json") or out.exists("_commits")
    if overwrite and out.exists() and not out.is_empty():
        if not is_ours:
            raise OutputError(f"refusing to --overwrite {out.uri}: it is not empty and not a Rexverse output")
        out.delete_all()
        is_ours = False
    if not is_ours and not out.is_empty():
        raise OutputError(f"{out.uri} is not empty and not a Rexverse output; choose another --output")
    if out.exists("manifest.json") and out.list("_commits"):
        written = json.loads(out.read_bytes("manifest.json"))
        if written.get("schema_version") != SCHEMA_VERSION:
            raise OutputError(
                f"{out.uri} holds records of schema {written.get('schema_version')}, this Rexverse writes "
                f"{SCHEMA_VERSION}; an output keeps one version: pick a new --output (old shards still read)"
            )
        old = written.get("config_hash")
        if old and old != cfg.content_hash():
            raise OutputError(
                f"{out.uri} was written with a different config (hash {old}, now {cfg.content_hash()}): "
                "models, prompts or thresholds changed. Rerun with the same config to resume, add "
                "--overwrite to start over, or choose a new --output"
            )
    out.mkdirs()


# --- executors -------------------------------------------------------------------------------------------


def run_sequential(
    cfg: EngineConfig,
    stages: Sequence[type[Stage]],
    todo: list[SourceItem],
    committed: Committed,
    writer: PartWriter,
) -> list[dict[str, Any]]:
    """The same stages in one process, batch by batch (no Ray); the first stage reads the listing."""
    context = RunContext(registry=KeyRegistry(committed.key_owners))
    active = active_stages(stages, cfg)
    objects = [stage(**stage.constructor_kwargs(stage_cfg, context)) for stage, stage_cfg in active]
    batch_size = active[0][1].resources.batch_size
    for start in range(0, len(todo), batch_size):
        table = listing_table(todo[start : start + batch_size])
        columns = {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}
        items = batch_to_items(objects[0](columns))
        for stage in objects[1:]:
            stage.run(items)
        for item in items:
            writer.add(item)
    return writer.close()


def _compute(resources: Resources) -> Any:
    from ray.data import ActorPoolStrategy

    if isinstance(resources.concurrency, int):
        return ActorPoolStrategy(size=resources.concurrency)
    low, high = resources.concurrency
    return ActorPoolStrategy(min_size=low, max_size=high)


def stage_groups(stages: Sequence[type[Stage]], cfg: EngineConfig) -> list[list[tuple[type[Stage], Any]]]:
    """The enabled stages in job order, grouped by `ray.fuse` (a stage not named there is its own group)."""
    group_of = {name: i for i, group in enumerate(cfg.ray.fuse) for name in group}
    groups: list[list[tuple[type[Stage], Any]]] = []
    last = None
    for stage, stage_cfg in active_stages(stages, cfg):
        key = group_of.get(stage.name, f"alone:{stage.name}")
        if groups and key == last:
            groups[-1].append((stage, stage_cfg))
        else:
            groups.append([(stage, stage_cfg)])
        last = key
    return groups


def group_resources(group: list[tuple[type[Stage], Any]]) -> Resources:
    """The first member's batch size and concurrency, the largest CPU/GPU/thread needs of all members."""
    first: Resources = group[0][1].resources
    members = [stage_cfg.resources for _, stage_cfg in group]
    return first.model_copy(
        update={
            "num_cpus": max(r.num_cpus for r in members),
            "num_gpus": max(r.num_gpus for r in members),
            "torch_threads": max(r.torch_threads for r in members),
        }
    )


def map_stage(ds: Any, group: list[tuple[type[Stage], Any]], context: RunContext) -> Any:
    """One stage (or fused group) as an actor pool; restarts and retries, so a crashed actor or a lost
    node costs a retry, never a record."""
    resources = group_resources(group)
    if len(group) == 1:
        stage, stage_cfg = group[0]
        fn, kwargs = stage, stage.constructor_kwargs(stage_cfg, context)
    else:
        members = [(stage, stage.constructor_kwargs(stage_cfg, context)) for stage, stage_cfg in group]
        fn, kwargs = StageGroup, {"members": members, "torch_threads": resources.torch_threads}
    return ds.map_batches(
        fn,
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
    cfg: EngineConfig,
    chain: Chain,
    todo: list[SourceItem],
    committed: Committed,
    out: Folder,
    run_id: str,
) -> list[dict[str, Any]]:
    """Stream the listing through the job's chain; workers write and commit the parts.

    The driver holds the listing and receives per-part results (counts, stats, uris), never images.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    namespace = ray.get_runtime_context().namespace
    registry_name = f"rexverse-keys-{run_id}"
    # The registry lives next to the driver: a lost worker node must not take the run's key table with it.
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    registry = (
        ray.remote(KeyRegistry)
        .options(name=registry_name, num_cpus=0, scheduling_strategy=here)
        .remote(committed.key_owners)
    )
    try:
        rows = cfg.ray.read_block_rows
        tables = [listing_table(todo[i : i + rows]) for i in range(0, len(todo), rows)]
        context = RunContext(registry_name=registry_name, namespace=namespace)
        ds = chain(ray.data.from_arrow(tables), cfg, context)
        sink = make_datasink(out, run_id, cfg.sink.shard_size, cfg.sink.max_pending_rejects)
        ds.write_datasink(
            sink, ray_remote_args={"num_cpus": cfg.sink.num_cpus, "max_retries": cfg.sink.max_retries}
        )
        return sink.results
    finally:
        ray.kill(registry)


def stage_failing(exc: BaseException) -> StageFailing | None:
    """The `StageFailing` behind `exc`, also when Ray wrapped it (a task error around the actor's one)."""
    found = find_cause(exc, StageFailing)
    if found is None:
        return None
    cause = getattr(found, "cause", None)  # Ray's RayTaskError subclass carries the original as `cause`
    original = cause if isinstance(cause, StageFailing) else found
    return StageFailing(original.stage, original.errors, original.summary, original.first_error)


# --- accounting ------------------------------------------------------------------------------------------


def check_accounting(todo: list[SourceItem], results: list[dict[str, Any]], tolerate_lost: bool) -> list[str]:
    """Every processed uri must come back exactly once as a record or a reject.

    Returns the uris that never came back when `tolerate_lost` (Ray's `max_errored_blocks` > 0 let
    blocks fail): the caller writes a reject row for each. Raises AccountingError otherwise.
    """
    returned = Counter(uri for result in results for uri in result["uris"])
    sent = {item.uri for item in todo}
    twice = sorted(uri for uri, n in returned.items() if n > 1)
    unknown = sorted(set(returned) - sent)
    lost = sorted(sent - set(returned))
    counted = sum(result["records"] + result["rejects"] for result in results)
    problems = []
    if twice:
        problems.append(f"{len(twice)} inputs written twice (first: {twice[0]})")
    if unknown:
        problems.append(f"{len(unknown)} uris written that were not sent (first: {unknown[0]})")
    if counted != sum(returned.values()):
        problems.append(f"parts count {counted} rows but name {sum(returned.values())} uris")
    if lost and not tolerate_lost:
        problems.append(f"{len(lost)} inputs never came back (first: {lost[0]})")
    if problems:
        raise AccountingError(
            f"processed {len(sent)} inputs but records + rejects do not add up: {'; '.join(problems)}. "
            "Committed parts are kept; rerun the same command to process what is missing."
        )
    return lost


def write_lost(out: Folder, run_id: str, lost: list[str], shard_size: int) -> list[dict[str, Any]]:
    """A reject row for every input whose block failed for good (allowed by max_errored_blocks)."""
    writer = PartWriter(out, f"{run_id}-lost", 0, shard_size)
    for uri in lost:
        item = Item(key="", uri=uri, image=b"", record=None, trace={"engine": {"seconds": 0.0}})
        item.reject("engine", "lost: its block failed after all retries (ray.max_errored_blocks > 0)")
        writer.add(item)
    return writer.close()


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
    stages: Sequence[type[Stage]],
    chain: Chain,
    inputs: list[str],
    output: str | Path,
    limit: int | None = None,
    overwrite: bool = False,
    use_ray: bool = True,
) -> RunResult:
    """Process `inputs` into `output` (a local folder or an object-store URI) with the job's stages."""
    started = time.time()
    out = Folder(output)
    prepare_output(out, cfg, overwrite)
    removed = clean_uncommitted(out)
    if removed:
        log.info("removed %d files of an interrupted run", len(removed))
    committed = load_committed(out)
    listed = list_inputs(inputs, dataset=cfg.sink.dataset_name, limit=limit)
    todo = [item for item in listed if item.uri not in committed.uris]
    retried = sum(1 for item in todo if item.uri in committed.retry)
    log.info(
        "%d inputs listed, %d already committed (%d records, %d rejects), %d to process",
        len(listed),
        len(listed) - len(todo),
        committed.records,
        committed.rejects - retried,
        len(todo),
    )
    if retried:
        log.info("%d of them had a stage error in an earlier run: processing them again", retried)
    run_id = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
    results: list[dict[str, Any]] = []
    mode = "ray" if use_ray else "local"
    try:
        if todo and use_ray:
            from engine.runtime import init_ray

            started_ray = init_ray(cfg.ray, namespace="rexverse")
            try:
                results = run_ray(cfg, chain, todo, committed, out, run_id)
            finally:
                if started_ray:
                    import ray

                    ray.shutdown()
        elif todo:
            # keys of images being retried are theirs again, not duplicates of an earlier record
            known = {key for key, uri in committed.key_owners.items() if uri not in committed.retry}
            writer = PartWriter(out, run_id, 0, cfg.sink.shard_size, cfg.sink.max_pending_rejects, known)
            results = run_sequential(cfg, stages, todo, committed, writer)
    except Exception as exc:
        failing = stage_failing(exc)
        if failing is None:
            raise
        raise failing from None  # one clear message instead of Ray's nested task tracebacks
    lost = check_accounting(todo, results, tolerate_lost=use_ray and cfg.ray.max_errored_blocks > 0)
    if lost:
        log.warning("%d inputs were lost with failed blocks; writing a reject row for each", len(lost))
        results += write_lost(out, run_id, lost, cfg.sink.max_pending_rejects)
    merge_rejects(out)
    committed.rejects -= retried  # each retried image's new outcome supersedes its stage-error row
    wall = time.time() - started
    order = [stage.name for stage in stages]
    this_run = RunStats()
    for result in results:
        this_run.merge(RunStats.from_dict(result["stats"]))
        this_run.merge_tiers(result.get("tiers"))
    manifest = write_manifest(out, cfg, inputs, limit, len(listed), results, this_run, committed, wall, mode)
    print(format_table(this_run, order), flush=True)
    totals = manifest["counts"]
    records = sum(r["records"] for r in results)
    rejects = sum(r["rejects"] for r in results)
    print(
        f"run: {len(todo)} processed ({records} records, {rejects} rejects) in {wall:.1f}s; "
        f"output totals: {totals['records']} records, {totals['rejects']} rejects -> {out.uri}",
        flush=True,
    )
    return RunResult(len(listed), len(listed) - len(todo), records, rejects, wall, manifest)


def write_manifest(
    out: Folder,
    cfg: EngineConfig,
    inputs: list[str],
    limit: int | None,
    listed: int,
    results: list[dict[str, Any]],
    this_run: RunStats,
    before: Committed,
    wall: float,
    mode: str,
) -> dict[str, Any]:
    """manifest.json: config, code version, totals over all committed parts, and this run appended to runs.

    Totals are what was committed before this run plus what this run committed (no second folder scan).
    """
    previous = json.loads(out.read_bytes("manifest.json")) if out.exists("manifest.json") else {}
    order = list(cfg.stages.model_fields)
    totals = RunStats()
    totals.merge(before.stats)
    totals.merge(this_run)
    records = sum(r["records"] for r in results)
    rejects = sum(r["rejects"] for r in results)
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    run_entry = {
        "finished": now,
        "mode": mode,
        "inputs": inputs,
        "limit": limit,
        "listed": listed,
        "processed": sum(len(r["uris"]) for r in results),
        "records": records,
        "rejects": rejects,
        "parts": len(results),
        "wall_seconds": round(wall, 2),
        "stages": this_run.to_dict(order),
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
            "records": before.records + records,
            "rejects": before.rejects + rejects,
            "shards": len(out.list("shards")),
        },
        "stage_order": order,
        "stages": totals.to_dict(order),
        **totals.tiers_dict(),  # regions per tier as written to the shards, and why regions lack a tier
        "runs": [*previous.get("runs", []), run_entry],
    }
    out.write_bytes("manifest.json", json.dumps(manifest, indent=2).encode())
    return manifest


__all__ = [
    "AccountingError",
    "Chain",
    "OutputError",
    "RunResult",
    "active_stages",
    "map_stage",
    "stage_groups",
    "run",
]
