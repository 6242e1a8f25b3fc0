"""Engine configuration: YAML validated by pydantic, unknown keys are errors, `--set a.b=c` overrides.

Every knob a user may want to change (models, prompts, thresholds, resources) lives here, so stages read
their behaviour from config and never hard-code it.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)


class Strict(BaseModel):
    """Base for all config sections: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class FailFast(Strict):
    """When a stage's item errors mean the stage itself is broken (a model that cannot run on this
    hardware, a wrong checkpoint format), stop the run instead of rejecting every image for days.

    Per stage actor: `consecutive` errors in a row, or more than `max_fraction` of its first `window`
    items. 0 turns either rule off. Errors that stop a run are not final: a rerun processes those images
    again (content rejects such as undecodable or too small stay skipped).
    """

    consecutive: int = Field(16, ge=0)
    window: int = Field(64, ge=0)
    max_fraction: float = Field(0.5, gt=0, le=1)


class Resources(Strict):
    """How Ray runs one stage. Not part of the content hash: changing it never changes the output."""

    batch_size: int = Field(8, ge=1)
    concurrency: int | tuple[int, int] = 1
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    torch_threads: int = Field(1, ge=1)
    fail_fast: FailFast = FailFast()


class ModelRef(Strict):
    """A model loaded with `from_pretrained`: a hub id, a local folder, or `tiny:<name>` (built locally)."""

    name: str
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    trust_remote_code: bool = False


class GenerationConfig(Strict):
    """Greedy decoding settings (deterministic by design)."""

    max_new_tokens: int = Field(48, ge=1)
    min_new_tokens: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)


class RayConfig(Strict):
    """Where and how Ray runs: `address: null` uses $RAY_ADDRESS (`ray job submit` sets it) or a local Ray."""

    address: str | None = None
    num_cpus: int | None = None
    object_store_memory: int | None = None
    max_errored_blocks: int = Field(0, ge=0)
    # Groups of consecutive stages that run in one actor (one process, one torch import, a model named by
    # two of them loaded once). A group runs with its first stage's batch size and concurrency and the
    # largest num_cpus / num_gpus / torch_threads of its members. Execution only: not in the content hash.
    fuse: list[list[str]] = Field(default_factory=list)
    read_block_rows: int = Field(32, ge=1)  # member rows per block that a source's reader emits
    # Partitions (actors) of the run's key table for exact dedupe; any count keeps the owners on resume.
    dedupe_partitions: int = Field(4, ge=1)
    # Whole passes over the sources still to do, within one command, when Ray fails the run (a node lost
    # past Ray's own retries): each pass resumes from the committed parts, like a rerun would.
    run_attempts: int = Field(3, ge=1)
    # When every enabled stage runs in one group (one stage, or all named in one `fuse` entry): that
    # group's actors also read each source and write its parts, so image bytes never cross processes
    # (engine/source_worker.py). Off: read tasks, stage actors and write tasks, as for longer chains.
    one_process_per_source: bool = False
    show_progress: bool = True


class SourcesConfig(Strict):
    """How sources are listed (driver) and read (workers). Execution only: not in the content hash."""

    page_files: int = Field(1000, ge=1)  # loose files (a folder or prefix) per work unit
    max_member_bytes: int = Field(64 * 1024 * 1024, ge=1)  # a bigger tar member or file is a reject, unread
    num_cpus: float = Field(0.25, ge=0)  # per read task


class SinkConfig(Strict):
    """Shard parts are written by Ray write tasks in the workers; each writes parts of up to `shard_size`."""

    shard_size: int = Field(1000, ge=1)
    max_pending_rejects: int = Field(5000, ge=1)
    dataset_name: str = "rexverse"
    num_cpus: float = Field(0.25, ge=0)  # per write task: whole CPUs would starve the stages on small nodes
    max_retries: int = Field(3, ge=0)  # a write task lost with its node is retried; its parts stay unique
    # rejects.parquet (all rejects in one file) is rebuilt only while the output holds at most this many;
    # past it readers read rejects/ (one file per part) and no merged file is rewritten at pool scale.
    merge_rejects_max: int = Field(100_000, ge=0)
    # "full": records must meet the whole record contract; "image": only its image half (key, source, size,
    # format), for a pass that stops before captioning (the pool pass, configs/collect.yaml).
    records: Literal["full", "image"] = "full"


class EngineConfig(Strict):
    """The whole data-engine configuration (one YAML file); `stages` is typed by the job's stage list.

    The engine knows no stage: a job file calls `job_config(stages)`, which types `stages.<name>` with
    each stage's own config class (`Stage.config_class`, defined next to the stage's code).
    """

    name: str = "rexverse2m"
    seed: int = 0
    stages: Any
    # Run only these of the job's stages, in job order (null: every enabled stage). The pool pass
    # (configs/collect.yaml) runs [decode, collect]: the collection filters and exact dedupe, no captioning.
    run_stages: list[str] | None = None
    ray: RayConfig = RayConfig()
    sources: SourcesConfig = SourcesConfig()
    sink: SinkConfig = SinkConfig()

    @field_validator("name")
    @classmethod
    def _name_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("name must not be empty")
        return v

    def stage_config(self, name: str) -> Any:
        return getattr(self.stages, name)

    def content_hash(self) -> str:
        """Hash of everything that changes the output (models, prompts, thresholds), not of resources."""
        data = self.model_dump(mode="json", exclude={"ray", "sources", "sink", "name"})
        strip_resources(data)
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def job_config(stages: Sequence[Any]) -> type[EngineConfig]:
    """An EngineConfig subclass whose `stages` section has one field per stage, typed by its config class.

    A stage config that validates empty gets that as its default (the YAML may omit it); one with required
    fields (a model name, prompts) must be given.
    """
    fields: dict[str, Any] = {}
    for stage in stages:
        config_class = stage.config_class
        try:
            fields[stage.name] = (config_class, config_class())
        except ValidationError:
            fields[stage.name] = (config_class, ...)
    stages_model = create_model("StagesConfig", __base__=Strict, **fields)
    order = [stage.name for stage in stages]

    def fused_groups_are_consecutive_stages(cfg: EngineConfig) -> EngineConfig:
        unknown_runs = [name for name in cfg.run_stages or [] if name not in order]
        if unknown_runs:
            raise ValueError(f"run_stages names unknown stages {unknown_runs}; the stages are {order}")
        seen: set[str] = set()
        for group in cfg.ray.fuse:
            unknown = [name for name in group if name not in order]
            if unknown:
                raise ValueError(f"ray.fuse names unknown stages {unknown}; the stages are {order}")
            if seen & set(group):
                raise ValueError(f"ray.fuse puts {sorted(seen & set(group))} in two groups")
            seen |= set(group)
            positions = [order.index(name) for name in group]
            if positions != list(range(positions[0], positions[0] + len(group))):
                raise ValueError(f"ray.fuse group {group} must name consecutive stages in job order {order}")
        return cfg

    return create_model(
        "JobConfig",
        __base__=EngineConfig,
        __validators__={"_fuse": model_validator(mode="after")(fused_groups_are_consecutive_stages)},
        stages=(stages_model, ...),
    )


def strip_resources(data: Any) -> None:
    """Remove every `resources` and `device` entry in place (they change speed, not results)."""
    if isinstance(data, dict):
        data.pop("resources", None)
        data.pop("device", None)
        for value in data.values():
            strip_resources(value)


class ConfigError(ValueError):
    """A config file or override is invalid; the message says where and what to do."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value parsed as YAML so numbers/bools/lists work)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"--set has an empty key in {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML: {exc}") from exc
    return path, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `--set` overrides to a raw config dict (before validation, so errors name the key).

    Path parts index into lists too: `--set stages.1.steps=40`.
    """
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for depth, part in enumerate(path):
            last = depth == len(path) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(
                        f"--set {'.'.join(path)}: {part!r} is not an index of a {len(node)}-item list"
                    )
                key: Any = int(part)
            elif isinstance(node, dict):
                key = part
                if not last and node.get(key) is None:
                    node[key] = {}
            else:
                raise ConfigError(f"--set {'.'.join(path)}: {path[depth - 1]!r} is not a section")
            if last:
                node[key] = value
            else:
                node = node[key]
    return data


def deep_merge(base: dict, update: dict) -> dict:
    """`update` on top of `base`; nested mappings merge, everything else (lists too) replaces."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """A config file as a dict, with `extends: other.yaml` (relative to the file) merged underneath."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in chain:
        raise ConfigError(f"config 'extends' loop: {' -> '.join(str(p) for p in (*chain, path))}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    base = read_yaml(path.parent / str(parent), (*chain, path.resolve()))
    return deep_merge(base, raw)


def load_config(
    path: str | Path, config_class: type[EngineConfig], overrides: list[str] | None = None
) -> EngineConfig:
    """Read a YAML config, apply overrides and validate against `config_class` (see `job_config`).

    Raises ConfigError with a readable message.
    """
    path = Path(path)
    raw = apply_overrides(read_yaml(path), overrides or [])
    try:
        return config_class.model_validate(raw)
    except ValidationError as exc:
        lines = [f"invalid config {path}:"]
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {where}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
