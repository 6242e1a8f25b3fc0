"""Rexverse records from COCO-format ground truth, so COCO datasets train and evaluate like engine shards.

Region text fields are written from the annotation (category, and optional `attributes` such as colour and
size, as the fixture generator writes them), and a position word from the box. Class-agnostic proposals
come from a COCO detection-results file, or from the synthetic proposal model of `chatrex/proposals.py`
(synthetic benchmark scenes only); never from the annotations.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

from chatrex.proposals import load_proposals, synthetic_proposals
from engine.images import DecodeLimits, decode
from schemas import SCHEMA_VERSION

LIMITS = DecodeLimits(max_bytes=64 << 20, max_pixels=50_000_000, min_side=1, max_aspect=100.0)


def position_word(box: list[float], width: int, height: int) -> str:
    """Where a box sits in the image, in words (part of the referring expression)."""
    cx, cy = (box[0] + box[2]) / 2 / width, (box[1] + box[3]) / 2 / height
    horizontal = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "center"
    vertical = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    if horizontal == "center" and vertical == "middle":
        return "in the center"
    if horizontal == "center":
        return f"at the {vertical}"
    if vertical == "middle":
        return f"on the {horizontal}"
    return f"at the {vertical} {horizontal}"


def _region_text(
    category: str, attributes: dict[str, Any], box: list[float], width: int, height: int
) -> dict[str, str]:
    color, size = attributes.get("color", ""), attributes.get("size", "")
    short = " ".join(w for w in (color, category) if w)
    described = " ".join(w for w in (size, color, category) if w)
    where = position_word(box, width, height)
    return {
        "category": category,
        "short_phrase": short,
        "description": f"A {described} {where}.",
        "referring": f"the {described} {where}",
    }


def record_from_coco_image(
    image: dict[str, Any],
    annotations: list[dict[str, Any]],
    categories: dict[int, str],
    data: bytes,
    uri: str,
    proposals: list[dict[str, Any]],
) -> tuple[dict[str, Any], bytes]:
    """A valid Rexverse record (and the stored image bytes) for one COCO image and its annotations."""
    decoded = decode(data, LIMITS)
    width, height = decoded.width, decoded.height
    names = sorted({categories[a["category_id"]] for a in annotations})
    caption = image.get("caption") or ("An image with " + ", ".join(names) + "." if names else "An image.")
    phrases, phrase_of = [], {}
    for name in names:  # each category points at the first place the caption names it, or is appended
        start = caption.lower().find(name)
        if start < 0:
            caption = caption.rstrip(".") + f", {name}."
            start = caption.lower().find(name, len(caption) - len(name) - 2)
        phrase_of[name] = len(phrases)
        phrases.append(
            {
                "text": caption[start : start + len(name)],
                "start": start,
                "end": start + len(name),
                "head": name,
            }
        )
    regions, annotation_ids = [], []
    for ann in annotations:
        x, y, w, h = ann["bbox"]
        box = [max(0.0, x), max(0.0, y), min(float(width), x + w), min(float(height), y + h)]
        if box[2] <= box[0] or box[3] <= box[1]:
            continue
        name = categories[ann["category_id"]]
        text = _region_text(name, ann.get("attributes", {}), box, width, height)
        annotation_ids.append(ann.get("id"))
        regions.append(
            {
                "id": len(regions),
                "box": box,
                "score": 1.0,
                "phrase": phrase_of[name],
                **text,
                "scores": {},
                "mask": None,
            }
        )
    by_phrase = defaultdict(list)
    for region in regions:
        by_phrase[region["phrase"]].append(region["id"])
    spans = [
        {"start": p["start"], "end": p["end"], "phrase": i, "regions": by_phrase[i]}
        for i, p in enumerate(phrases)
        if by_phrase[i]
    ]
    record = {
        "key": hashlib.sha256(data).hexdigest(),
        "schema_version": SCHEMA_VERSION,
        "source": {"uri": uri, "dataset": "coco"},
        "width": width,
        "height": height,
        "image_ext": decoded.ext,
        "caption": {"text": caption, "model": "ground-truth"},
        "phrases": phrases,
        "regions": regions,
        "grounded_caption": {"text": caption, "spans": spans},
        "proposals": proposals,
        "dropped": [],
        "provenance": {"coco": {"image_id": image["id"], "annotation_ids": annotation_ids}},
    }
    return record, decoded.data


def iter_coco_records(
    coco_json: Path,
    images_dir: Path | None = None,
    proposals_json: Path | None = None,
    synthetic_distractors: int | None = None,
    seed: int = 0,
    limit: int | None = None,
):
    """(record, image bytes) for every image of a COCO file (stable order, boxes clipped to the image).

    Proposals: the detections file's boxes for the image, plus, when `synthetic_distractors` is not None,
    the synthetic proposal model's boxes with that many distractors (seeded by `seed` and the image id).
    """
    coco = json.loads(Path(coco_json).read_text())
    images_dir = Path(images_dir) if images_dir else Path(coco_json).parent
    categories = {c["id"]: c["name"] for c in coco["categories"]}
    by_image = defaultdict(list)
    for ann in coco["annotations"]:
        if not ann.get("iscrowd", 0):
            by_image[ann["image_id"]].append(ann)
    external = load_proposals(proposals_json)
    for n, image in enumerate(sorted(coco["images"], key=lambda im: im["id"])):
        if limit is not None and n >= limit:
            break
        path = images_dir / image["file_name"]
        data = path.read_bytes()
        proposals = list(external.get(image["id"], []))
        width, height = image["width"], image["height"]
        if synthetic_distractors is not None:
            rng = random.Random(f"{seed}:{image['id']}")
            objects = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in by_image[image["id"]])]
            proposals += synthetic_proposals(objects, width, height, synthetic_distractors, rng)
        proposals = [
            {
                "box": [
                    max(0.0, p["box"][0]),
                    max(0.0, p["box"][1]),
                    min(width, p["box"][2]),
                    min(height, p["box"][3]),
                ],
                "score": p["score"],
            }
            for p in proposals
        ]
        proposals = [p for p in proposals if p["box"][2] > p["box"][0] and p["box"][3] > p["box"][1]]
        yield record_from_coco_image(image, by_image[image["id"]], categories, data, str(path), proposals)
