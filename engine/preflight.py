"""Preflight: load every enabled stage and push a few images through it in this process, writing nothing.

Before a run of millions of images on rented GPUs, users need to know that every model loads and runs on
this hardware and dtype, what it costs (load time, memory, seconds per image), and where the real models'
scores fall against the config's thresholds (they were set on papers and tiny stand-ins, never on these
checkpoints). Exit status != 0 when any stage raised on an image or failed to load.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
import traceback
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from engine.config import EngineConfig
from engine.dedupe import KeyRegistry
from engine.errors import StageFailing
from engine.items import Item, batch_to_items
from engine.pipeline import active_stages
from engine.sources import list_inputs, listing_table
from engine.stage import RunContext, Stage
from engine.stats import reason_kind
from schemas import is_retried


@dataclass
class StageReport:
    name: str
    load_seconds: float = 0.0
    host_peak_mb: float = 0.0  # the process's peak resident memory after this stage loaded and ran
    gpu_peak_mb: float | None = None
    images_in: int = 0
    seconds_per_image: float = 0.0
    rejects: Counter = field(default_factory=Counter)
    drops: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)


def _host_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _gpu_peak_mb(reset: bool = False) -> float | None:
    """Peak CUDA memory since the last reset (None without torch or a GPU)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats()
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def _run_stage(stage: Stage, items: list[Item], batch_size: int) -> None:
    """The stage's own per-batch contract, on the live items in its batch size."""
    for start in range(0, len(items), batch_size):
        stage.run(items[start : start + batch_size])


def _account(report: StageReport, items: list[Item], drops_before: Counter) -> None:
    for item in items:
        if item.error_stage == report.name:
            report.rejects[reason_kind(item.error_reason)] += 1
            if is_retried(item.error_reason):
                report.errors.append(f"{item.uri}: {item.error_reason}")
    report.drops = _drops(items, report.name) - drops_before


def _drops(items: list[Item], stage: str) -> Counter:
    return Counter(
        reason_kind(d["reason"])
        for item in items
        if item.record is not None
        for d in item.record.get("dropped", [])
        if d["stage"] == stage
    )


def run_preflight(
    cfg: EngineConfig, stages: Sequence[type[Stage]], inputs: list[str], n: int, out: TextIO = sys.stdout
) -> int:
    """Load and run the enabled stages on the first `n` inputs; print the report; 0 when all went well."""
    listed = list_inputs(inputs, dataset=cfg.sink.dataset_name, limit=n)
    if not listed:
        print("preflight: no inputs found", file=out)
        return 2
    context = RunContext(registry=KeyRegistry())
    reports: list[StageReport] = []
    items: list[Item] = []
    failed = False
    for position, (stage_class, stage_cfg) in enumerate(active_stages(stages, cfg)):
        report = StageReport(stage_class.name)
        reports.append(report)
        _gpu_peak_mb(reset=True)
        start = time.perf_counter()
        try:
            stage = stage_class(**stage_class.constructor_kwargs(stage_cfg, context))
            stage.warm_up()
        except Exception as exc:
            detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
            report.errors.append(f"load failed: {detail}")
            failed = True
            break
        report.load_seconds = time.perf_counter() - start
        stage.score_log = {}
        start = time.perf_counter()
        if position == 0:  # the first stage (decode) turns the listing into items
            table = listing_table(listed)
            batch = {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}
            items = batch_to_items(stage(batch))
            report.images_in = len(listed)
        else:
            report.images_in = sum(1 for item in items if item.ok)
            drops_before = _drops(items, report.name)
            try:
                _run_stage(stage, items, stage_cfg.resources.batch_size)
            except StageFailing as exc:
                report.errors.append(str(exc))
            _account(report, items, drops_before)
        if position == 0:
            _account(report, items, Counter())
        seconds = time.perf_counter() - start
        report.seconds_per_image = seconds / max(report.images_in, 1)
        report.host_peak_mb = _host_peak_mb()
        report.gpu_peak_mb = _gpu_peak_mb()
        report.scores = stage.score_log
        failed = failed or bool(report.errors)
    print_report(reports, items, len(listed), out)
    return 1 if failed else 0


def _summary(values: list[float]) -> str:
    if not values:
        return "no scores"
    return (
        f"n={len(values)} min={min(values):.3f} median={statistics.median(values):.3f} max={max(values):.3f}"
    )


def _short(value: Any, limit: int = 240) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def print_report(reports: list[StageReport], items: list[Item], n: int, out: TextIO) -> None:
    gpu = any(r.gpu_peak_mb is not None for r in reports)
    header = f"{'stage':<16}{'load s':>8}{'host peak MB':>14}" + (f"{'GPU peak MB':>13}" if gpu else "")
    header += f"{'images':>8}{'s/image':>9}  rejected / dropped by reason"
    print(f"preflight on {n} images (nothing is written)", file=out)
    print(header, file=out)
    print("-" * len(header), file=out)
    for r in reports:
        line = f"{r.name:<16}{r.load_seconds:>8.2f}{r.host_peak_mb:>14.0f}"
        if gpu:
            line += f"{(r.gpu_peak_mb or 0):>13.0f}"
        reasons = [f"{k}={v}" for k, v in sorted(r.rejects.items())]
        reasons += [f"[{k}]={v}" for k, v in sorted(r.drops.items())]
        print(line + f"{r.images_in:>8}{r.seconds_per_image:>9.3f}  {', '.join(reasons)}", file=out)
    print("\nscores each threshold is applied to (all candidates, before the threshold):", file=out)
    for r in reports:
        for name, entry in r.scores.items():
            summary = _summary(entry["values"])
            print(f"  {r.name:<16}{name:<44}{summary}  threshold={entry['threshold']}", file=out)
    errors = [(r.name, e) for r in reports for e in r.errors]
    if errors:
        print(f"\n{len(errors)} stage error(s); the run would reject these images or stop:", file=out)
        for name, error in errors[:10]:
            print(f"  {name}: {error}", file=out)
    finished = next((item for item in items if item.ok and item.record is not None), None)
    if finished is not None:
        print("\none finished record (one line per field, long values cut):", file=out)
        for key, value in finished.record.items():
            print(f"  {key}: {_short(value)}", file=out)
    else:
        print("\nno image came through every stage", file=out)
    print(f"\npreflight: {'FAILED' if errors else 'ok'}", file=out)
