"""Build a release folder from engine outputs: plan, shards, index, rejects, stats, gallery, exports, card.

Idempotent and resumable: a fingerprint of the inputs (manifests, commit markers) and the options names
the build. A finished release with the same fingerprint is left as it is; an unfinished one (the marker file
`_release_build.json` is present) continues where it stopped: shards already written are kept, the rest
(cheap, derived from the shards) is rebuilt. SHA256SUMS is written last and the marker removed after it,
so a folder with SHA256SUMS and no marker is complete. Inputs are only ever read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.storage import Folder
from engine.version import code_version
from release import card, gallery
from release.canonical import dumps
from release.diff import release_diff
from release.gate import check, parse_requirement
from release.inputs import EngineOutput, open_output, rejects
from release.plan import Plan, make_plan, parse_split
from release.shards import MemberIndex, iter_shard, write_shard
from release.stats import StatsCollector
from release.tiers import tier_counts
from schemas import INDEX_SCHEMA, to_index_row

log = logging.getLogger("rexverse.release")
MARKER = "_release_build.json"
RELEASE_FORMAT = 1
INDEX_RELEASE_SCHEMA = INDEX_SCHEMA.append(pa.field("split", pa.string()))


class ReleaseError(RuntimeError):
    """The release cannot be built as asked; the message says why and what to do."""


class GateError(ReleaseError):
    """A --require threshold failed; nothing was written."""


@dataclass
class Options:
    sources: list[str]
    dest: str
    name: str = "rexverse"
    version: str = "1.0.0"
    split: str | None = None
    shard_size: int = 1000
    previous: str | None = None
    require: list[str] = field(default_factory=list)
    license: str = "other"
    gallery_size: int = 24
    overwrite: bool = False


@dataclass
class Result:
    dest: str
    up_to_date: bool
    records: int
    duplicates: int
    files: dict[str, int]  # relative path -> size in bytes


def fingerprint(opts: Options, outputs: list[EngineOutput], code: str) -> str:
    h = hashlib.sha256()
    for out in outputs:
        h.update(out.uri.encode() + b"\0" + hashlib.sha256(out.manifest_bytes).digest())
        for name in sorted(out.commit_markers):
            h.update(name.encode() + hashlib.sha256(out.commit_markers[name]).digest())
        if out.audit is not None:
            h.update(dumps(out.audit).encode())
    settings = {
        k: getattr(opts, k) for k in ("name", "version", "split", "shard_size", "previous", "require")
    }
    settings |= {"license": opts.license, "gallery_size": opts.gallery_size, "code": code}
    h.update(dumps(settings).encode())
    return h.hexdigest()


def _prepare_dest(dest: Folder, fp: str, overwrite: bool) -> dict[str, Any] | None:
    """None when the release is complete and current; else the resume state (possibly fresh)."""
    if dest.is_file(MARKER):
        state = json.loads(dest.read_text(MARKER))
        if state.get("fingerprint") == fp:
            return state
        if not overwrite:
            raise ReleaseError(
                f"{dest.uri} holds an unfinished release of other inputs or options; "
                "pass --overwrite to discard it, or choose another --to"
            )
        dest.delete_all()
    elif dest.is_file("SHA256SUMS") and dest.is_file("manifest.json"):
        done = json.loads(dest.read_text("manifest.json")).get("build", {}).get("fingerprint")
        if done == fp:
            return None
        if not overwrite:
            raise ReleaseError(
                f"{dest.uri} already holds a release of other inputs, options or code version "
                "(releases are immutable); "
                "choose a new --to (e.g. with the next --version), or pass --overwrite to replace it"
            )
        dest.delete_all()
    elif dest.files(recursive=True):
        raise ReleaseError(
            f"{dest.uri} is not empty and holds no release: choose an empty or new --to folder"
        )
    return {"fingerprint": fp, "shards": []}


def _merged_stages(outputs: list[EngineOutput]) -> dict[str, Any]:
    """Per-stage stats summed over the inputs (counters merged)."""
    merged: dict[str, dict[str, Any]] = {}
    for out in outputs:
        for stage, stats in out.manifest.get("stages", {}).items():
            into = merged.setdefault(stage, {})
            for k, v in stats.items():
                if isinstance(v, dict):
                    bucket = into.setdefault(k, {})
                    for reason, n in v.items():
                        bucket[reason] = bucket.get(reason, 0) + n
                elif isinstance(v, int | float):
                    into[k] = round(into.get(k, 0) + v, 3)
    for stats in merged.values():
        for k, v in stats.items():
            if isinstance(v, dict):
                stats[k] = dict(sorted(v.items()))
    return merged


def _configs(outputs: list[EngineOutput]) -> tuple[dict[str, Any], list[str]]:
    """{config name: config} over the inputs (name#hash when two inputs share a name but not a config)."""
    configs: dict[str, Any] = {}
    names = []
    for out in outputs:
        config = out.manifest.get("config", {})
        name = str(out.manifest.get("name") or config.get("name") or "config")
        chash = out.manifest.get("config_hash", "")
        if name in configs and configs[name] != config:
            name = f"{name}#{chash[:8]}"
        configs[name] = config
        names.append(name)
    return configs, names


def _rejects_table(outputs: list[EngineOutput]) -> pa.Table:
    tables = []
    for out in outputs:
        table = rejects(out).select(["uri", "key", "stage", "reason"])
        tables.append(table.append_column("input", pa.array([out.uri] * table.num_rows, pa.string())))
    table = pa.concat_tables(tables)
    order = pc.sort_indices(
        table,
        sort_keys=[
            ("input", "ascending"),
            ("stage", "ascending"),
            ("reason", "ascending"),
            ("uri", "ascending"),
        ],
    )
    return table.take(order)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _sha256(dest: Folder, rel: str) -> str:
    h = hashlib.sha256()
    with dest.open_input(rel) as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def build(opts: Options, progress: Callable[[str], None] = log.info) -> Result:
    """Build (or resume, or confirm) the release described by `opts`; raises ReleaseError/GateError."""
    if opts.shard_size < 1:
        raise ReleaseError("--shard-size must be at least 1")
    try:
        fractions = parse_split(opts.split)
        requirements = [parse_requirement(r) for r in opts.require]
    except ValueError as err:
        raise ReleaseError(str(err)) from err
    if not opts.sources:
        raise ReleaseError("give at least one --from engine output")
    outputs = [open_output(uri, i) for i, uri in enumerate(opts.sources)]
    if opts.previous:
        prev = Folder(opts.previous)
        if not (prev.is_file("manifest.json") and prev.is_file("SHA256SUMS")) or prev.is_file(MARKER):
            raise ReleaseError(
                f"--previous {opts.previous}: not a finished release (no SHA256SUMS, or unfinished)"
            )
    failures, gate_results = check(requirements, outputs)
    if failures:
        raise GateError("release not written: the quality gate failed:\n  " + "\n  ".join(failures))

    code = code_version()
    fp = fingerprint(opts, outputs, code)
    dest = Folder(opts.dest)
    state = _prepare_dest(dest, fp, opts.overwrite)
    plan = make_plan(outputs, fractions, opts.shard_size)
    if state is None:
        progress(f"{dest.uri} is already this release (fingerprint {fp[:12]}); nothing to do")
        return Result(dest.uri, True, plan.records, len(plan.duplicates), _file_sizes(dest))
    dest.write_text(MARKER, dumps(state))
    for rel in dest.files(recursive=True):  # temporary files of a killed build
        if rel.endswith(".tmp") and rel.rsplit("/", 1)[-1].startswith("."):
            dest.delete(rel)

    members = MemberIndex(outputs)
    done = set(state["shards"])
    for split, rel, entries in plan.all_shards():
        if rel in done and dest.is_file(rel):
            continue
        write_shard(dest, rel, entries, members)
        done.add(rel)
        state["shards"] = sorted(done)
        dest.write_text(MARKER, dumps(state))
        progress(f"wrote {rel} ({len(entries)} records, {split})")

    _write_derived(dest, opts, outputs, plan, fractions, gate_results, code, fp, progress)
    sums = [f"{_sha256(dest, rel)}  {rel}\n" for rel in _release_files(dest) if rel != "SHA256SUMS"]
    dest.write_text("SHA256SUMS", "".join(sums))
    dest.delete(MARKER)
    progress(f"release {opts.name} {opts.version}: {plan.records} records -> {dest.uri}")
    return Result(dest.uri, False, plan.records, len(plan.duplicates), _file_sizes(dest))


def _release_files(dest: Folder) -> list[str]:
    return [
        rel
        for rel in dest.files(recursive=True)
        if rel != MARKER and not rel.rsplit("/", 1)[-1].startswith(".")
    ]


def _file_sizes(dest: Folder) -> dict[str, int]:
    return {rel: dest.size(rel) for rel in _release_files(dest)}


def _write_derived(
    dest: Folder,
    opts: Options,
    outputs: list[EngineOutput],
    plan: Plan,
    fractions: dict[str, float],
    gate_results: list[dict[str, Any]],
    code: str,
    fp: str,
    progress: Callable[[str], None],
) -> None:
    """Everything derived from the release shards: index, stats, plots, gallery, exports, manifest, card."""
    from release import plots  # heavy imports (matplotlib, torch via chatrex) only when building
    from release.exports import Exporter

    info = {"description": f"{opts.name} {opts.version} (Rexverse release)", "version": opts.version}
    collector = StatsCollector()
    wanted = set(
        sorted((e.key for _, _, ents in plan.all_shards() for e in ents), key=gallery.sample_rank)[
            : opts.gallery_size
        ]
    )
    samples: dict[str, tuple[dict[str, Any], str, bytes]] = {}
    tiers_total: dict[str, int] = {}
    regions_total = 0
    with Exporter(dest, info) as exporter:  # streamed while the records pass by
        for split, shards in plan.shards.items():
            with dest.open_write(f"index/{split}.parquet") as stream:
                writer = pq.ParquetWriter(stream, INDEX_RELEASE_SCHEMA)
                for rel in shards:
                    rows = []
                    for key, sample in iter_shard(dest, rel):
                        record = json.loads(sample["json"])
                        collector.add(record, split)
                        exporter.add(record, split, rel)
                        row = to_index_row(record, rel)
                        row["split"] = split
                        rows.append(row)
                        regions_total += len(record.get("regions", []))
                        for tier, n in tier_counts(record.get("regions", [])).items():
                            tiers_total[tier] = tiers_total.get(tier, 0) + n
                        if key in wanted:
                            samples[key] = (record, split, sample[record["image_ext"]])
                    writer.write_table(pa.Table.from_pylist(rows, schema=INDEX_RELEASE_SCHEMA))
                writer.close()
    progress("wrote index and exports")

    reject_table = _rejects_table(outputs)
    dest.write_bytes("rejects.parquet", _parquet_bytes(reject_table))
    duplicates = pa.table(
        {
            "key": pa.array([d.key for d in plan.duplicates], pa.string()),
            "kept_from": pa.array([opts.sources[d.kept] for d in plan.duplicates], pa.string()),
            "dropped_from": pa.array([opts.sources[d.dropped] for d in plan.duplicates], pa.string()),
        }
    )
    dest.write_bytes("duplicates.parquet", _parquet_bytes(duplicates))

    stats = collector.to_dict(
        list(zip(reject_table["stage"].to_pylist(), reject_table["reason"].to_pylist(), strict=True))
    )
    stats["duplicates"] = len(plan.duplicates)
    dest.write_text("stats.json", json.dumps(stats, indent=1, sort_keys=True) + "\n")
    figures = plots.make_plots(stats)
    for name, data in figures.items():
        dest.write_bytes(f"plots/{name}", data)
    progress("wrote stats and plots")

    ordered = [samples[k] for k in sorted(samples, key=gallery.sample_rank)]
    masked = set()
    for record, _, image in ordered:
        dest.write_bytes(f"gallery/img/{record['key']}.{record['image_ext']}", image)
        overlay = gallery.mask_overlay(record)
        if overlay is not None:
            dest.write_bytes(f"gallery/img/{record['key']}.mask.png", overlay)
            masked.add(record["key"])
    page = gallery.render(
        f"{opts.name} {opts.version}", [(r, s) for r, s, _ in ordered], masked, plan.records
    )
    dest.write_text("gallery/index.html", page)
    progress("wrote gallery")

    configs, config_names = _configs(outputs)
    manifest: dict[str, Any] = {
        "release_format": RELEASE_FORMAT,
        "name": opts.name,
        "version": opts.version,
        "schema_versions": sorted({str(o.manifest.get("schema_version")) for o in outputs}),
        "build": {
            "fingerprint": fp,
            "code_version": code,
            "split": fractions,
            "shard_size": opts.shard_size,
            "require": list(opts.require),
            "previous": opts.previous,
            "license": opts.license,
        },
        "inputs": [
            {
                "uri": out.uri,
                "config_name": config_names[out.number],
                "config_hash": out.manifest.get("config_hash", ""),
                "code_version": out.manifest.get("code_version", ""),
                "schema_version": out.manifest.get("schema_version", ""),
                "created": out.manifest.get("created"),
                "updated": out.manifest.get("updated"),
                "manifest_sha256": hashlib.sha256(out.manifest_bytes).hexdigest(),
                "counts": out.manifest.get("counts", {}),
                "records_used": plan.records_per_input[out.number],
                "duplicates_dropped": sum(d.dropped == out.number for d in plan.duplicates),
                "audit": out.audit,
            }
            for out in outputs
        ],
        "configs": configs,
        "counts": {
            "records": plan.records,
            "splits": {s: sum(len(e) for e in shards.values()) for s, shards in plan.shards.items()},
            "shards": {s: len(shards) for s, shards in plan.shards.items()},
            "regions": regions_total,
            "tiers": tiers_total,
            "rejects": reject_table.num_rows,
            "duplicates": len(plan.duplicates),
        },
        "stages": _merged_stages(outputs),
        "gate": gate_results,
        "plots": sorted(figures),
        "gallery": {"images": len(ordered)},
    }
    if opts.previous:
        keys = {e.key for _, _, ents in plan.all_shards() for e in ents}
        try:
            manifest["diff"] = release_diff(opts.previous, keys, manifest)
        except ValueError as err:
            raise ReleaseError(str(err)) from err
    dest.write_text(
        "manifest.json", json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    )
    dest.write_text("README.md", card.render(manifest, stats, INDEX_RELEASE_SCHEMA, opts.license))
    progress("wrote manifest and card")
