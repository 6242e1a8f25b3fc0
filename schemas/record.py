"""The Rexverse record: one per image, the contract between the engine, ChatRex training, eval and users.

Three views of the same thing, defined once here:
- typed Python objects (`Record`, `Region`, ...) for code that builds or reads records;
- `validate(record_dict)` for the JSON form that travels through the engine and lands in shards;
- `INDEX_SCHEMA`, the pyarrow schema of the parquet index (one row per record) and `to_index_row`.
Field meanings are documented in docs/record.md; bump SCHEMA_VERSION on any change there.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = "1.2"  # 1.2: region tiers (texts past category may be null), input captions, conversations
SUPPORTED_VERSIONS = ("1.0", "1.1", "1.2")  # 1.0/1.1 records are 1.2 records with every tier filled
TIERED_VERSIONS = ("1.2",)  # versions whose regions may stop at a tier (text null)
# optional per proposal (UPN's prompt that proposed it); absent/None for proposers without granularity
PROPOSAL_GRANULARITIES = (None, "coarse", "fine")
KEY_PATTERN = re.compile(r"^[0-9a-f]{64}$")
IMAGE_EXTENSIONS = ("jpg", "png")


@dataclass
class Source:
    uri: str
    dataset: str = ""


@dataclass
class Caption:
    text: str
    model: str = ""
    input: str | None = None  # since 1.2: the input's own caption when `stages.caption.source: both`


@dataclass
class Phrase:
    text: str
    start: int
    end: int
    head: str = ""
    noun: str = ""  # since 1.2: the phrase without adjectives/numbers, head lemmatised ("lemon")
    turn: int | None = None  # since 1.2: index of the conversation turn the span is in (None: the caption)


@dataclass
class Region:
    id: int
    box: list[float]
    score: float
    phrase: int
    category: str = ""
    short_phrase: str | None = None
    description: str | None = None
    referring: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    mask: dict[str, Any] | None = None


@dataclass
class GroundedSpan:
    start: int
    end: int
    phrase: int
    regions: list[int]


@dataclass
class GroundedCaption:
    text: str
    spans: list[GroundedSpan] = field(default_factory=list)


@dataclass
class ConversationTurn:
    """One turn of an input conversation; `spans` point its grounded phrases at region ids (since 1.2)."""

    role: str
    text: str
    spans: list[GroundedSpan] = field(default_factory=list)


@dataclass
class Dropped:
    stage: str
    what: str
    reason: str


@dataclass
class Record:
    key: str
    source: Source
    width: int
    height: int
    image_ext: str
    caption: Caption
    phrases: list[Phrase] = field(default_factory=list)
    regions: list[Region] = field(default_factory=list)
    grounded_caption: GroundedCaption | None = None
    grounded_conversation: list[ConversationTurn] | None = None
    proposals: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    provenance: dict[str, dict[str, Any]] = field(default_factory=dict)
    schema_version: str = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        """Build typed objects from the JSON form; raises SchemaError if the record is invalid."""
        errors = validate(data)
        if errors:
            raise SchemaError("; ".join(errors))
        gc = data.get("grounded_caption")
        conversation = data.get("grounded_conversation")
        return cls(
            key=data["key"],
            source=Source(**data["source"]),
            width=data["width"],
            height=data["height"],
            image_ext=data["image_ext"],
            caption=Caption(**data["caption"]),
            phrases=[Phrase(**p) for p in data.get("phrases", [])],
            regions=[Region(**r) for r in data.get("regions", [])],
            grounded_caption=None
            if gc is None
            else GroundedCaption(text=gc["text"], spans=[GroundedSpan(**s) for s in gc["spans"]]),
            grounded_conversation=None
            if conversation is None
            else [
                ConversationTurn(t["role"], t["text"], [GroundedSpan(**s) for s in t.get("spans", [])])
                for t in conversation
            ],
            proposals=list(data.get("proposals", [])),
            dropped=[Dropped(**d) for d in data.get("dropped", [])],
            provenance=dict(data.get("provenance", {})),
            schema_version=data["schema_version"],
        )


class SchemaError(ValueError):
    """A record breaks the contract; the message lists every problem found."""


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_version(data: dict[str, Any]) -> str | None:
    """None if this code can read the record's schema version, else a message that names it."""
    version = data.get("schema_version")
    if version in SUPPORTED_VERSIONS:
        return None
    return (
        f"schema_version {version!r} is not supported by this Rexverse "
        f"(reads {', '.join(SUPPORTED_VERSIONS)}); upgrade rexverse or rebuild the shards"
    )


def validate_image(data: dict[str, Any]) -> list[str]:
    """The image half of the contract only (version, key, source, size, format): what a pass that stops
    before captioning writes (the pool pass, `sink.records: image`); the full engine reads its shards."""
    version_error = check_version(data)
    if version_error:
        return [version_error]
    return _image_errors(data)


def validate(data: dict[str, Any]) -> list[str]:
    """Every way `data` breaks the record contract (empty list = valid)."""
    version_error = check_version(data)
    if version_error:
        return [version_error]
    errors = _image_errors(data)
    width, height = data.get("width"), data.get("height")
    if not (_is_int(width) and _is_int(height) and width > 0 and height > 0):
        return errors
    return errors + _content_errors(data)


def _image_errors(data: dict[str, Any]) -> list[str]:
    errors: list[str] = []
    key = data.get("key")
    if not (isinstance(key, str) and KEY_PATTERN.match(key)):
        errors.append(f"key must be 64 lowercase hex chars (sha256), got {key!r}")
    source = data.get("source")
    if not (isinstance(source, dict) and _is_text(source.get("uri"))):
        errors.append("source.uri must be a non-empty string")
    width, height = data.get("width"), data.get("height")
    if not (_is_int(width) and _is_int(height) and width > 0 and height > 0):
        errors.append(f"width/height must be positive ints, got {width!r}x{height!r}")
        return errors
    if data.get("image_ext") not in IMAGE_EXTENSIONS:
        errors.append(f"image_ext must be one of {IMAGE_EXTENSIONS}, got {data.get('image_ext')!r}")
    return errors


def _content_errors(data: dict[str, Any]) -> list[str]:
    errors: list[str] = []
    width, height = data["width"], data["height"]
    caption = data.get("caption")
    if not (isinstance(caption, dict) and _is_text(caption.get("text"))):
        errors.append("caption.text must be a non-empty string")
        return errors
    text = caption["text"]
    phrases = data.get("phrases", [])
    conversation = data.get("grounded_conversation")
    turns = [t.get("text", "") if isinstance(t, dict) else "" for t in conversation or []]
    errors += _validate_phrases(phrases, text, turns)
    regions = data.get("regions", [])
    tiered = data.get("schema_version") in TIERED_VERSIONS
    errors += _validate_regions(regions, len(phrases), width, height, tiered)
    errors += _validate_grounded_caption(data.get("grounded_caption"), text, regions, len(phrases))
    errors += _validate_conversation(conversation, regions, len(phrases))
    for i, prop in enumerate(data.get("proposals", [])):
        box = prop.get("box") if isinstance(prop, dict) else None
        problem = _box_problem(box, width, height)
        if problem:
            errors.append(f"proposals[{i}].box {problem}")
        elif not _is_number(prop.get("score")):
            errors.append(f"proposals[{i}].score must be a finite number")
        elif prop.get("granularity") not in PROPOSAL_GRANULARITIES:
            errors.append(f"proposals[{i}].granularity must be one of {PROPOSAL_GRANULARITIES}")
    for i, drop in enumerate(data.get("dropped", [])):
        if not (isinstance(drop, dict) and _is_text(drop.get("stage")) and _is_text(drop.get("reason"))):
            errors.append(f"dropped[{i}] needs stage and reason")
    return errors


def _validate_phrases(phrases: Any, text: str, turns: list[str]) -> list[str]:
    """Spans index into the caption, or into conversation turn `turn` when the phrase names one."""
    if not isinstance(phrases, list):
        return ["phrases must be a list"]
    errors = []
    for i, p in enumerate(phrases):
        turn = p.get("turn")
        if turn is not None and not (_is_int(turn) and 0 <= turn < len(turns)):
            errors.append(f"phrases[{i}].turn {turn!r} is not a conversation turn index")
            continue
        source, where = (text, "caption") if turn is None else (turns[turn], f"turn {turn}")
        start, end = p.get("start"), p.get("end")
        if not (_is_int(start) and _is_int(end) and 0 <= start < end <= len(source)):
            errors.append(f"phrases[{i}] span {start!r}:{end!r} is outside the {where}")
        elif source[start:end] != p.get("text"):
            errors.append(
                f"phrases[{i}].text {p.get('text')!r} != {where}[{start}:{end}] {source[start:end]!r}"
            )
    return errors


def _box_problem(box: Any, width: int, height: int) -> str | None:
    if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
        return f"must be 4 finite numbers, got {box!r}"
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        return f"{box!r} is empty or outside the {width}x{height} image"
    return None


REGION_TEXT_FIELDS = ("category", "short_phrase", "description", "referring")
# A tier made from another's text needs that text: a referring expression is rewritten from the description.
TIER_PARENTS = {"referring": "description"}


def _tier_errors(i: int, region: dict[str, Any], tiered: bool) -> list[str]:
    """Before 1.2 every region carries all four texts; since 1.2 only `category` is required, the other
    tiers are a non-empty string or null, and a nested tier needs its parent's text."""
    errors = []
    for name in REGION_TEXT_FIELDS:
        value = region.get(name)
        if tiered and name != "category":
            if name not in region:
                errors.append(f"regions[{i}].{name} must be present (null when the tier was not reached)")
            elif value is not None and not _is_text(value):
                errors.append(f"regions[{i}].{name} must be a non-empty string or null")
        elif not _is_text(value):
            errors.append(f"regions[{i}].{name} must be a non-empty string")
    for child, parent in TIER_PARENTS.items():
        if region.get(child) is not None and region.get(parent) is None:
            errors.append(f"regions[{i}].{child} needs its {parent} (the tier it is made from)")
    return errors


def _validate_regions(regions: Any, n_phrases: int, width: int, height: int, tiered: bool) -> list[str]:
    if not isinstance(regions, list):
        return ["regions must be a list"]
    errors = []
    ids = set()
    for i, r in enumerate(regions):
        rid = r.get("id")
        if not _is_int(rid) or rid in ids:
            errors.append(f"regions[{i}].id must be a unique int, got {rid!r}")
        ids.add(rid)
        problem = _box_problem(r.get("box"), width, height)
        if problem:
            errors.append(f"regions[{i}].box {problem}")
        if not _is_number(r.get("score")):
            errors.append(f"regions[{i}].score must be a finite number")
        phrase = r.get("phrase")
        if not (_is_int(phrase) and 0 <= phrase < n_phrases):
            errors.append(f"regions[{i}].phrase {phrase!r} is not a phrase index")
        errors += _tier_errors(i, r, tiered)
        mask = r.get("mask")
        if mask is not None and not (isinstance(mask, dict) and _is_text(mask.get("counts"))):
            errors.append(f"regions[{i}].mask must be a COCO RLE {{size, counts}} or null")
        elif mask is not None and list(mask.get("size", [])) != [height, width]:
            errors.append(f"regions[{i}].mask.size must be [height, width] = [{height}, {width}]")
    return errors


def _validate_grounded_caption(gc: Any, text: str, regions: list, n_phrases: int) -> list[str]:
    if gc is None:
        return []
    if not isinstance(gc, dict) or gc.get("text") != text:
        return ["grounded_caption.text must equal caption.text"]
    ids = {r.get("id") for r in regions}
    errors = []
    for i, s in enumerate(gc.get("spans", [])):
        start, end = s.get("start"), s.get("end")
        if not (_is_int(start) and _is_int(end) and 0 <= start < end <= len(text)):
            errors.append(f"grounded_caption.spans[{i}] is outside the caption")
        if not (_is_int(s.get("phrase")) and 0 <= s["phrase"] < n_phrases):
            errors.append(f"grounded_caption.spans[{i}].phrase is not a phrase index")
        missing = [rid for rid in s.get("regions", []) if rid not in ids]
        if missing or not s.get("regions"):
            errors.append(f"grounded_caption.spans[{i}] must point at existing regions, bad: {missing}")
    return errors


def _validate_conversation(turns: Any, regions: list, n_phrases: int) -> list[str]:
    if turns is None:
        return []
    if not isinstance(turns, list):
        return ["grounded_conversation must be a list of turns or null"]
    ids = {r.get("id") for r in regions}
    errors = []
    for t, turn in enumerate(turns):
        if not (isinstance(turn, dict) and _is_text(turn.get("role")) and isinstance(turn.get("text"), str)):
            errors.append(f"grounded_conversation[{t}] needs role and text")
            continue
        for i, s in enumerate(turn.get("spans", [])):
            start, end = s.get("start"), s.get("end")
            if not (_is_int(start) and _is_int(end) and 0 <= start < end <= len(turn["text"])):
                errors.append(f"grounded_conversation[{t}].spans[{i}] is outside the turn's text")
            if not (_is_int(s.get("phrase")) and 0 <= s["phrase"] < n_phrases):
                errors.append(f"grounded_conversation[{t}].spans[{i}].phrase is not a phrase index")
            if not s.get("regions") or any(rid not in ids for rid in s.get("regions", [])):
                errors.append(f"grounded_conversation[{t}].spans[{i}] must point at existing regions")
    return errors


# --- parquet index: one row per record, the same fields flattened ---------------------------------------

_REGION_TYPE = pa.struct(
    [
        ("id", pa.int32()),
        ("box", pa.list_(pa.float32(), 4)),
        ("score", pa.float32()),
        ("phrase", pa.int32()),
        ("category", pa.string()),
        ("short_phrase", pa.string()),
        ("description", pa.string()),
        ("referring", pa.string()),
        ("has_mask", pa.bool_()),
    ]
)
_PHRASE_TYPE = pa.struct([("text", pa.string()), ("start", pa.int32()), ("end", pa.int32())])
_PROPOSAL_TYPE = pa.struct(
    [("box", pa.list_(pa.float32(), 4)), ("score", pa.float32()), ("granularity", pa.string())]
)

INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("schema_version", pa.string()),
        ("shard", pa.string()),
        ("source_uri", pa.string()),
        ("source_dataset", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("image_ext", pa.string()),
        ("caption", pa.string()),
        ("caption_model", pa.string()),
        ("caption_input", pa.string()),
        ("phrases", pa.list_(_PHRASE_TYPE)),
        ("regions", pa.list_(_REGION_TYPE)),
        ("proposals", pa.list_(_PROPOSAL_TYPE)),
        ("num_regions", pa.int32()),
        ("num_proposals", pa.int32()),
        ("num_dropped", pa.int32()),
        ("num_turns", pa.int32()),
    ]
)

REJECTS_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("key", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
    ]
)

# Reason prefix of an image whose stage raised (a bug, a model that could not run): not the image's fault,
# so a rerun processes it again; every other reject (undecodable, too small, NSFW, ...) is final.
STAGE_ERROR = "stage error"


def is_retried(reason: str | None) -> bool:
    """True for rejects that a rerun processes again (`stage error`), False for final (content) rejects."""
    return bool(reason) and reason.startswith(STAGE_ERROR)


def final_rejects(parts: list[tuple[str, pa.Table]], record_uris: set[str]) -> pa.Table:
    """The rejects that still stand: `parts` are (part name, rejects table) in any order.

    A `stage error` row is superseded once a later attempt of its uri exists: a record, or a reject row in
    a later part (part names sort by run). Content rejects always stand.
    """
    ordered = sorted(parts, key=lambda pair: pair[0])
    last_part: dict[str, str] = {}
    for name, table in ordered:
        for uri in table["uri"].to_pylist():
            last_part[uri] = name
    kept = []
    for name, table in ordered:
        uris, reasons = table["uri"].to_pylist(), table["reason"].to_pylist()
        keep = [
            not is_retried(reason) or (uri not in record_uris and last_part[uri] == name)
            for uri, reason in zip(uris, reasons, strict=True)
        ]
        kept.append(table.filter(pa.array(keep, pa.bool_())) if not all(keep) else table)
    if not kept:
        return REJECTS_SCHEMA.empty_table()
    return pa.concat_tables(kept, promote_options="default")


def to_index_row(record: dict[str, Any], shard: str) -> dict[str, Any]:
    """Flatten a (valid) record into one row of INDEX_SCHEMA."""
    return {
        "key": record["key"],
        "schema_version": record["schema_version"],
        "shard": shard,
        "source_uri": record["source"]["uri"],
        "source_dataset": record["source"].get("dataset", ""),
        "width": record["width"],
        "height": record["height"],
        "image_ext": record["image_ext"],
        "caption": record["caption"]["text"],
        "caption_model": record["caption"].get("model", ""),
        "caption_input": record["caption"].get("input"),
        "phrases": [{"text": p["text"], "start": p["start"], "end": p["end"]} for p in record["phrases"]],
        "regions": [
            {
                "id": r["id"],
                "box": [float(v) for v in r["box"]],
                "score": float(r["score"]),
                "phrase": r["phrase"],
                "category": r["category"],
                "short_phrase": r.get("short_phrase"),
                "description": r.get("description"),
                "referring": r.get("referring"),
                "has_mask": r.get("mask") is not None,
            }
            for r in record["regions"]
        ],
        "proposals": [
            {
                "box": [float(v) for v in p["box"]],
                "score": float(p["score"]),
                "granularity": p.get("granularity"),
            }
            for p in record.get("proposals", [])
        ],
        "num_regions": len(record["regions"]),
        "num_proposals": len(record.get("proposals", [])),
        "num_dropped": len(record.get("dropped", [])),
        "num_turns": len(record.get("grounded_conversation") or []),
    }
