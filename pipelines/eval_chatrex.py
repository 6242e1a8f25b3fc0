"""Evaluate ChatRex with Ray Data batch inference: detection P/R/F1@0.5 (+ COCO mAP), referring, naming.

    python pipelines/eval_chatrex.py --model out/chatrex/model --shards out/fixture/shards --output out/eval
    python pipelines/eval_chatrex.py --model out/chatrex/model --coco gt.json --proposals dets.json --output o

Detection follows the paper: each image is asked for each of its ground-truth categories ("Detect every
cat in the image."); the indices in the answer select input boxes, which are matched one-to-one to the
category's ground-truth boxes at IoU 0.5. Referring: the first box of the answer to "Which object is
<referring expression>?" must overlap the region by IoU 0.5. Naming: "What is <objN>?" must give the
category name.
`chance_R@0.5` is the recall of picking as many input boxes at random as the category has ground truth.

Input boxes: `--boxes mixed` (default for shards) shows the record's regions mixed with its proposals, as in
training; `--boxes proposals` shows only the proposals (default with --proposals), the paper's setting.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import random
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatrex.data import sample_seed  # noqa: E402
from chatrex.metrics import DetectionCounts, coco_map, iou_at_least  # noqa: E402
from chatrex.parsing import parse_answer, strip_tags  # noqa: E402
from chatrex.tasks import DETECT_QUESTION, REFER_QUESTION, REGION_QUESTIONS, InputBoxes, mix_boxes  # noqa: E402
from engine.config import RayConfig  # noqa: E402
from stages.text import parse_category  # noqa: E402

log = logging.getLogger("rexverse.eval")
TASKS = ("detection", "referring", "naming")


# --- questions -------------------------------------------------------------------------------------------


def records_from_shards(specs: list[str]) -> Iterator[tuple[dict[str, Any], bytes]]:
    """(record, image bytes) of local or remote (s3://, gs://) shards, in shard order; needs Ray running."""
    import ray

    from chatrex.data import IMAGE_KEYS
    from pipelines.train_chatrex import shard_paths

    rows = ray.data.read_webdataset(shard_paths(specs), decoder=None).iter_rows()
    for row in rows:
        record = json.loads(bytes(row["json"]))
        yield record, bytes(next(row[k] for k in IMAGE_KEYS if row.get(k) is not None))


def input_boxes(record: dict[str, Any], mode: str, max_boxes: int, seed: int) -> InputBoxes:
    rng = random.Random(sample_seed(seed, 0, record["key"]))
    if mode == "proposals":
        proposals = sorted(record.get("proposals", []), key=lambda p: -p["score"])[:max_boxes]
        return InputBoxes([p["box"] for p in proposals], [p["score"] for p in proposals], {})
    return mix_boxes(record, max_boxes, rng)


def questions(
    record: dict[str, Any], image: bytes, tasks: tuple[str, ...], mode: str, max_boxes: int, seed: int
) -> list[dict[str, Any]]:
    """Every evaluation question about one record, with what scoring needs."""
    base = {"key": record["key"], "dataset": record["source"].get("dataset", ""), "image": image}
    shown = input_boxes(record, mode, max_boxes, seed)
    items = []
    if "detection" in tasks and shown.boxes:
        by_category: dict[str, list[list[float]]] = defaultdict(list)
        for region in record["regions"]:
            by_category[region["category"]].append(region["box"])
        for category in sorted(by_category):
            items.append(
                base
                | {
                    "task": "detection",
                    "question": DETECT_QUESTION.format(category=category),
                    "boxes": shown.boxes,
                    "scores": shown.scores,
                    "category": category,
                    "gt_boxes": by_category[category],
                    "gt_box": [],
                }
            )
    mixed = shown if mode == "mixed" else input_boxes(record, "mixed", max_boxes, seed)
    for region in record["regions"]:
        if "referring" in tasks and shown.boxes and region.get("referring"):  # tiered records: maybe null
            items.append(
                base
                | {
                    "task": "referring",
                    "question": REFER_QUESTION.format(referring=region["referring"]),
                    "boxes": shown.boxes,
                    "scores": shown.scores,
                    "category": region["category"],
                    "gt_boxes": [],
                    "gt_box": region["box"],
                }
            )
        if "naming" in tasks and region["id"] in mixed.region_index:
            index = mixed.region_index[region["id"]]
            items.append(
                base
                | {
                    "task": "naming",
                    "question": REGION_QUESTIONS["category"].format(index=index),
                    "boxes": mixed.boxes,
                    "scores": mixed.scores,
                    "category": region["category"],
                    "gt_boxes": [],
                    "gt_box": region["box"],
                }
            )
    return items


# --- inference -------------------------------------------------------------------------------------------


class ChatRexPredictor:
    """A Ray Data actor: one model load, greedy answers for batches of questions."""

    def __init__(self, model_dir: str, max_new_tokens: int, torch_threads: int = 1) -> None:
        import torch

        from chatrex.modeling import ChatRexForConditionalGeneration
        from chatrex.processor import ChatRexProcessor

        torch.set_num_threads(torch_threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = ChatRexForConditionalGeneration.from_pretrained(model_dir).to(self.device).eval()
        self.processor = ChatRexProcessor.from_pretrained(model_dir)
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np
        import torch
        from PIL import Image

        samples = []
        for image, boxes, question in zip(batch["image"], batch["boxes"], batch["question"], strict=True):
            picture = Image.open(io.BytesIO(bytes(image))).convert("RGB")
            samples.append(self.processor.encode(picture, [list(b) for b in boxes], str(question)))
        inputs = self.processor.collate(samples, padding_side="left")
        inputs = {
            k: [b.to(self.device) for b in v] if k == "boxes" else v.to(self.device)
            for k, v in inputs.items()
        }
        with torch.inference_mode():
            generated = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        answers = self.processor.batch_decode(generated)
        return {"qid": np.asarray(batch["qid"]), "answer": np.asarray(answers, dtype=object)}


def predict(items: list[dict[str, Any]], model_dir: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    import ray
    from ray.data import ActorPoolStrategy

    for i, item in enumerate(items):
        item["qid"] = i
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items) // (args.batch_size * 4)))
    ds = ds.map_batches(
        ChatRexPredictor,
        fn_constructor_kwargs={"model_dir": model_dir, "max_new_tokens": args.max_new_tokens},
        batch_size=args.batch_size,
        compute=ActorPoolStrategy(size=args.num_actors),
        num_cpus=args.cpus_per_actor,
        num_gpus=args.gpus_per_actor,
    )
    answers = {int(row["qid"]): str(row["answer"]) for row in ds.take_all()}
    return [item | {"answer": answers[item["qid"]]} for item in items]


# --- scoring ---------------------------------------------------------------------------------------------


def score(predictions: list[dict[str, Any]], seed: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics per dataset (and 'all'), and the per-question records written to predictions.jsonl."""
    rng = random.Random(seed)
    det, chance = defaultdict(DetectionCounts), defaultdict(DetectionCounts)
    hits: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    coco_gt: dict[str, Any] = {"images": [], "annotations": [], "categories": []}
    detections: list[dict[str, Any]] = []
    image_ids: dict[str, int] = {}
    category_ids: dict[str, int] = {}
    scored_all_boxes = True
    rows = []
    for p in predictions:
        boxes = [list(map(float, b)) for b in p["boxes"]]
        groups = parse_answer(p["answer"], len(boxes))
        indices = [i for g in groups for i in g.indices]
        row = {
            "key": p["key"],
            "task": p["task"],
            "question": p["question"],
            "answer": p["answer"],
            "indices": indices,
        }
        gt = [list(map(float, b)) for b in p["gt_boxes"]]
        guess = rng.sample(range(len(boxes)), k=min(len(gt), len(boxes))) if p["task"] == "detection" else []
        for dataset in (p["dataset"], "all"):
            if p["task"] == "detection":
                picked = [boxes[i] for i in dict.fromkeys(indices)]
                det[dataset].add(picked, gt)
                chance[dataset].add([boxes[i] for i in guess], gt)
            elif p["task"] == "referring":
                top = boxes[indices[0]] if indices else None
                hits["referring"][dataset].append(iou_at_least(top, list(map(float, p["gt_box"]))))
            else:
                name = parse_category(strip_answer(p["answer"]), 4)
                hits["naming"][dataset].append(name == p["category"].lower())
        if p["task"] == "detection":
            image_id = image_ids.setdefault(p["key"], len(image_ids) + 1)
            category_id = category_ids.setdefault(p["category"], len(category_ids) + 1)
            for box in p["gt_boxes"]:
                x0, y0, x1, y1 = map(float, box)
                coco_gt["annotations"].append(
                    {
                        "id": len(coco_gt["annotations"]) + 1,
                        "image_id": image_id,
                        "category_id": category_id,
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": (x1 - x0) * (y1 - y0),
                        "iscrowd": 0,
                    }
                )
            scores = list(p["scores"]) if len(p["scores"]) == len(boxes) else []
            scored_all_boxes &= bool(scores) or not boxes
            for i in dict.fromkeys(indices):
                x0, y0, x1, y1 = boxes[i]
                detections.append(
                    {
                        "image_id": image_id,
                        "category_id": category_id,
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "score": float(scores[i]) if scores else 1.0,
                    }
                )
        rows.append(row)
    coco_gt["images"] = [{"id": i} for i in image_ids.values()]
    coco_gt["categories"] = [{"id": i, "name": n} for n, i in category_ids.items()]
    metrics: dict[str, Any] = {}
    for dataset in sorted(set(det) | set(hits["referring"]) | set(hits["naming"])):
        entry: dict[str, Any] = {}
        if dataset in det:
            entry["detection"] = det[dataset].to_dict() | {
                "chance_R@0.5": round(chance[dataset].recall, 4),
                "chance_P@0.5": round(chance[dataset].precision, 4),
            }
        for task in ("referring", "naming"):
            if hits[task].get(dataset):
                values = hits[task][dataset]
                entry[task] = {"accuracy": round(sum(values) / len(values), 4), "questions": len(values)}
        metrics[dataset] = entry
    if scored_all_boxes and detections:
        metrics.setdefault("all", {}).setdefault("detection", {}).update(coco_map(coco_gt, detections))
    return metrics, rows


def strip_answer(answer: str) -> str:
    return strip_tags(answer)


def table(metrics: dict[str, Any]) -> str:
    names = ("P@0.5", "R@0.5", "F1", "chanceR", "mAP", "AP50", "refer", "naming")
    widths = (8, 8, 8, 9, 8, 8, 8, 8)
    header = f"{'dataset':<14}" + "".join(f"{n:>{w}}" for n, w in zip(names, widths, strict=True))
    lines = [header, "-" * len(header)]
    for dataset, entry in metrics.items():
        d = entry.get("detection", {})
        cells = [
            d.get("P@0.5"),
            d.get("R@0.5"),
            d.get("F1@0.5"),
            d.get("chance_R@0.5"),
            d.get("mAP"),
            d.get("AP50"),
            entry.get("referring", {}).get("accuracy"),
            entry.get("naming", {}).get("accuracy"),
        ]
        lines.append(
            f"{dataset:<14}"
            + "".join(f"{'-' if c is None else f'{c:.3f}':>{w}}" for c, w in zip(cells, widths, strict=True))
        )
    return "\n".join(lines)


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from chatrex.coco import iter_coco_records
    from engine.models import resolve_model
    from engine.runtime import init_ray

    tasks = tuple(t for t in args.tasks.split(",") if t)
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise SystemExit(f"unknown --tasks {sorted(unknown)}; choose from {TASKS}")
    import ray

    started = init_ray(RayConfig(show_progress=not args.quiet), namespace="chatrex-eval")
    try:
        if args.coco:
            source = iter_coco_records(
                args.coco, args.images, args.proposals, args.distractors, args.seed, args.limit
            )
            mode = args.boxes or ("proposals" if args.proposals or args.distractors else "mixed")
        else:
            source = records_from_shards(args.shards)
            mode = args.boxes or "mixed"
        items = []
        for n, (record, image) in enumerate(source):
            if args.limit is not None and n >= args.limit:
                break
            items += questions(record, image, tasks, mode, args.max_boxes, args.seed)
        if not items:
            raise SystemExit("no evaluation question: are there records with regions?")
        log.info("%d questions (%s), input boxes: %s", len(items), ", ".join(tasks), mode)
        predictions = predict(items, resolve_model(args.model), args)
    finally:
        if started:
            ray.shutdown()
    metrics, rows = score(predictions, args.seed)
    args.output.mkdir(parents=True, exist_ok=True)
    report = {
        "model": args.model,
        "boxes": mode,
        "tasks": list(tasks),
        "questions": len(items),
        "metrics": metrics,
    }
    (args.output / "metrics.json").write_text(json.dumps(report, indent=2))
    (args.output / "metrics.md").write_text("```\n" + table(metrics) + "\n```\n")
    with open(args.output / "predictions.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    print(table(metrics), flush=True)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a trained ChatRex folder or tiny:chatrex")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", action="append", help="Rexverse shards (folder, .tar, glob)")
    source.add_argument("--coco", type=Path, help="COCO ground truth json")
    parser.add_argument("--images", type=Path, default=None, help="COCO image folder (default: the json's)")
    parser.add_argument("--proposals", type=Path, default=None, help="COCO detection results as input boxes")
    parser.add_argument(
        "--distractors", type=int, default=0, help="random boxes added to each image's proposals"
    )
    parser.add_argument("--boxes", choices=("mixed", "proposals"), default=None)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--max-boxes", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-actors", type=int, default=1)
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--gpus-per-actor", type=float, default=0.0)
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    evaluate(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
