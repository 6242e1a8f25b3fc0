"""Audit an engine output against COCO-format ground truth for the same images.

    python pipelines/audit.py --output OUT --coco GT.json [--synonyms map.json] [--grounding-model NAME]

A record matches a COCO image by its source file name (the base name of `source.uri`, or of the tar member
for `tar#member` uris). Over the matched images only, every category-tier region (every region: all carry a
category) is compared with the GT boxes:

- box recall@0.5 = matched GT boxes / GT boxes; box precision@0.5 = matched regions / regions. A region and
  a GT box match when IoU >= 0.5 and the region's category names the GT category; pairs are assigned
  one-to-one by maximum total IoU (scipy's Hungarian solver), not greedily.
- category naming: a region's category maps to a GT category name by (1) the synonym map (`--synonyms`, a
  JSON object {"alias": "gt name"}), (2) the exact name, (3) its last word (the head noun: "traffic light"
  stays whole if GT has it, "red lemon" -> "lemon"), (4) the nearest GT name by string similarity
  (difflib ratio >= `--name-cutoff`, default 0.85, which catches plurals and spelling variants). A category
  that maps to nothing never matches.
- baselines measured in the same run: class-agnostic recall/precision (category ignored: how much of the
  miss is naming rather than boxes) and the same regions with whole-image boxes (the trivial box).
- per-tier region counts (category, short phrase, description, referring) over the matched images and the
  whole output.
- referring back-grounding (optional, `--grounding-model`): each referring expression is grounded alone by
  that Grounding DINO model in the stored image; accuracy = share whose best box has IoU >= 0.5 with its
  region, next to the whole-image-box baseline.

Writes OUT/audit.json and OUT/audit.md; prints last
`box_recall@0.5=<r> box_precision@0.5=<p> regions_category=<a> regions_referring=<b>`.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402
from torchvision.ops import box_iou  # noqa: E402

from schemas.tiers import TIERS  # noqa: E402

IOU = 0.5


def source_name(uri: str) -> str:
    """The file name a record came from: base name of the path, or of the member in `tar#member`."""
    return uri.rsplit("#", 1)[-1].replace("\\", "/").rsplit("/", 1)[-1]


def load_gt(coco_path: Path) -> tuple[dict[str, list[tuple[list[float], str]]], list[str]]:
    """File name -> [(xyxy box, category name)] (crowd boxes left out), and the category names."""
    coco = json.loads(coco_path.read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    by_id = {im["id"]: source_name(im["file_name"]) for im in coco["images"]}
    gt: dict[str, list[tuple[list[float], str]]] = {name: [] for name in by_id.values()}
    for ann in coco["annotations"]:
        if ann.get("iscrowd", 0) or "bbox" not in ann:
            continue
        x, y, w, h = ann["bbox"]
        gt[by_id[ann["image_id"]]].append(([x, y, x + w, y + h], names[ann["category_id"]]))
    return gt, sorted(set(names.values()))


class CategoryNamer:
    """Maps a free category name to a GT category name (see the module docstring for the order)."""

    def __init__(self, gt_names: list[str], synonyms: dict[str, str], cutoff: float) -> None:
        self.gt = {name.lower(): name for name in gt_names}
        self.synonyms = {k.lower(): v for k, v in synonyms.items()}
        self.cutoff = cutoff
        self.cache: dict[str, str | None] = {}

    def __call__(self, name: str) -> str | None:
        key = " ".join(name.lower().split())
        if key not in self.cache:
            self.cache[key] = self._map(key)
        return self.cache[key]

    def _map(self, key: str) -> str | None:
        for candidate in (key, key.split()[-1] if key else ""):
            if candidate in self.synonyms:
                return self.synonyms[candidate]
            if candidate in self.gt:
                return self.gt[candidate]
        close = difflib.get_close_matches(key, list(self.gt), n=1, cutoff=self.cutoff)
        return self.gt[close[0]] if close else None


def match_count(
    pred: list[list[float]], pred_names: list[str | None], gt: list[tuple[list[float], str]]
) -> int:
    """Number of one-to-one (region, GT box) pairs with IoU >= 0.5 and agreeing names (None name = any)."""
    if not pred or not gt:
        return 0
    iou = box_iou(
        torch.tensor(pred, dtype=torch.float64), torch.tensor([b for b, _ in gt], dtype=torch.float64)
    )
    ok = iou.numpy() >= IOU
    for i, name in enumerate(pred_names):
        if name is not None:
            ok[i] &= np.array([name == g for _, g in gt])
    weight = np.where(ok, iou.numpy(), 0.0)
    rows, cols = linear_sum_assignment(-weight)
    return int(ok[rows, cols].sum())


def read_index(out: Path) -> list[dict[str, Any]]:
    """One row per record from the output's parquet index (regions with boxes and tier texts)."""
    files = sorted((out / "index").glob("*.parquet"))
    if not files:
        raise SystemExit(f"{out}/index has no parquet files: is {out} an engine output?")
    columns = ["key", "shard", "source_uri", "width", "height", "regions"]
    return [row for f in files for row in pq.read_table(f, columns=columns).to_pylist()]


def tier_totals(rows: list[dict[str, Any]]) -> dict[str, int]:
    counts = Counter({t: 0 for t in TIERS})
    for row in rows:
        for region in row["regions"]:
            counts.update(t for t in TIERS if region.get(t))
    return {t: counts[t] for t in TIERS}


def ratio(a: int, b: int) -> float:
    return round(a / b, 4) if b else 0.0


def box_audit(rows: list[dict[str, Any]], gt: dict[str, list], namer: CategoryNamer) -> dict[str, Any]:
    """Recall/precision at IoU 0.5 of category regions against GT, with the two baselines."""
    tp = tp_agnostic = tp_whole = n_gt = n_pred = 0
    unnamed: Counter = Counter()
    for row in rows:
        truth = gt[source_name(row["source_uri"])]
        regions = row["regions"]
        boxes = [list(r["box"]) for r in regions]
        names = [namer(r["category"]) for r in regions]
        unnamed.update(r["category"] for r, n in zip(regions, names, strict=True) if n is None)
        names_or_none = [n if n is not None else "\0" for n in names]  # unmapped: matches nothing
        whole = [[0.0, 0.0, float(row["width"]), float(row["height"])]] * len(regions)
        n_gt += len(truth)
        n_pred += len(regions)
        tp += match_count(boxes, names_or_none, truth)
        tp_agnostic += match_count(boxes, [None] * len(boxes), truth)
        tp_whole += match_count(whole, names_or_none, truth)
    return {
        "gt_boxes": n_gt,
        "category_regions": n_pred,
        "matched": tp,
        "box_recall@0.5": ratio(tp, n_gt),
        "box_precision@0.5": ratio(tp, n_pred),
        "class_agnostic": {
            "recall@0.5": ratio(tp_agnostic, n_gt),
            "precision@0.5": ratio(tp_agnostic, n_pred),
        },
        "baseline_whole_image_box": {
            "recall@0.5": ratio(tp_whole, n_gt),
            "precision@0.5": ratio(tp_whole, n_pred),
        },
        "unmapped_categories": dict(unnamed.most_common(20)),
    }


def backgrounding(out: Path, rows: list[dict[str, Any]], model: str, backend: str) -> dict[str, Any]:
    """Ground each referring expression alone; share whose best box hits its region at IoU >= 0.5."""
    import webdataset as wds

    from engine.config import ModelRef
    from engine.images import load_rgb
    from stages.grounding import GroundingConfig, build_prompt, make_detector, phrase_token_indices

    cfg = GroundingConfig(model=ModelRef(name=model), backend=backend)
    detector = make_detector(cfg.model, cfg.backend, cfg.max_image_side)
    wanted = {row["key"]: row for row in rows if any(r.get("referring") for r in row["regions"])}
    shards = sorted({str(out / "shards" / row["shard"]) for row in wanted.values()})
    hits = whole_hits = total = 0
    for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
        row = wanted.get(sample["__key__"])
        if row is None:
            continue
        data = sample.get("jpg") or sample.get("png")
        image = load_rgb(data, cfg.max_image_side)
        width, height = row["width"], row["height"]
        for region in (r for r in row["regions"] if r.get("referring")):
            prompt, spans = build_prompt([region["referring"]])
            probs, boxes, offsets = detector([image], [prompt])
            tokens = phrase_token_indices(offsets[0], spans)[0]
            if not tokens:
                continue
            best = int(probs[0][:, tokens].max(dim=1).values.argmax())
            cx, cy, w, h = boxes[0][best].tolist()
            guess = [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
            truth = torch.tensor([list(region["box"])], dtype=torch.float64)
            hits += int(box_iou(torch.tensor([guess], dtype=torch.float64), truth).item() >= IOU)
            whole = torch.tensor([[0.0, 0.0, float(width), float(height)]], dtype=torch.float64)
            whole_hits += int(box_iou(whole, truth).item() >= IOU)
            total += 1
    return {
        "model": model,
        "expressions": total,
        "accuracy@0.5": ratio(hits, total),
        "baseline_whole_image_box": ratio(whole_hits, total),
    }


def markdown(report: dict[str, Any]) -> str:
    box = report["boxes"]
    lines = [
        "# Audit against ground truth",
        "",
        f"Output `{report['output']}` vs `{report['coco']}`: {report['matched_images']} records matched a GT "
        f"image by file name ({report['unmatched_records']} records and {report['gt_images_without_record']} "
        "GT images unmatched).",
        "",
        "| measure | recall@0.5 | precision@0.5 |",
        "|---|---|---|",
        f"| category regions vs GT boxes | {box['box_recall@0.5']} | {box['box_precision@0.5']} |",
        f"| class-agnostic (category ignored) | {box['class_agnostic']['recall@0.5']} | "
        f"{box['class_agnostic']['precision@0.5']} |",
        f"| baseline: same regions, whole-image boxes | {box['baseline_whole_image_box']['recall@0.5']} | "
        f"{box['baseline_whole_image_box']['precision@0.5']} |",
        "",
        f"GT boxes: {box['gt_boxes']}; category regions: {box['category_regions']}; "
        f"matched: {box['matched']}.",
        "",
        "| tier | regions (matched images) | regions (whole output) |",
        "|---|---|---|",
    ]
    for tier in TIERS:
        lines.append(f"| {tier} | {report['tiers_matched'][tier]} | {report['tiers_all'][tier]} |")
    ref = report.get("referring_backgrounding")
    if ref:
        lines += [
            "",
            f"Referring back-grounding with `{ref['model']}`: accuracy@0.5 {ref['accuracy@0.5']} over "
            f"{ref['expressions']} expressions (whole-image-box baseline {ref['baseline_whole_image_box']}).",
        ]
    return "\n".join(lines) + "\n"


def audit(
    out: Path,
    coco: Path,
    synonyms: dict[str, str] | None = None,
    name_cutoff: float = 0.85,
    grounding_model: str | None = None,
    grounding_backend: str = "transformers",
) -> dict[str, Any]:
    gt, names = load_gt(coco)
    rows = read_index(out)
    matched = [row for row in rows if source_name(row["source_uri"]) in gt]
    matched_names = {source_name(row["source_uri"]) for row in matched}
    namer = CategoryNamer(names, synonyms or {}, name_cutoff)
    report: dict[str, Any] = {
        "output": str(out),
        "coco": str(coco),
        "records": len(rows),
        "matched_images": len(matched),
        "unmatched_records": len(rows) - len(matched),
        "gt_images_without_record": len(set(gt) - matched_names),
        "iou": IOU,
        "name_cutoff": name_cutoff,
        "synonyms": synonyms or {},
        "boxes": box_audit(matched, gt, namer),
        "tiers_matched": tier_totals(matched),
        "tiers_all": tier_totals(rows),
        "referring_backgrounding": None,
    }
    if grounding_model:
        report["referring_backgrounding"] = backgrounding(out, matched, grounding_model, grounding_backend)
    (out / "audit.json").write_text(json.dumps(report, indent=2))
    (out / "audit.md").write_text(markdown(report))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--output", required=True, type=Path, help="an engine output folder (index/, shards/)"
    )
    parser.add_argument("--coco", required=True, type=Path, help="COCO-format GT json for the same images")
    parser.add_argument("--synonyms", type=Path, default=None, help='JSON {"alias": "gt category name"}')
    parser.add_argument("--name-cutoff", type=float, default=0.85, help="difflib ratio for nearest GT name")
    parser.add_argument(
        "--grounding-model", default=None, help="e.g. tiny:grounding-dino: back-ground referring"
    )
    parser.add_argument(
        "--grounding-backend", default="transformers", choices=["transformers", "groundingdino-py"]
    )
    args = parser.parse_args(argv)
    synonyms = json.loads(args.synonyms.read_text()) if args.synonyms else {}
    report = audit(
        args.output, args.coco, synonyms, args.name_cutoff, args.grounding_model, args.grounding_backend
    )
    box, tiers = report["boxes"], report["tiers_matched"]
    print(markdown(report))
    print(
        f"box_recall@0.5={box['box_recall@0.5']} box_precision@0.5={box['box_precision@0.5']} "
        f"regions_category={tiers['category']} regions_referring={tiers['referring']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
