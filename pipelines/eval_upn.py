"""Evaluate class-agnostic proposals against COCO-format ground truth: UPN beside its baselines.

    python pipelines/eval_upn.py --model out/upn/model --coco test/annotations.json \\
        --prior-coco train/annotations.json --output out/upn-eval [--owlv2 tiny:owlv2]

For each granularity (coarse: every annotated object; fine: the small objects, `upn/data.py`), every method
gets the same number of boxes per image (`--max-dets`, 100) and pycocotools measures AR@10, AR@100
(IoU 0.50:0.95) and recall@0.5 class-agnostically (`useCats = 0`). Methods:
- `upn`: the model's top boxes for that granularity's prompt (after NMS at `--nms-iou`);
- `prior`: the data prior (`upn/prior.py`), the best trivial proposer: training box shapes on a grid,
  ranked by how many training boxes they cover; it never looks at the test image;
- `owlv2`: OWLv2 objectness, the engine's previous stand-in (with a random tiny model it is only a floor).
Writes `metrics.json`, and `proposals_<granularity>.json` (COCO results: image_id, bbox [x, y, w, h], score,
category_id 1), which `pipelines/coco_to_shards.py --proposals` and ChatRex evaluation take as candidates.
The last line printed is `key=value` figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.ops import box_convert, nms  # noqa: E402

from upn.data import SMALL_SIDE, is_small, preprocess  # noqa: E402
from upn.metrics import class_agnostic_gt, proposal_recall  # noqa: E402
from upn.prior import fit_prior, normalized_boxes, prior_proposals  # noqa: E402


def coco_results(image_id: int, boxes_xyxy: np.ndarray, scores: np.ndarray) -> list[dict[str, Any]]:
    """COCO detection results of one image from xyxy pixel boxes (best first)."""
    return [
        {
            "image_id": int(image_id),
            "bbox": [
                round(float(b[0]), 2),
                round(float(b[1]), 2),
                round(float(b[2] - b[0]), 2),
                round(float(b[3] - b[1]), 2),
            ],
            "score": round(float(s), 5),
            "category_id": 1,
        }
        for b, s in zip(boxes_xyxy, scores, strict=True)
    ]


def iter_images(
    coco: dict[str, Any], folder: Path, batch_size: int
) -> Iterator[list[tuple[dict, Image.Image]]]:
    """Batches of (COCO image entry, RGB image) in id order."""
    batch = []
    for entry in sorted(coco["images"], key=lambda im: im["id"]):
        batch.append((entry, Image.open(folder / entry["file_name"]).convert("RGB")))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def top_boxes(
    scores: torch.Tensor, boxes: torch.Tensor, max_dets: int, nms_iou: float
) -> tuple[np.ndarray, np.ndarray]:
    """NMS (skipped at nms_iou >= 1), then the `max_dets` best; boxes xyxy."""
    order = nms(boxes, scores, nms_iou) if nms_iou < 1 else scores.argsort(descending=True)
    order = order[:max_dets]
    return boxes[order].numpy(), scores[order].numpy()


@torch.inference_mode()
def upn_predictions(
    model_dir: str,
    coco: dict[str, Any],
    folder: Path,
    granularities: list[str],
    max_dets: int,
    nms_iou: float,
    batch_size: int,
) -> dict[str, list[dict[str, Any]]]:
    """COCO results per granularity; the encoder runs once per image for all granularities."""
    from engine.models import resolve_model
    from upn import UPNModel

    model = UPNModel.from_pretrained(resolve_model(model_dir)).eval()
    cfg = model.config
    results: dict[str, list[dict[str, Any]]] = {g: [] for g in granularities}
    for batch in iter_images(coco, folder, batch_size):
        pixels = preprocess([image for _, image in batch], cfg.image_size, cfg.image_mean, cfg.image_std)
        enc = model.encode(pixels)
        for granularity in granularities:
            out = model.decode(enc, granularity)
            for i, (entry, image) in enumerate(batch):
                scale = torch.tensor([image.width, image.height] * 2, dtype=torch.float32)
                boxes = box_convert(out.pred_boxes[i].float(), "cxcywh", "xyxy").clamp(0, 1) * scale
                kept, scores = top_boxes(out.logits[i].float().sigmoid(), boxes, max_dets, nms_iou)
                results[granularity] += coco_results(entry["id"], kept, scores)
    return results


def prior_predictions(prior: np.ndarray, coco: dict[str, Any]) -> list[dict[str, Any]]:
    results = []
    for entry in coco["images"]:
        boxes, scores = prior_proposals(prior, entry["width"], entry["height"])
        results += coco_results(entry["id"], boxes, scores)
    return results


@torch.inference_mode()
def owlv2_predictions(
    model_name: str, coco: dict[str, Any], folder: Path, max_dets: int, batch_size: int
) -> list[dict[str, Any]]:
    """The engine's OWLv2 objectness proposer (stages/proposals.py), ranked by objectness, no threshold."""
    from engine.config import ModelRef
    from stages.proposals import Owlv2Objectness, ProposalsConfig

    proposer = Owlv2Objectness(ProposalsConfig(enabled=True, model=ModelRef(name=model_name)))
    results = []
    for batch in iter_images(coco, folder, batch_size):
        for (entry, image), (scores, boxes) in zip(
            batch, proposer([image for _, image in batch]), strict=True
        ):
            boxes = boxes.clone()
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, image.width)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, image.height)
            kept, kept_scores = top_boxes(scores, boxes, max_dets, 1.0)
            results += coco_results(entry["id"], kept, kept_scores)
    return results


def training_boxes(prior_coco: Path, small_side: float) -> dict[str, np.ndarray]:
    """Normalized xyxy training boxes per granularity, from a COCO json (the prior's only input)."""
    coco = json.loads(prior_coco.read_text())
    images = {im["id"]: im for im in coco["images"]}
    per: dict[str, list[np.ndarray]] = {"coarse": [], "fine": []}
    for ann in coco["annotations"]:
        im = images[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        box = normalized_boxes([[x, y, x + w, y + h]], im["width"], im["height"])
        per["coarse"].append(box)
        if is_small([x, y, x + w, y + h], im["width"], im["height"], small_side):
            per["fine"].append(box)
    return {g: np.concatenate(b) if b else np.zeros((0, 4), np.float32) for g, b in per.items()}


def ground_truth(coco: dict[str, Any], granularity: str, small_side: float) -> dict[str, Any]:
    """Class-agnostic GT of one granularity (fine: small objects; the synthetic data has no parts)."""
    if granularity == "coarse":
        return class_agnostic_gt(coco)

    def small(ann: dict[str, Any], image: dict[str, Any]) -> bool:
        x, y, w, h = ann["bbox"]
        return is_small([x, y, x + w, y + h], image["width"], image["height"], small_side)

    return class_agnostic_gt(coco, small)


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    coco = json.loads(args.coco.read_text())
    folder = args.images or args.coco.parent
    granularities = [g.strip() for g in args.granularities.split(",") if g.strip()]
    ks = (10, args.max_dets)
    args.output.mkdir(parents=True, exist_ok=True)
    upn = upn_predictions(
        str(args.model), coco, folder, granularities, args.max_dets, args.nms_iou, args.batch_size
    )
    owlv2 = (
        owlv2_predictions(args.owlv2, coco, folder, args.max_dets, args.batch_size) if args.owlv2 else None
    )
    train_boxes = training_boxes(args.prior_coco, args.small_side) if args.prior_coco else None
    metrics: dict[str, Any] = {"max_dets": args.max_dets, "images": len(coco["images"]), "granularity": {}}
    for granularity in granularities:
        gt = ground_truth(coco, granularity, args.small_side)
        row = {"gt_boxes": len(gt["annotations"]), "upn": proposal_recall(gt, upn[granularity], ks)}
        (args.output / f"proposals_{granularity}.json").write_text(json.dumps(upn[granularity]))
        if train_boxes is not None and len(train_boxes[granularity]):
            prior = fit_prior(train_boxes[granularity], args.max_dets)
            row["prior"] = proposal_recall(gt, prior_predictions(prior, coco), ks)
        if owlv2 is not None:
            row["owlv2"] = proposal_recall(gt, owlv2, ks)
            row["owlv2_boxes_per_image"] = round(len(owlv2) / max(1, len(coco["images"])), 1)
        metrics["granularity"][granularity] = row
    (args.output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def summary_line(metrics: dict[str, Any], granularity: str = "coarse") -> str:
    """`AR@100=.. R@0.5=.. prior_AR@100=.. prior_R@0.5=.. owlv2_R@0.5=..` for one granularity."""
    k = metrics["max_dets"]
    row = metrics["granularity"][granularity]
    parts = [f"AR@{k}={row['upn'][f'AR@{k}']:.3f}", f"R@0.5={row['upn'][f'R@0.5@{k}']:.3f}"]
    if "prior" in row:
        parts += [
            f"prior_AR@{k}={row['prior'][f'AR@{k}']:.3f}",
            f"prior_R@0.5={row['prior'][f'R@0.5@{k}']:.3f}",
        ]
    if "owlv2" in row:
        parts += [f"owlv2_R@0.5={row['owlv2'][f'R@0.5@{k}']:.3f}"]
    return " ".join(parts)


def table(metrics: dict[str, Any]) -> str:
    lines = []
    k = metrics["max_dets"]
    for granularity, row in metrics["granularity"].items():
        for method in ("upn", "prior", "owlv2"):
            if method in row:
                r = row[method]
                lines.append(
                    f"{granularity:7s} {method:6s} AR@10 {r['AR@10']:.3f}  AR@{k} {r[f'AR@{k}']:.3f}  "
                    f"R@0.5 {r[f'R@0.5@{k}']:.3f}  ({row['gt_boxes']} GT boxes)"
                )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="UPN folder (from_pretrained) or tiny:upn")
    parser.add_argument("--coco", required=True, type=Path, help="COCO ground truth json")
    parser.add_argument("--images", type=Path, default=None, help="image folder (default: the json's folder)")
    parser.add_argument("--prior-coco", type=Path, default=None, help="training COCO json for the data prior")
    parser.add_argument(
        "--owlv2", default=None, help="OWLv2 model for the stand-in baseline, e.g. tiny:owlv2"
    )
    parser.add_argument("--granularities", default="coarse,fine")
    parser.add_argument("--max-dets", type=int, default=100)
    parser.add_argument(
        "--nms-iou", type=float, default=0.8, help="UPN's NMS before the cap (published: 0.8)"
    )
    parser.add_argument("--small-side", type=float, default=SMALL_SIDE)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", required=True, type=Path)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    metrics = evaluate(parse_args(argv))
    print(table(metrics))
    print(summary_line(metrics), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
