"""Run any ordered list of stages: list inputs, skip what is committed, stream, write, account, summarise.

The engine imports no stage: a job file (`pipelines/rexverse2m.py`) names the stages and the Ray Data
chain. Two executors share the same stage objects: Ray Data (one actor pool per stage, shard parts written
by the workers through a Datasink; the default) and a sequential in-process loop (`--no-ray`, for
debugging and as a baseline). Either way the run checks at the end that every input it processed is
exactly one record or one reject, and fails loudly, naming the gap, if not.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import ledger
from engine.config import EngineConfig, Resources
from engine.dedupe import KeyRegistry, PartitionedRegistry
from engine.errors import StageFailing, find_cause
from engine.items import Item, batch_to_items
from engine.sink import (
    Committed,
    OldOutputError,
    PartWriter,
    add_marker,
    clean_uncommitted,
    load_committed,
    make_datasink,
    merge_rejects,
)
from engine.source_worker import SourceWorker
from engine.sources import InputError
from engine.stage import RunContext, Stage, StageGroup
from engine.stats import RunStats, format_table
from engine.storage import Folder
from engine.units import (
    SourceUnit,
    count_members,
    list_units,
    read_units_batches,
    recorded_members,
    rows_table,
    unit_rows,
    units_table,
)
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
    """(stage class, its config) for every enabled stage, in the job's order (only those `run_stages`
    names, when it is set)."""
    chosen = [stage for stage in stages if cfg.run_stages is None or stage.name in cfg.run_stages]
    pairs = [(stage, cfg.stage_config(stage.name)) for stage in chosen]
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


# --- planning: which sources still need work -------------------------------------------------------------


@dataclass
class Plan:
    """The units this run reads, and per source how many members it must account for (None: as many as
    the source holds, which its reader records)."""

    units: list[SourceUnit]
    limits: dict[str, int]
    complete: int  # sources skipped whole: every member committed for good
    skipped: int  # members skipped: committed for good before this run


def plan_units(
    cfg: EngineConfig, inputs: list[str], limit: int | None, committed: Committed, members: dict[str, int]
) -> Plan:
    """List the sources and give each the ordinals it may skip (committed records and content rejects;
    stage-error rejects are read again). With --limit the first sources are counted until N members."""
    units, limits, complete, skipped = [], {}, 0, 0
    remaining = limit
    for unit in list_units(inputs, dataset=cfg.sink.dataset_name, page_files=cfg.sources.page_files):
        if remaining is not None and remaining <= 0:
            break
        books = committed.ledger.books(unit.source)
        total = members.get(unit.source)
        if remaining is not None:
            held = total if total is not None else count_members(unit)
            unit.max_members = min(remaining, held)
            limits[unit.source] = unit.max_members
            remaining -= unit.max_members
            total = unit.max_members
        final = books.final if total is None else ledger.clip(books.final, total)
        skipped += ledger.size(final)
        if total is not None and not ledger.missing(final, total):
            complete += 1
            continue
        unit.skip = json.dumps([list(r) for r in final])
        units.append(unit)
    return Plan(units, limits, complete, skipped)


# --- executors -------------------------------------------------------------------------------------------


def run_sequential(
    cfg: EngineConfig,
    stages: Sequence[type[Stage]],
    units: list[SourceUnit],
    committed: Committed,
    out: Folder,
    writer: PartWriter,
) -> list[dict[str, Any]]:
    """The same stages in one process, batch by batch (no Ray); the first stage reads the member rows."""
    registry = PartitionedRegistry(cfg.ray.dedupe_partitions)
    registry.load(out, committed.parts)
    context = RunContext(registry=registry)
    active = active_stages(stages, cfg)
    objects = [stage(**stage.constructor_kwargs(stage_cfg, context)) for stage, stage_cfg in active]
    batch_size = active[0][1].resources.batch_size

    def flush(rows: list[dict[str, Any]]) -> None:
        table = rows_table(rows)
        columns = {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}
        items = batch_to_items(objects[0](columns))
        for stage in objects[1:]:
            stage.run(items)
        for item in items:
            writer.add(item)

    for unit in units:
        rows: list[dict[str, Any]] = []
        for row in unit_rows(unit, cfg.sources.max_member_bytes, out):
            rows.append(row)
            if len(rows) >= batch_size:
                flush(rows)
                rows = []
        if rows:
            flush(rows)
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
    """One stage (or fused group) as an actor pool.

    Restarts and retries are Ray Data's own defaults for actor pools (actors restarted and their tasks
    retried without a count limit, `max_restarts=-1`, `max_task_retries=-1`): a crashed actor or a lost node
    costs a retry, never a record, for as long as the cluster can place the actor. (Passing them as extra
    `map_batches` keywords is deprecated since Ray 2.5x, and small counts ended runs on a lost node.)
    """
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
    )


def start_key_table(
    out: Folder, parts: list[str], run_id: str, partitions: int
) -> tuple[list[str], list[Any]]:
    """The run's key table: `partitions` named actors next to the driver (a lost worker node must not take
    any of it along), each loading the owners of its keys from the committed parts."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    names = [f"rexverse-keys-{run_id}-{i}" for i in range(partitions)]
    actors = [
        ray.remote(KeyRegistry).options(name=name, num_cpus=0, scheduling_strategy=here).remote()
        for name in names
    ]
    loaded = ray.get([actor.load.remote(out, parts, i, partitions) for i, actor in enumerate(actors)])
    log.info("key table: %d keys committed before, in %d partitions", sum(loaded), partitions)
    return names, actors


def run_ray(
    cfg: EngineConfig,
    stages: Sequence[type[Stage]],
    chain: Chain,
    units: list[SourceUnit],
    committed: Committed,
    out: Folder,
    run_id: str,
) -> list[dict[str, Any]]:
    """Stream the sources through the job's chain; workers read the sources, write and commit the parts.

    The driver holds one row per source and receives per-part markers (counts, stats, per-source ranges).
    """
    import ray

    namespace = ray.get_runtime_context().namespace
    names, actors = start_key_table(out, committed.parts, run_id, cfg.ray.dedupe_partitions)
    try:
        context = RunContext(registry_names=names, namespace=namespace)
        # A block per source. from_blocks (Ray's developer API) takes each block's metadata here; from_arrow
        # runs a remote task per block for it, which on a fresh local Ray waits ~1 s for a worker process.
        listing = ray.data.from_blocks([units_table([unit]) for unit in units])
        groups = stage_groups(stages, cfg)
        if cfg.ray.one_process_per_source and len(groups) == 1:
            run_in_source_workers(listing, groups[0], cfg, context, out, run_id)
            return []  # the markers are read back from the output (run_ray_attempts)
        rows = listing.map_batches(
            read_units_batches,
            fn_kwargs={
                "max_bytes": cfg.sources.max_member_bytes,
                "block_rows": cfg.ray.read_block_rows,
                "out": out,
            },
            batch_size=1,
            batch_format="numpy",
            num_cpus=cfg.sources.num_cpus,
        )
        ds = chain(rows, cfg, context)
        sink = make_datasink(out, run_id, cfg.sink.shard_size, cfg.sink.max_pending_rejects, cfg.sink.records)
        # Ray 2.60's write_datasink has no named resource parameters (only `ray_remote_args`, which it does
        # not deprecate, unlike map_batches' extra keywords): without them a write task asks for a whole CPU.
        ds.write_datasink(
            sink, ray_remote_args={"num_cpus": cfg.sink.num_cpus, "max_retries": cfg.sink.max_retries}
        )
        return sink.results
    finally:
        for actor in actors:
            ray.kill(actor)


def run_in_source_workers(
    listing: Any,
    group: list[tuple[type[Stage], Any]],
    cfg: EngineConfig,
    context: RunContext,
    out: Folder,
    run_id: str,
) -> None:
    """The whole chain in one actor pool whose actors read, process and write whole sources."""
    resources = group_resources(group)
    members = [(stage, stage.constructor_kwargs(stage_cfg, context)) for stage, stage_cfg in group]
    workers = listing.map_batches(
        SourceWorker,
        fn_constructor_kwargs={
            "members": members,
            "torch_threads": resources.torch_threads,
            "out": out,
            "run_id": run_id,
            "batch_size": resources.batch_size,
            "max_bytes": cfg.sources.max_member_bytes,
            "shard_size": cfg.sink.shard_size,
            "max_pending_rejects": cfg.sink.max_pending_rejects,
            "records": cfg.sink.records,
        },
        batch_size=1,
        batch_format="numpy",
        compute=_compute(resources),
        num_cpus=resources.num_cpus,
        num_gpus=resources.num_gpus,
    )
    for _ in workers.iter_batches(batch_size=None):
        pass  # each source's markers; the driver reads them back from the output once all are done


def stage_failing(exc: BaseException) -> StageFailing | None:
    """The `StageFailing` behind `exc`, also when Ray wrapped it (a task error around the actor's one)."""
    found = find_cause(exc, StageFailing)
    if found is None:
        return None
    cause = getattr(found, "cause", None)  # Ray's RayTaskError subclass carries the original as `cause`
    original = cause if isinstance(cause, StageFailing) else found
    return StageFailing(original.stage, original.errors, original.summary, original.first_error)


# --- accounting ------------------------------------------------------------------------------------------


def check_accounting(
    ledger_now: ledger.Ledger, expected: dict[str, int | None], tolerate_lost: bool
) -> dict[str, ledger.Ranges]:
    """Per source: members seen = records + rejects (+ duplicates), each member exactly once.

    `expected` is per source the members this run had to account for (None: its reader never reached its
    end). Returns the gaps per source when `tolerate_lost` (Ray's `max_errored_blocks` > 0 let blocks fail):
    the caller writes a reject row for each. Raises AccountingError naming the sources otherwise.
    """
    unread = sorted(source for source, total in expected.items() if total is None)
    known = {source: total for source, total in expected.items() if total is not None}
    gaps = {s: g for s in known if (g := ledger.missing(ledger_now.books(s).covered(), known[s]))}
    problems = [p for p in ledger_now.problems(known) if not (tolerate_lost and "never came back" in p)]
    if unread:
        problems.append(f"{len(unread)} sources were never read to their end (first: {unread[0]})")
    if problems:
        raise AccountingError(
            f"{len(expected)} sources processed but records + rejects do not add up: {'; '.join(problems)}. "
            "Committed parts are kept; rerun the same command to process what is missing."
        )
    return gaps if tolerate_lost else {}


def write_lost(
    out: Folder, run_id: str, gaps: dict[str, ledger.Ranges], shard_size: int
) -> list[dict[str, Any]]:
    """A reject row for every member whose block failed for good (allowed by max_errored_blocks)."""
    writer = PartWriter(out, f"{run_id}-lost", 0, shard_size)
    for source, ranges in sorted(gaps.items()):
        for start, end in ranges:
            for ordinal in range(start, end):
                item = Item(
                    key="", uri=f"{source}@{ordinal}", image=b"", record=None, source=source, ordinal=ordinal
                )
                item.trace = {"engine": {"seconds": 0.0}}
                item.reject("engine", "lost: its block failed after all retries (ray.max_errored_blocks > 0)")
                writer.add(item)
    return writer.close()


def _retryable(exc: BaseException) -> bool:
    """A failure of the cluster (lost node, actors out of retries, a store outage), not of the inputs or
    the code's own checks: worth another pass over the remaining sources."""
    from engine.errors import RetryableError

    if stage_failing(exc) is not None:
        return False  # a broken stage stays broken on another pass
    if isinstance(exc, RetryableError):
        return True
    try:
        from ray.exceptions import RayError, RayTaskError
    except ImportError:
        return False
    if isinstance(exc, RayTaskError):
        cause = exc.as_instanceof_cause()
        return not isinstance(cause, (InputError, OldOutputError, ValueError, TypeError, KeyError))
    return isinstance(exc, RayError)


# --- the run ---------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    listed: int  # members of the sources this run looked at (skipped + processed)
    skipped: int  # of them, committed for good before (records and content rejects)
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
    before = copy.deepcopy(committed)
    plan = plan_units(cfg, inputs, limit, committed, recorded_members(out))
    log.info(
        "%d sources to read, %d already committed whole (%d records, %d rejects committed before)",
        len(plan.units),
        plan.complete,
        committed.records,
        committed.effective_rejects,
    )
    expected_sources = [unit.source for unit in plan.units]
    run_id = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
    results: list[dict[str, Any]] = []
    mode = "ray" if use_ray else "local"
    try:
        if plan.units and use_ray:
            from engine.runtime import init_ray

            started_ray = init_ray(cfg.ray, namespace="rexverse")
            try:
                results = run_ray_attempts(cfg, stages, chain, plan, inputs, limit, committed, out, run_id)
            finally:
                if started_ray:
                    import ray

                    ray.shutdown()
        elif plan.units:
            writer = PartWriter(
                out, run_id, 0, cfg.sink.shard_size, cfg.sink.max_pending_rejects, records=cfg.sink.records
            )
            results = run_sequential(cfg, stages, plan.units, committed, out, writer)
            for result in sorted(results, key=lambda r: r["part"]):
                add_marker(committed, result)
    except Exception as exc:
        failing = stage_failing(exc)
        if failing is None:
            raise
        raise failing from None  # one clear message instead of Ray's nested task tracebacks
    members = recorded_members(out)
    expected = {s: plan.limits.get(s, members.get(s)) for s in expected_sources}
    gaps = check_accounting(
        committed.ledger, expected, tolerate_lost=use_ray and cfg.ray.max_errored_blocks > 0
    )
    if gaps:
        log.warning(
            "members of %d sources were lost with failed blocks; writing a reject row for each", len(gaps)
        )
        lost = write_lost(out, run_id, gaps, cfg.sink.max_pending_rejects)
        for result in lost:
            add_marker(committed, result)
        results += lost
    merged = merge_rejects(out, cfg.sink.merge_rejects_max)
    if merged is None:
        log.info(
            "more than %d rejects: read them from rejects/ (no merged rejects.parquet)",
            cfg.sink.merge_rejects_max,
        )
    wall = time.time() - started
    order = [stage.name for stage in stages]
    this_run = RunStats()
    for result in results:
        this_run.merge(RunStats.from_dict(result["stats"]))
        this_run.merge_tiers(result.get("tiers"))
    manifest = write_manifest(out, cfg, inputs, limit, plan, results, this_run, before, committed, wall, mode)
    print(format_table(this_run, order), flush=True)
    totals = manifest["counts"]
    records = sum(r["records"] for r in results)
    rejects = sum(r["rejects"] for r in results)
    processed = records + rejects
    print(
        f"run: {processed} processed ({records} records, {rejects} rejects) from {len(plan.units)} sources "
        f"in {wall:.1f}s; output totals: {totals['records']} records, {totals['rejects']} rejects "
        f"-> {out.uri}",
        flush=True,
    )
    return RunResult(plan.skipped + processed, plan.skipped, records, rejects, wall, manifest)


def run_ray_attempts(
    cfg: EngineConfig,
    stages: Sequence[type[Stage]],
    chain: Chain,
    plan: Plan,
    inputs: list[str],
    limit: int | None,
    committed: Committed,
    out: Folder,
    run_id: str,
) -> list[dict[str, Any]]:
    """`run_ray`, and when the cluster fails it (past Ray's own retries), more passes over the sources not
    yet committed, each planned from the committed parts like a rerun (at most `ray.run_attempts` in all).

    `committed` is updated with every part this run committed (in commit order).
    """
    known = list(committed.parts)
    units = plan.units
    for attempt in range(1, cfg.ray.run_attempts + 1):
        try:
            run_ray(
                cfg, stages, chain, units, committed, out, run_id if attempt == 1 else f"{run_id}r{attempt}"
            )
            break
        except Exception as exc:
            if attempt == cfg.ray.run_attempts or not _retryable(exc):
                raise
            log.warning(
                "pass %d over the sources failed (%s: %s); resuming the remaining sources",
                attempt,
                type(exc).__name__,
                str(exc)[:300],
            )
            units = plan_units(cfg, inputs, limit, load_committed(out), recorded_members(out)).units
            if not units:
                break
    new = _markers_after(out, known)
    for marker in new:
        add_marker(committed, marker)
    return new


def _markers_after(out: Folder, known: list[str]) -> list[dict[str, Any]]:
    seen = set(known)
    found = []
    for name in sorted(out.list("_commits")):
        if name.endswith(".json") and name.removesuffix(".json") not in seen:
            found.append(json.loads(out.read_bytes(f"_commits/{name}")))
    return found


def write_manifest(
    out: Folder,
    cfg: EngineConfig,
    inputs: list[str],
    limit: int | None,
    plan: Plan,
    results: list[dict[str, Any]],
    this_run: RunStats,
    before: Committed,
    after: Committed,
    wall: float,
    mode: str,
) -> dict[str, Any]:
    """manifest.json: config, code version, totals over all committed parts, and this run appended to runs.

    Totals are what was committed before this run plus what this run committed (no second folder scan);
    stage-error rejects that a later part replaced are not counted.
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
        "sources": len(plan.units),
        "sources_complete_before": plan.complete,
        "processed": records + rejects,
        "records": records,
        "rejects": rejects,
        "superseded_stage_errors": after.ledger.superseded - before.ledger.superseded,
        "parts": len(results),
        "wall_seconds": round(wall, 2),
        "stages": this_run.to_dict(order),
    }
    manifest = {
        "name": cfg.name,
        "schema_version": SCHEMA_VERSION,
        "code_version": code_version(),
        "resume": "by-source",
        "created": previous.get("created", now),
        "updated": now,
        "config_hash": cfg.content_hash(),
        "config": cfg.model_dump(mode="json"),
        "counts": {
            "records": after.records,
            "rejects": after.effective_rejects,
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
