"""One process per source (`ray.one_process_per_source`): the pool pass reads, decodes, filters and writes
each source in one actor, with the same output as the three-hop chain, and a retried source keeps the
parts it already committed."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from engine.dedupe import PartitionedRegistry
from engine.source_worker import SourceWorker
from engine.stage import RunContext
from engine.storage import Folder
from engine.units import list_units
from tests.conftest import FIXTURE, run_engine

POOL = ["--set", "run_stages=[decode, collect]", "--set", "sink.records=image", "--set", "sink.shard_size=30"]


def outcome(out) -> tuple[set[str], set[tuple[str, str, str]]]:
    index = pd.read_parquet(out / "index", columns=["key", "source_uri"])
    rejects = pd.read_parquet(out / "rejects", columns=["uri", "stage", "reason"])
    assert index["key"].is_unique
    return set(index["source_uri"]), set(map(tuple, rejects.to_numpy().tolist()))


@pytest.mark.timeout(600)
def test_one_process_per_source_writes_what_the_three_hop_chain_writes(tmp_path, engine_env, input_dir):
    folder, _ = input_dir
    fused = ["--set", "ray.fuse=[[decode, collect]]", "--set", "sources.page_files=40"]
    hops, one = tmp_path / "hops", tmp_path / "one"
    run_engine(["--input", str(folder), "--output", str(hops), *POOL, *fused], engine_env)
    done = run_engine(
        [
            "--input",
            str(folder),
            "--output",
            str(one),
            *POOL,
            *fused,
            "--set",
            "ray.one_process_per_source=true",
        ],
        engine_env,
    )
    assert "MapBatches(SourceWorker)" in done.stdout + done.stderr  # the path under test ran
    records, rejects = outcome(one)
    assert (records, rejects) == outcome(hops)
    assert len(records) > 50 and any("duplicate" in reason for _, _, reason in rejects)
    manifest = json.loads((one / "manifest.json").read_text())
    assert manifest["counts"]["records"] == len(records) and manifest["counts"]["rejects"] == len(rejects)


def test_a_retried_source_keeps_its_committed_parts_and_writes_nothing_twice(tmp_path):
    from engine.pipeline import stage_groups
    from pipelines.rexverse2m import STAGES, load_job_config

    cfg = load_job_config(
        "configs/fixture.yaml", ["run_stages=[decode, collect]", "ray.fuse=[[decode, collect]]"]
    )
    (group,) = stage_groups(STAGES, cfg)
    context = RunContext(registry=PartitionedRegistry(2))  # one key table for both attempts, as in a run
    out = Folder(str(tmp_path / "out"))
    out.mkdirs()
    unit = next(iter(list_units([str(FIXTURE)], dataset="fixture", page_files=1000)))

    def attempt() -> list[dict]:
        members = [(stage, stage.constructor_kwargs(stage_cfg, context)) for stage, stage_cfg in group]
        worker = SourceWorker(members, 1, out, "run1", 16, 1 << 26, 30, 200, "image")
        return worker.process(unit)

    first, second = attempt(), attempt()  # the second: Ray retrying the source after a lost actor
    assert [m["part"] for m in first] == [m["part"] for m in second] and len(first) > 1
    assert [(m["records"], m["rejects"]) for m in first] == [(m["records"], m["rejects"]) for m in second]
    index = pd.read_parquet(tmp_path / "out" / "index", columns=["key"])
    assert index["key"].is_unique and len(index) == sum(m["records"] for m in first)
