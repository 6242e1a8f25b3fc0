"""Exports in formats trainers already read: COCO (+ captions), ODVG (Grounding DINO), LLaVA conversations.

Images are referenced as `{key}.{ext}`, the member name inside the release shards; extracting the tars into
one folder gives the image root every export expects. Region texts that a region did not reach (null tiers)
are left out rather than written as empty strings.

The LLaVA export reuses ChatRex's own prompt templates, box mixing and answer formatting (`chatrex.tasks`,
`chatrex.parsing`, `chatrex.processor` tokens), so it is exactly what ChatRex training would see.
"""

from __future__ import annotations

import random
from typing import Any

from pycocotools import mask as mask_utils

from chatrex.parsing import Grounding, format_answer
from chatrex.processor import IMAGE_TOKEN, OBJECT_TOKEN, object_index_token
from chatrex.tasks import (
    DETECT_QUESTION,
    PHRASE_QUESTION,
    REFER_QUESTION,
    REGION_QUESTIONS,
    caption_task,
    detection_answer,
    mix_boxes,
)
from release.canonical import dumps
from release.tiers import has

LLAVA_MAX_BOXES = 100  # ChatRex's default number of index tokens


def _file_name(record: dict[str, Any]) -> str:
    return f"{record['key']}.{record['image_ext']}"


class Exporter:
    """Feed records in release order with `add`; `files()` gives exports/ file name -> bytes."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.captions: list[dict[str, Any]] = []
        self.pending: list[tuple[int, dict[str, Any]]] = []  # (image id, region) until categories are known
        self.odvg: list[str] = []
        self.odvg_detection: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
        self.llava: list[dict[str, Any]] = []

    def add(self, record: dict[str, Any], split: str, shard: str) -> None:
        image_id = len(self.images) + 1
        self.images.append(
            {
                "id": image_id,
                "file_name": _file_name(record),
                "width": record["width"],
                "height": record["height"],
                "rexverse_key": record["key"],
                "split": split,
                "shard": shard,
            }
        )
        self.captions.append({"id": image_id, "image_id": image_id, "caption": record["caption"]["text"]})
        for region in record.get("regions", []):
            self.pending.append((image_id, region))
        self._odvg(record)
        self.llava.append(llava_sample(record, split))

    def _odvg(self, record: dict[str, Any]) -> None:
        phrases = record.get("phrases", [])
        regions = record.get("regions", [])
        head = {"filename": _file_name(record), "height": record["height"], "width": record["width"]}
        grounding = [
            {"bbox": [float(v) for v in r["box"]], "phrase": phrases[r["phrase"]]["text"]}
            for r in regions
            if 0 <= r.get("phrase", -1) < len(phrases)
        ]
        self.odvg.append(
            dumps({**head, "grounding": {"caption": record["caption"]["text"], "regions": grounding}})
        )
        self.odvg_detection.append((head, regions))

    def files(self) -> dict[str, bytes]:
        names = sorted({r["category"] for _, r in self.pending if has(r, "category")})
        category_id = {name: i + 1 for i, name in enumerate(names)}
        for image_id, region in self.pending:
            if not has(region, "category"):
                continue
            self.annotations.append(coco_annotation(len(self.annotations) + 1, image_id, region, category_id))
        categories = [{"id": i, "name": n, "supercategory": "object"} for n, i in category_id.items()]
        coco = {
            "info": self.info,
            "images": self.images,
            "annotations": self.annotations,
            "categories": categories,
        }
        captions = {"info": self.info, "images": self.images, "annotations": self.captions}
        label_map = {str(i - 1): n for n, i in category_id.items()}
        detection = [
            dumps(
                {
                    **head,
                    "detection": {
                        "instances": [
                            {
                                "bbox": [float(v) for v in r["box"]],
                                "label": category_id[r["category"]] - 1,
                                "category": r["category"],
                            }
                            for r in regions
                            if has(r, "category")
                        ]
                    },
                }
            )
            for head, regions in self.odvg_detection
        ]
        return {
            "coco.json": dumps(coco).encode(),
            "coco_captions.json": dumps(captions).encode(),
            "odvg.jsonl": "".join(line + "\n" for line in self.odvg).encode(),
            "odvg_detection.jsonl": "".join(line + "\n" for line in detection).encode(),
            "odvg_label_map.json": dumps(label_map).encode(),
            "llava.json": dumps(self.llava).encode(),
        }


def coco_annotation(
    ann_id: int, image_id: int, region: dict[str, Any], category_id: dict[str, int]
) -> dict[str, Any]:
    x0, y0, x1, y1 = (float(v) for v in region["box"])
    ann: dict[str, Any] = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id[region["category"]],
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "area": (x1 - x0) * (y1 - y0),
        "iscrowd": 0,
        "score": float(region.get("score", 1.0)),
        "region_id": region["id"],
    }
    mask = region.get("mask")
    if mask is not None:
        rle = {"size": list(mask["size"]), "counts": mask["counts"]}
        ann["segmentation"] = rle
        ann["area"] = float(mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode()}))
    for tier in ("short_phrase", "description", "referring"):
        if has(region, tier):
            ann[tier] = region[tier]
    return ann


def llava_sample(record: dict[str, Any], split: str) -> dict[str, Any]:
    """One multi-turn LLaVA conversation over ChatRex's input boxes (regions mixed with proposals).

    The box mix is seeded by the key, so the export is reproducible. Turns: grounded caption, detection per
    category, then per region every tier it reached (region understanding) and grounding by short phrase
    and by referring expression.
    """
    rng = random.Random(record["key"])
    boxes = mix_boxes(record, LLAVA_MAX_BOXES, rng)
    turns: list[tuple[str, str]] = []
    caption = caption_task(record, boxes)
    if caption is not None:
        turns.append((caption.question, caption.answer))
    regions = [r for r in record.get("regions", []) if r["id"] in boxes.region_index]
    groups: dict[str, list[int]] = {}
    for r in regions:
        if has(r, "category"):
            groups.setdefault(r["category"], []).append(boxes.region_index[r["id"]])
    groups = {c: sorted(v) for c, v in groups.items()}
    for category in sorted(groups):
        turns.append((DETECT_QUESTION.format(category=category), detection_answer([category], groups)))
    for r in sorted(regions, key=lambda r: boxes.region_index[r["id"]]):
        index = boxes.region_index[r["id"]]
        for tier in sorted(REGION_QUESTIONS):
            if has(r, tier):
                turns.append((REGION_QUESTIONS[tier].format(index=index), r[tier]))
        if has(r, "short_phrase"):
            answer = format_answer([Grounding(r["short_phrase"], [index])])
            turns.append((PHRASE_QUESTION.format(phrase=r["short_phrase"]), answer))
        if has(r, "referring"):
            answer = format_answer([Grounding(r["referring"], [index])])
            turns.append((REFER_QUESTION.format(referring=r["referring"]), answer))
    objects = "".join(object_index_token(i) + OBJECT_TOKEN for i in range(len(boxes.boxes)))
    conversations = []
    for i, (question, answer) in enumerate(turns):
        value = f"{IMAGE_TOKEN}\n{objects}\n{question}" if i == 0 else question
        conversations += [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]
    return {
        "id": record["key"],
        "image": _file_name(record),
        "split": split,
        "width": record["width"],
        "height": record["height"],
        "boxes": boxes.boxes,
        "box_scores": boxes.scores,
        "conversations": conversations,
    }
