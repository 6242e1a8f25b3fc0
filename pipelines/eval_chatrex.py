"""Evaluate ChatRex with Ray Data batch inference: detection P/R/F1@0.5 + mAP, referring, naming.

    python pipelines/eval_chatrex.py --model out/chatrex/model --shards out/shards --output out/eval
    python pipelines/eval_chatrex.py --model out/chatrex/model --coco gt.json --proposals dets.json --output o

Candidate boxes come from a proposal source only, never from the annotations: the shards' `proposals`, a
COCO detection-results file (`--proposals`; `pipelines/export_proposals.py` writes one from shards), or, for
the synthetic benchmark scenes only, `--synthetic-proposals` (the stand-in proposal model of
`chatrex/proposals.py`). A candidate equal to an annotated box is dropped (and counted) in every case.

Detection follows the paper: each image is asked for each of its ground-truth categories ("Detect every
cat in the image."); the indices in the answer select candidates, matched one-to-one to the category's
ground-truth boxes at IoU 0.5. Beside the model, on the same candidates: random-k, category-blind baselines
and the oracle (`chatrex/scoring.py`). mAP ranks the answered boxes by the model's probability of each
`<objN>` token. Referring: the first box of the answer to "Which object is <referring expression>?" must
overlap the region by IoU 0.5. Naming: "What is <objN>?" about the candidate that best covers a region (IoU
>= 0.5) must give the category name.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatrex.proposals import drop_verbatim, iou_matrix  # noqa: E402
from chatrex.scoring import score  # noqa: E402
from chatrex.tasks import DETECT_QUESTION, REFER_QUESTION, REGION_QUESTIONS  # noqa: E402
from engine.config import RayConfig  # noqa: E402

log = logging.getLogger("rexverse.eval")
TASKS = ("detection", "referring", "naming")


# --- questions -------------------------------------------------------------------------------------------


def records_from_shards(specs: list[str]) -> Iterator[tuple[dict[str, Any], bytes]]:
    """(record, image bytes) of local or remote (s3://, gs://) shards, in shard order; needs Ray running."""
    import ray

    from chatrex.data import IMAGE_KEYS
    from engine.training import shard_paths

    rows = ray.data.read_webdataset(shard_paths(specs), decoder=None).iter_rows()
    for row in rows:
        record = json.loads(bytes(row["json"]))
        yield record, bytes(next(row[k] for k in IMAGE_KEYS if row.get(k) is not None))


def candidates(record: dict[str, Any], max_boxes: int) -> tuple[list[list[float]], int]:
    """The record's proposals by decreasing score, at most `max_boxes`, without any annotated box verbatim.

    Returns the boxes and how many proposals were dropped for repeating an annotated box.
    """
    gt = [r["box"] for r in record.get("regions", [])]
    kept, dropped = drop_verbatim(list(record.get("proposals", [])), gt)
    kept = sorted(kept, key=lambda p: -float(p.get("score", 0.0)))[:max_boxes]
    return [list(map(float, p["box"])) for p in kept], dropped


def questions(
    record: dict[str, Any], image: bytes, tasks: tuple[str, ...], max_boxes: int
) -> tuple[list[dict[str, Any]], int]:
    """Every evaluation question about one record (with what scoring needs), and the verbatim drops."""
    base = {"key": record["key"], "dataset": record["source"].get("dataset", ""), "image": image}
    boxes, dropped = candidates(record, max_boxes)
    image_gt = [list(map(float, r["box"])) for r in record.get("regions", [])]
    common = base | {"boxes": boxes, "image_gt_boxes": image_gt}
    items = []
    if not boxes:
        return items, dropped
    if "detection" in tasks:
        by_category: dict[str, list[list[float]]] = defaultdict(list)
        for region in record["regions"]:
            by_category[region["category"]].append(list(map(float, region["box"])))
        for category in sorted(by_category):
            items.append(
                common
                | {
                    "task": "detection",
                    "question": DETECT_QUESTION.format(category=category),
                    "category": category,
                    "gt_boxes": by_category[category],
                    "gt_box": [],
                }
            )
    ious = iou_matrix(boxes, image_gt)
    for n, region in enumerate(record["regions"]):
        extra = {"category": region["category"], "gt_boxes": [], "gt_box": list(map(float, region["box"]))}
        if "referring" in tasks and region.get("referring"):  # tiered records: the tier may be null
            question = REFER_QUESTION.format(referring=region["referring"])
            items.append(common | extra | {"task": "referring", "question": question})
        best = int(ious[:, n].argmax())
        if "naming" in tasks and float(ious[best, n]) >= 0.5:
            question = REGION_QUESTIONS["category"].format(index=best)
            items.append(common | extra | {"task": "naming", "question": question})
    return items, dropped


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
            out = self.model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                output_scores=True,
                return_dict_in_generate=True,
            )
        answers = self.processor.batch_decode(out.sequences)
        scores = [json.dumps(s) for s in index_confidences(out.sequences, out.scores, self.model.config)]
        return {
            "qid": np.asarray(batch["qid"]),
            "answer": np.asarray(answers, dtype=object),
            "index_scores": np.asarray(scores, dtype=object),
        }


def index_confidences(sequences: Any, step_scores: Any, config: Any) -> list[dict[str, float]]:
    """Per answer, {index: probability the model gave its `<objN>` token} at the first time it named it.

    `step_scores` are generate's per-step logits (B, vocab); the softmax over the vocabulary at that step is
    the model's confidence in naming that box, which ranks the boxes for mAP.
    """
    import torch

    start, count = config.object_index_start_id, config.num_object_tokens
    probs = torch.stack([s.float().softmax(-1) for s in step_scores], dim=1)  # (B, steps, vocab)
    chosen = probs.gather(-1, sequences[:, : probs.shape[1], None]).squeeze(-1)
    result = []
    for row, tokens in enumerate(sequences[:, : probs.shape[1]].tolist()):
        found: dict[str, float] = {}
        for step, token in enumerate(tokens):
            if start <= token < start + count:
                found.setdefault(str(token - start), round(float(chosen[row, step]), 6))
        result.append(found)
    return result


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
    answers = {int(row["qid"]): (str(row["answer"]), str(row["index_scores"])) for row in ds.take_all()}
    return [
        item | {"answer": answers[item["qid"]][0], "index_scores": json.loads(answers[item["qid"]][1])}
        for item in items
    ]


# --- report --------------------------------------------------------------------------------------------


def table(metrics: dict[str, Any]) -> str:
    """Model and baselines side by side, per dataset and per objects-per-image bucket."""
    names = ("P@0.5", "R@0.5", "F1", "base P", "base R", "ceil R", "oracle R", "mAP", "refer", "naming")
    header = f"{'':<16}" + "".join(f"{n:>9}" for n in names)
    lines = [header, "-" * len(header)]

    def cells(d: dict[str, Any], entry: dict[str, Any]) -> list[Any]:
        baseline = d.get("baseline", {})
        return [
            d.get("P@0.5"),
            d.get("R@0.5"),
            d.get("F1@0.5"),
            baseline.get("P@0.5"),
            baseline.get("R@0.5"),
            d.get("recall_ceiling_R@0.5"),
            d.get("oracle_R@0.5"),
            d.get("mAP"),
            entry.get("referring", {}).get("accuracy"),
            entry.get("naming", {}).get("accuracy"),
        ]

    def line(label: str, values: list[Any]) -> str:
        return f"{label:<16}" + "".join(f"{'-' if c is None else f'{c:.3f}':>9}" for c in values)

    for dataset, entry in metrics.items():
        d = entry.get("detection", {})
        lines.append(line(dataset, cells(d, entry)))
        for bucket, sub in d.get("by_objects", {}).items():
            lines.append(line(f"  {bucket} objects", cells(sub, {})))
    return "\n".join(lines)


def candidate_source(args: argparse.Namespace) -> dict[str, Any]:
    """The records to ask about and a description of where their candidate boxes come from."""
    from chatrex.coco import iter_coco_records

    check_sources(args)
    if args.coco:
        synthetic = args.distractors if args.synthetic_proposals else None
        records = iter_coco_records(args.coco, args.images, args.proposals, synthetic, args.seed, args.limit)
        described = (
            f"COCO detection results {args.proposals}"
            if args.proposals
            else f"synthetic proposal model (chatrex/proposals.py), {args.distractors} distractors per image"
        )
        return {"records": records, "candidates": described}
    return {"records": records_from_shards(args.shards), "candidates": "the shards' proposals"}


def check_sources(args: argparse.Namespace) -> None:
    """COCO evaluation needs a proposal source (annotations never become candidates); shards bring theirs."""
    if not args.coco:
        if args.proposals or args.synthetic_proposals:
            raise SystemExit(
                "eval_chatrex: --proposals and --synthetic-proposals go with --coco; "
                "shards carry their proposals"
            )
        return
    if not args.proposals and not args.synthetic_proposals:
        raise SystemExit(
            "eval_chatrex: --coco needs candidate boxes from a proposal source: pass --proposals DETS.json "
            "(COCO detection results, e.g. written by pipelines/export_proposals.py from shards), or "
            "--synthetic-proposals for the synthetic benchmark scenes (annotations are never candidates)"
        )
    if args.proposals and args.synthetic_proposals:
        raise SystemExit("eval_chatrex: pass one proposal source, --proposals or --synthetic-proposals")


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from engine.models import resolve_model
    from engine.runtime import init_ray

    tasks = tuple(t for t in args.tasks.split(",") if t)
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise SystemExit(f"unknown --tasks {sorted(unknown)}; choose from {TASKS}")
    import ray

    check_sources(args)  # before starting Ray: a wrong command fails at once
    started = init_ray(RayConfig(show_progress=not args.quiet), namespace="chatrex-eval")
    try:
        source = candidate_source(args)
        items, dropped = [], 0
        for n, (record, image) in enumerate(source["records"]):
            if args.limit is not None and n >= args.limit:
                break
            asked, lost = questions(record, image, tasks, args.max_boxes)
            items += asked
            dropped += lost
        if not items:
            raise SystemExit(
                "no evaluation question: are there records with regions and proposals (candidate boxes)?"
            )
        log.info("%d questions (%s), candidates: %s", len(items), ", ".join(tasks), source["candidates"])
        predictions = predict(items, resolve_model(args.model), args)
    finally:
        if started:
            ray.shutdown()
    metrics, rows = score(predictions, args.seed, args.dedup_iou)
    args.output.mkdir(parents=True, exist_ok=True)
    report = {
        "model": args.model,
        "candidates": source["candidates"],
        "candidate_scores": "not used: mAP ranks by the model's own <objN> probabilities",
        "dropped_verbatim_gt_candidates": dropped,
        "duplicate_suppression": (
            f"NMS at IoU {args.dedup_iou} over each answer's boxes (ranked by the model's <objN> probability)"
            " and over every baseline's picks"
            if args.dedup_iou is not None
            else "none"
        ),
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
    parser.add_argument("--proposals", type=Path, default=None, help="COCO detection results as candidates")
    parser.add_argument(
        "--synthetic-proposals",
        action="store_true",
        help="candidates from the synthetic proposal model (synthetic benchmark scenes only)",
    )
    parser.add_argument("--distractors", type=int, default=6, help="distractors of --synthetic-proposals")
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
    parser.add_argument(
        "--dedup-iou",
        type=float,
        default=None,
        help="suppress duplicate answered boxes (NMS at this IoU, by the model's confidence; baselines too)",
    )
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
