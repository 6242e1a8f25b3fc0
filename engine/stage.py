"""The stage contract the engine runs: skip rejected items, time the work, contain failures to their items.

A stage is a callable class (design §4): constructed once per Ray actor (model load), called per batch,
same rows out as in. It is equally usable without Ray: `Caption(cfg)(batch)`. Each stage module defines
its config class next to its code and names it in `config_class`; the job file lists the stages in order
and the engine runs that list without importing any stage itself.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from engine.config import FailFast, Resources, Strict, strip_resources
from engine.dedupe import KeyRegistry, PartitionedRegistry
from engine.errors import RetryableError, StageFailing
from engine.items import Item, batch_to_items, items_to_batch
from schemas import STAGE_ERROR


def set_torch_threads(n: int) -> None:
    """Pin intra-op threads per actor (several actors share a node's cores); only where torch is used.

    A stage that uses torch imported it with its module, before construction; one that does not (decode)
    never pays for importing it.
    """
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def params_hash(params: dict[str, Any]) -> str:
    """Short stable hash of a stage's settings, for provenance."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass
class RunContext:
    """What a stage may need from the run beyond its config: today the run's key table (dedupe).

    In-process runs hand the registry itself (anything with `claim`); Ray runs name the partition actors
    of the key table, which workers look up.
    """

    registry: KeyRegistry | PartitionedRegistry | None = None
    registry_names: list[str] = field(default_factory=list)
    namespace: str = ""


class Stage:
    """Subclasses set `name`, `config_class`, optionally `unit` (what they count inside an image) and
    implement `process`."""

    name: ClassVar[str]
    config_class: ClassVar[type[Strict]]
    unit: ClassVar[str] = "regions"
    # The preflight sets a dict here to see every score a threshold is applied to (`log_scores`);
    # None in a run, where logging them would cost memory for nothing.
    score_log: dict[str, dict[str, Any]] | None = None
    # False for a stage whose `process` only rejects whole items and never edits a record (collect): a
    # batch that fails then restores no record, so none is copied before each batch.
    edits_records: ClassVar[bool] = True

    @classmethod
    def enabled(cls, cfg: Any) -> bool:
        """Optional stages carry `enabled` in their config; the others always run."""
        return bool(getattr(cfg, "enabled", True))

    @classmethod
    def constructor_kwargs(cls, cfg: Any, context: RunContext) -> dict[str, Any]:
        """Keyword arguments that build this stage in a worker (override to take more from the run)."""
        return {"cfg": cfg}

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        resources: Resources | None = getattr(cfg, "resources", None)
        if resources is not None:
            set_torch_threads(resources.torch_threads)
        self.health = StageHealth(self.name, resources.fail_fast if resources is not None else FailFast())
        params = cfg.model_dump(mode="json")
        strip_resources(params)
        model = getattr(cfg, "model", None)
        self.provenance = {
            "model": getattr(model, "name", None) or getattr(cfg, "spacy_model", ""),
            "revision": getattr(model, "revision", None),
            "params": params_hash(params),
        }

    def warm_up(self) -> None:
        """Load what the stage loads lazily (the preflight times loading apart from the first images)."""

    def log_scores(self, name: str, values: Sequence[float], threshold: float) -> None:
        """Record scores that `threshold` is applied to (all of them, kept or not) when a preflight asks."""
        if self.score_log is not None:
            entry = self.score_log.setdefault(name, {"threshold": threshold, "values": []})
            entry["values"].extend(float(v) for v in values)

    def process(self, items: list[Item]) -> None:
        """Mutate `items` in place: add to `item.record`, or `item.reject(...)` / `item.drop(...)`."""
        raise NotImplementedError

    def count(self, item: Item) -> int:
        if item.record is None or not self.unit:
            return 0
        return len(item.record.get(self.unit, []))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return items_to_batch(self.run_columns(batch))

    def run_columns(self, batch: dict[str, Any]) -> list[Item]:
        """A batch of item columns (as Ray passes them) in, the processed items out."""
        items = batch_to_items(batch)
        self.run(items)
        return items

    def run(self, items: list[Item]) -> None:
        """Process the live items; if the batch fails as a whole, retry one by one so only culprits reject."""
        live = [item for item in items if item.ok]
        if not live:
            return
        counts_in = [self.count(item) for item in live]
        snapshots = [_snapshot(item, self.edits_records) for item in live]
        start = time.perf_counter()
        try:
            self.process(live)
        except RetryableError:
            raise  # the environment failed, not these items: retry the batch, reject nothing
        except Exception:
            for item, snapshot in zip(live, snapshots, strict=True):
                _restore(item, snapshot)
                self._process_alone(item)
        seconds = (time.perf_counter() - start) / len(live)
        for item, n_in in zip(live, counts_in, strict=True):
            n_out = self.count(item) if item.ok else 0
            item.trace[self.name] = {"seconds": seconds, "in": n_in, "out": n_out}
            if item.ok and item.record is not None:
                item.record.setdefault("provenance", {}).setdefault(self.name, {}).update(self.provenance)
        for item in live:
            failed = item.error_stage == self.name and item.error_reason.startswith(STAGE_ERROR)
            self.health.observe(failed, item.error_reason)

    def _process_alone(self, item: Item) -> None:
        snapshot = _snapshot(item, self.edits_records)
        try:
            self.process([item])
        except RetryableError:
            raise
        except Exception as exc:
            _restore(item, snapshot)
            detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
            item.reject(self.name, f"{STAGE_ERROR}: {detail}")


class StageHealth:
    """Counts one stage actor's item errors and raises `StageFailing` when they reach `FailFast`'s limits.

    Scattered errors (one odd image in thousands) stay per-item rejects; a stage that fails on most items
    is broken, and every further image it rejects would be model time spent upstream for nothing.
    """

    def __init__(self, stage: str, rules: FailFast) -> None:
        self.stage, self.rules = stage, rules
        self.seen = self.errors = self.in_a_row = self.errors_in_window = 0
        self.first_error = ""

    def observe(self, failed: bool, reason: str) -> None:
        self.seen += 1
        if not failed:
            self.in_a_row = 0
            return
        self.errors += 1
        self.in_a_row += 1
        self.first_error = self.first_error or reason
        rules = self.rules
        if self.seen <= rules.window:
            self.errors_in_window += 1
        if rules.consecutive and self.in_a_row >= rules.consecutive:
            summary = f"{self.in_a_row} images in a row"
            raise StageFailing(self.stage, self.in_a_row, summary, self.first_error)
        if rules.window and self.errors_in_window > rules.max_fraction * rules.window:
            summary = f"{self.errors_in_window} of its first {self.seen} images"
            raise StageFailing(self.stage, self.errors_in_window, summary, self.first_error)


def _snapshot(item: Item, with_record: bool = True) -> tuple:
    """The item as it was, to restore if a batch fails. The record is pickled (plain JSON-like data):
    several times cheaper than `copy.deepcopy`, and unpickled only when a batch actually fails."""
    record = pickle.dumps(item.record, protocol=pickle.HIGHEST_PROTOCOL) if with_record else None
    return (record, item.image, item.error_stage, item.error_reason)


def _restore(item: Item, snapshot: tuple) -> None:
    record, item.image, item.error_stage, item.error_reason = snapshot
    if record is not None:
        item.record = pickle.loads(record)


class StageGroup:
    """Several consecutive stages in one actor: one process, one import of torch, one model load when two
    of them name the same model (`engine.models` shares loaded models within a process).

    Each member keeps its own config, trace, statistics and provenance; only where they run changes.
    """

    def __init__(self, members: Sequence[tuple[type[Stage], dict[str, Any]]], torch_threads: int = 1) -> None:
        self.stages = [stage(**kwargs) for stage, kwargs in members]
        set_torch_threads(torch_threads)  # each member set its own; the group runs with the largest

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return items_to_batch(self.run_columns(batch))

    def run_columns(self, batch: dict[str, Any]) -> list[Item]:
        """The batch through every member; the first may be decode, which takes listing columns."""
        return self._rest(self.stages[0].run_columns(batch))

    def run_rows(self, rows: list[dict[str, Any]]) -> list[Item]:
        """Rows a source worker read (the first member is decode, which takes them as they are)."""
        return self._rest(self.stages[0].run_rows(rows))  # type: ignore[attr-defined]

    def _rest(self, items: list[Item]) -> list[Item]:
        for stage in self.stages[1:]:
            stage.run(items)
        return items
