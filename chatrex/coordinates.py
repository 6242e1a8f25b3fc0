"""The other way to answer with boxes: coordinates written as text (the comparison of the paper's claim).

Shikra / Qwen2-VL style: no candidate boxes enter the prompt; the answer writes each box as four integers,
the corners quantised to 0-999 of the image's width and height, e.g.

    <ground>circle</ground><objects>[102,340,251,512][600,80,700,190]</objects>

The same grounding tags and the same questions as ChatRex's task mix (`chatrex/tasks.py`), so the two
answer formats differ only in how a box is named. Region questions name their box by its coordinates.
`parse_coordinates` reads any generation without raising.
"""

from __future__ import annotations

import random
import re
from typing import Any

from chatrex.processor import GROUND_END, GROUND_START, OBJECTS_END, OBJECTS_START
from chatrex.tasks import (
    COUNT_QUESTION,
    DETECT_MANY_QUESTION,
    DETECT_QUESTION,
    IMAGE_CAPTION_QUESTION,
    TASKS,
    TaskSample,
)

REGION_CATEGORY_QUESTION = "What is the object at {box}? Answer with its category name."
_BOX = re.compile(r"\[\s*(\d{1,3})\s*,\s*(\d{1,3})\s*,\s*(\d{1,3})\s*,\s*(\d{1,3})\s*\]")
COORDINATE_TASKS = ("detect", "detect_many", "region", "count", "image_caption")


def quantise(box: list[float], width: float, height: float) -> list[int]:
    """Absolute xyxy pixels -> integers 0-999 of the image's width / height."""
    scale = (width, height, width, height)
    return [min(999, max(0, int(v / s * 1000))) for v, s in zip(box, scale, strict=True)]


def box_text(box: list[float], width: float, height: float) -> str:
    return "[" + ",".join(str(v) for v in quantise(box, width, height)) + "]"


def parse_coordinates(answer: str, width: float, height: float) -> list[list[float]]:
    """Every `[x0,y0,x1,y1]` in the answer, back to absolute pixels (cell centres), in order."""
    boxes = []
    for match in _BOX.finditer(answer):
        x0, y0, x1, y1 = ((int(v) + 0.5) / 1000 for v in match.groups())
        boxes.append([x0 * width, y0 * height, x1 * width, y1 * height])
    return boxes


def _group(phrase: str, boxes: list[list[float]], width: float, height: float) -> str:
    inner = "".join(box_text(b, width, height) for b in boxes)
    return f"{GROUND_START}{phrase}{GROUND_END}{OBJECTS_START}{inner}{OBJECTS_END}"


def coordinate_task(
    record: dict[str, Any], rng: random.Random, weights: dict[str, float]
) -> TaskSample | None:
    """One sample of the coordinate-answer task mix (tasks outside `COORDINATE_TASKS` are not drawn)."""
    width, height = record["width"], record["height"]
    regions = record.get("regions", [])
    groups: dict[str, list[list[float]]] = {}
    for region in regions:
        groups.setdefault(region["category"], []).append(region["box"])
    names = [t for t in TASKS if t in COORDINATE_TASKS and weights.get(t, 0) > 0]
    while names:
        task = rng.choices(names, weights=[weights[t] for t in names])[0]
        names.remove(task)
        if task == "image_caption":
            text = (record.get("caption") or {}).get("text", "")
            if text:
                return TaskSample(task, IMAGE_CAPTION_QUESTION, text)
            continue
        if not regions:
            continue
        if task == "detect":
            category = rng.choice(sorted(groups))
            answer = _group(category, groups[category], width, height)
            return TaskSample(task, DETECT_QUESTION.format(category=category), answer)
        if task == "detect_many":
            categories = rng.sample(sorted(groups), k=min(len(groups), rng.randint(1, 3)))
            answer = "".join(_group(c, groups[c], width, height) for c in categories)
            return TaskSample(task, DETECT_MANY_QUESTION.format(categories=", ".join(categories)), answer)
        if task == "region":
            region = rng.choice(regions)
            question = REGION_CATEGORY_QUESTION.format(box=box_text(region["box"], width, height))
            return TaskSample("region_category", question, region["category"])
        if task == "count":
            category = rng.choice(sorted(groups))
            answer = f"{len(groups[category])} " + _group(category, groups[category], width, height)
            return TaskSample(task, COUNT_QUESTION.format(category=category), answer)
    return None
