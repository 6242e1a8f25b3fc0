"""Exports in formats trainers already read: COCO (+ captions), ODVG (Grounding DINO), LLaVA conversations.

Every export is streamed (memory does not grow with the number of records). Images are referenced as
`{key}.{ext}`, the member name inside the release shards; extracting the tars into
one folder gives the image root every export expects. Region texts that a region did not reach (null tiers)
are left out rather than written as empty strings.

The LLaVA export reuses ChatRex's own prompt templates, box mixing and answer formatting (`chatrex.tasks`,
`chatrex.parsing`, `chatrex.processor` tokens), so it is exactly what ChatRex training would see.
"""

from __future__ import annotations

import random
import tempfile
from contextlib import ExitStack
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
from engine.storage import Folder
from release.canonical import dumps
from release.tiers import has

LLAVA_MAX_BOXES = 100  # ChatRex's default number of index tokens


def _file_name(record: dict[str, Any]) -> str:
    return f"{record['key']}.{record['image_ext']}"


class JsonArray:
    """A JSON array written item by item (canonical JSON per item), so no export is held in memory."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.count = 0
        stream.write(b"[")

    def add(self, item: Any) -> None:
        self.stream.write((b"," if self.count else b"") + dumps(item).encode())
        self.count += 1

    def close(self) -> None:
        self.stream.write(b"]")


class Exporter:
    """Streams every export while records pass by once, in release order; use as a context manager.

    Category ids are given in order of first appearance (release order is fixed, so ids are stable for a
    given release) and the category list is written at the end. COCO's `images` array follows its
    `annotations` in the file (keys sorted, as canonical JSON has them), so image entries are spooled to a
    local temporary file meanwhile.
    """

    def __init__(self, dest: Folder, info: dict[str, Any]) -> None:
        self.dest, self.info = dest, info
        self.category_id: dict[str, int] = {}
        self.images = 0
        self.stack = ExitStack()

    def __enter__(self) -> Exporter:
        def output(name: str) -> Any:
            return self.stack.enter_context(self.dest.open_write(f"exports/{name}"))

        self.coco, self.captions = output("coco.json"), output("coco_captions.json")
        self.odvg, self.detection = output("odvg.jsonl"), output("odvg_detection.jsonl")
        self.label_map, self.llava_stream = output("odvg_label_map.json"), output("llava.json")
        self.spool = self.stack.enter_context(tempfile.TemporaryFile())
        self.images_array = JsonArray(self.spool)
        self.coco.write(b'{"annotations":')
        self.annotations = JsonArray(self.coco)
        self.captions.write(b'{"annotations":')
        self.caption_array = JsonArray(self.captions)
        self.llava = JsonArray(self.llava_stream)
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self._finish()
        self.stack.__exit__(*exc)

    def add(self, record: dict[str, Any], split: str, shard: str) -> None:
        self.images += 1
        image_id = self.images
        self.images_array.add(
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
        self.caption_array.add({"id": image_id, "image_id": image_id, "caption": record["caption"]["text"]})
        regions = [r for r in record.get("regions", []) if has(r, "category")]
        for region in regions:
            cid = self.category_id.setdefault(region["category"], len(self.category_id) + 1)
            self.annotations.add(coco_annotation(self.annotations.count + 1, image_id, region, cid))
        head = {"filename": _file_name(record), "height": record["height"], "width": record["width"]}
        phrases = record.get("phrases", [])
        grounding = [
            {"bbox": [float(v) for v in r["box"]], "phrase": phrases[r["phrase"]]["text"]}
            for r in record.get("regions", [])
            if 0 <= r.get("phrase", -1) < len(phrases)
        ]
        line = {**head, "grounding": {"caption": record["caption"]["text"], "regions": grounding}}
        self.odvg.write((dumps(line) + "\n").encode())
        instances = [
            {
                "bbox": [float(v) for v in r["box"]],
                "label": self.category_id[r["category"]] - 1,
                "category": r["category"],
            }
            for r in regions
        ]
        self.detection.write((dumps({**head, "detection": {"instances": instances}}) + "\n").encode())
        self.llava.add(llava_sample(record, split))

    def _finish(self) -> None:
        self.images_array.close()
        categories = [{"id": i, "name": n, "supercategory": "object"} for n, i in self.category_id.items()]
        self.annotations.close()
        self.coco.write(b',"categories":' + dumps(categories).encode() + b',"images":')
        self._copy_images(self.coco)
        self.coco.write(b',"info":' + dumps(self.info).encode() + b"}")
        self.caption_array.close()
        self.captions.write(b',"images":')
        self._copy_images(self.captions)
        self.captions.write(b',"info":' + dumps(self.info).encode() + b"}")
        self.label_map.write(dumps({str(i - 1): n for n, i in self.category_id.items()}).encode())
        self.llava.close()

    def _copy_images(self, stream: Any) -> None:
        self.spool.seek(0)
        while chunk := self.spool.read(1 << 22):
            stream.write(chunk)


def coco_annotation(ann_id: int, image_id: int, region: dict[str, Any], category_id: int) -> dict[str, Any]:
    x0, y0, x1, y1 = (float(v) for v in region["box"])
    ann: dict[str, Any] = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
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
