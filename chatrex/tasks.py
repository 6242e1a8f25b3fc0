"""The ChatRex task mix built from one Rexverse record (paper §4.2, App. B.2).

Input boxes are the record's regions mixed with its class-agnostic proposals, shuffled, at most N (the paper
mixes ground truth with proposal-network boxes and keeps at most 100); a proposal that duplicates a region
(IoU above `duplicate_iou`) is left out, or the answer would be ambiguous. Tasks, each a single-turn
question and answer over those boxes:

- detection: by category (one or several categories in one question) -> indices of all its regions;
- grounding: by short phrase or by referring expression -> index of that region;
- region understanding at four granularities, given an index: category, short phrase, referring
  expression, one-sentence description;
- brief grounded caption: the caption with its grounded phrases pointing at indices;
- counting: how many regions of a category, with the grounding;
- image caption (no boxes): the record's caption in words, for the alignment stage's image-caption pairs.

Which tasks a training stage draws is `STAGE_WEIGHTS` (paper §3.3, App. B.2): `alignment` image-caption
pairs; `perception` detection, phrase and referring grounding, region understanding (and counting);
`joint` the perception mix plus grounded captioning. The paper's joint stage also has grounded
conversations; no Rexverse record carries one yet, so the joint mix has none.

Question templates are module constants, shared by training and evaluation. Records are tiered (schema
1.2): every region has a category, the other texts only where they passed their checks, so each task draws
from the regions that carry its text (detection/counting from all regions, phrase grounding from regions
with a short phrase, referring from regions with a referring expression, region understanding from the
texts a region has).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.ops import box_iou

from chatrex.parsing import Grounding, format_answer, format_grounded_text

DETECT_QUESTION = "Detect every {category} in the image."
DETECT_MANY_QUESTION = "Detect the following objects in the image: {categories}."
PHRASE_QUESTION = "Find the region that matches this phrase: {phrase}."
REFER_QUESTION = "Which object is {referring}?"
REGION_QUESTIONS = {
    "category": "What is <obj{index}>? Answer with its category name.",
    "short_phrase": "Describe <obj{index}> with a short phrase.",
    "referring": "Write a brief referring expression for <obj{index}>.",
    "description": "Describe <obj{index}> in one sentence.",
}
CAPTION_QUESTION = "Briefly describe the image and ground the objects you mention."
IMAGE_CAPTION_QUESTION = "Briefly describe the image."
COUNT_QUESTION = "How many {category} are in the image?"

TASKS = ("detect", "detect_many", "phrase", "refer", "region", "caption", "count", "image_caption")
PERCEPTION_WEIGHTS = {
    "detect": 3.0,
    "detect_many": 1.0,
    "phrase": 1.0,
    "refer": 1.0,
    "region": 2.0,
    "count": 0.5,
}
STAGE_WEIGHTS = {
    "alignment": {"image_caption": 1.0},
    "perception": PERCEPTION_WEIGHTS,
    "joint": PERCEPTION_WEIGHTS | {"caption": 1.5},
}
DEFAULT_WEIGHTS = STAGE_WEIGHTS["joint"]


@dataclass
class InputBoxes:
    """The boxes shown to the model (absolute xyxy), and where each region landed among them."""

    boxes: list[list[float]]
    scores: list[float]
    region_index: dict[int, int]  # region id -> box index
    # region id -> every box that covers it (IoU >= 0.5, its best-overlapping region); `proposals` mode only
    covers: dict[int, list[int]] | None = None


@dataclass
class TaskSample:
    task: str
    question: str
    answer: str


def mix_boxes(
    record: dict[str, Any],
    max_boxes: int,
    rng: random.Random,
    duplicate_iou: float = 0.7,
    candidates: str = "mixed",
) -> InputBoxes:
    """Regions (all, up to `max_boxes`) plus non-duplicate proposals, shuffled; regions never fall out.

    `candidates="proposals"` instead shows the proposals only (as evaluation does): each region is named by
    the proposal a one-to-one matching at IoU >= 0.5 assigns to it (regions without one are left out of the
    questions), and detection-style answers list every proposal that covers it (`covers`): training on the
    candidate distribution the evaluation sees.
    """
    if candidates == "proposals":
        return assign_proposals(record, max_boxes, rng)
    if candidates != "mixed":
        raise ValueError(f"candidates must be 'mixed' or 'proposals', got {candidates!r}")
    regions = list(record.get("regions", []))[:max_boxes]
    proposals = sorted(record.get("proposals", []), key=lambda p: -p.get("score", 0.0))
    if regions and proposals:
        ious = box_iou(torch.tensor([p["box"] for p in proposals]), torch.tensor([r["box"] for r in regions]))
        proposals = [p for p, row in zip(proposals, ious, strict=True) if float(row.max()) <= duplicate_iou]
    proposals = proposals[: max(0, max_boxes - len(regions))]
    entries = [("region", r) for r in regions] + [("proposal", p) for p in proposals]
    rng.shuffle(entries)
    region_index = {item["id"]: i for i, (kind, item) in enumerate(entries) if kind == "region"}
    scores = [float(item.get("score", 1.0)) for _, item in entries]
    return InputBoxes([list(map(float, item["box"])) for _, item in entries], scores, region_index)


def assign_proposals(record: dict[str, Any], max_boxes: int, rng: random.Random) -> InputBoxes:
    """Proposals only, shuffled, at most `max_boxes`; each region -> its matched proposal (IoU >= 0.5).

    `covers` lists, per matched region, every proposal whose best-overlapping region it is at IoU >= 0.5.
    A proposal network gives several boxes per object (the synthetic one 1-2 jittered copies); they look
    alike, so a detection answer that names only the matched one would ask the model to tell near-identical
    boxes apart by a rule it cannot see. Detection answers name them all; evaluation suppresses the
    duplicates among answered boxes (`chatrex.scoring.suppress_duplicates`).
    """
    from chatrex.metrics import match_pairs

    proposals = sorted(record.get("proposals", []), key=lambda p: -p.get("score", 0.0))[:max_boxes]
    proposals = rng.sample(proposals, k=len(proposals))
    boxes = [list(map(float, p["box"])) for p in proposals]
    regions = list(record.get("regions", []))
    region_boxes = [list(map(float, r["box"])) for r in regions]
    pairs = match_pairs(boxes, region_boxes)
    region_index = {regions[j]["id"]: i for i, j in pairs}
    covers: dict[int, list[int]] = {rid: [] for rid in region_index}
    if boxes and regions:
        ious = box_iou(
            torch.tensor(boxes, dtype=torch.float64), torch.tensor(region_boxes, dtype=torch.float64)
        )
        for i, row in enumerate(ious):
            j = int(row.argmax())
            if float(row[j]) >= 0.5 and regions[j]["id"] in covers:
                covers[regions[j]["id"]].append(i)
    for rid, i in region_index.items():  # the matched box always names its region
        covers[rid] = sorted({*covers[rid], i})
    return InputBoxes(boxes, [float(p.get("score", 0.0)) for p in proposals], region_index, covers)


def _by_category(record: dict[str, Any], boxes: InputBoxes) -> dict[str, list[int]]:
    """Category -> the indices a detection answer names (every covering box in `proposals` mode)."""
    groups: dict[str, list[int]] = {}
    for region in record.get("regions", []):
        if region["id"] in boxes.region_index:
            rid = region["id"]
            named = boxes.covers[rid] if boxes.covers is not None else [boxes.region_index[rid]]
            groups.setdefault(region["category"], []).extend(named)
    return {category: sorted(indices) for category, indices in groups.items()}


def detection_answer(categories: Sequence[str], groups: dict[str, list[int]]) -> str:
    """Answer of a detection question: one group per asked category (empty index list if absent)."""
    return format_answer([Grounding(c, groups.get(c, [])) for c in categories])


def make_task(task: str, record: dict[str, Any], boxes: InputBoxes, rng: random.Random) -> TaskSample | None:
    """One sample of `task`, or None when the record cannot support it (e.g. no regions)."""
    if task == "image_caption":
        text = (record.get("caption") or {}).get("text", "")
        return TaskSample(task, IMAGE_CAPTION_QUESTION, text) if text else None
    regions = [r for r in record.get("regions", []) if r["id"] in boxes.region_index]
    groups = _by_category(record, boxes)
    if not regions:
        return None
    if task == "detect":
        category = rng.choice(sorted(groups))
        return TaskSample(
            task, DETECT_QUESTION.format(category=category), detection_answer([category], groups)
        )
    if task == "detect_many":
        categories = rng.sample(sorted(groups), k=min(len(groups), rng.randint(1, 3)))
        question = DETECT_MANY_QUESTION.format(categories=", ".join(categories))
        return TaskSample(task, question, detection_answer(categories, groups))
    if task in ("phrase", "refer", "region"):
        return region_task(task, regions, boxes, rng)
    if task == "caption":
        return caption_task(record, boxes)
    if task == "count":
        category = rng.choice(sorted(groups))
        count = sum(r["category"] == category for r in regions)
        answer = f"{count} " + format_answer([Grounding(category, groups[category])])
        return TaskSample(task, COUNT_QUESTION.format(category=category), answer)
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")


def region_task(
    task: str, regions: list[dict[str, Any]], boxes: InputBoxes, rng: random.Random
) -> TaskSample | None:
    """A task about one region, drawn among the regions that carry the text it needs (None if none does)."""
    needs = {"phrase": "short_phrase", "refer": "referring"}.get(task)
    candidates = [r for r in regions if r.get(needs)] if needs else regions
    if not candidates:
        return None
    region = rng.choice(candidates)
    index = boxes.region_index[region["id"]]
    if task == "phrase":
        answer = format_answer([Grounding(region["short_phrase"], [index])])
        return TaskSample(task, PHRASE_QUESTION.format(phrase=region["short_phrase"]), answer)
    if task == "refer":
        answer = format_answer([Grounding(region["referring"], [index])])
        return TaskSample(task, REFER_QUESTION.format(referring=region["referring"]), answer)
    field = rng.choice([f for f in sorted(REGION_QUESTIONS) if region.get(f)])
    return TaskSample(f"region_{field}", REGION_QUESTIONS[field].format(index=index), region[field])


def caption_task(record: dict[str, Any], boxes: InputBoxes) -> TaskSample | None:
    grounded = record.get("grounded_caption") or {}
    spans = []
    for span in grounded.get("spans", []):
        indices = sorted(boxes.region_index[r] for r in span["regions"] if r in boxes.region_index)
        if indices:
            spans.append((span["start"], span["end"], indices))
    if not spans:
        return None
    return TaskSample("caption", CAPTION_QUESTION, format_grounded_text(record["caption"]["text"], spans))


def sample_task(
    record: dict[str, Any],
    rng: random.Random,
    max_boxes: int,
    weights: dict[str, float] | None = None,
    candidates: str = "mixed",
) -> tuple[InputBoxes, TaskSample] | None:
    """Input boxes and one task drawn by weight (falling back to other tasks the record supports).

    Image captions come without boxes (the alignment stage's image-caption pairs).
    """
    boxes = mix_boxes(record, max_boxes, rng, candidates=candidates)
    weights = weights or DEFAULT_WEIGHTS
    unknown = set(weights) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; choose from {TASKS}")
    names = [t for t in TASKS if weights.get(t, 0) > 0]
    while names:
        task = rng.choices(names, weights=[weights[t] for t in names])[0]
        sample = make_task(task, record, boxes, rng)
        if sample is not None:
            return (InputBoxes([], [], {}) if task == "image_caption" else boxes), sample
        names.remove(task)
    return None
