"""UPN: shapes per granularity, save/load, matcher and loss, targets, metrics and the prior baseline."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from upn import UPNConfig, UPNModel
from upn.data import granularity_boxes, hflip, is_small, normalized_cxcywh
from upn.loss import hungarian_match, set_loss, upn_loss
from upn.metrics import class_agnostic_gt, proposal_recall
from upn.prior import fit_prior, prior_proposals
from upn.tiny import TINY_UPN_KWARGS

FIXTURE = Path(__file__).parent / "fixtures" / "fixture100"


def small_model(**overrides) -> UPNModel:
    torch.manual_seed(0)
    return UPNModel(UPNConfig(**{**TINY_UPN_KWARGS, "image_size": 96, "num_queries": 20, **overrides})).eval()


def test_forward_shapes_per_granularity():
    model = small_model()
    pixels = torch.randn(2, 3, 96, 96)
    outs = {g: model(pixels, granularity=g) for g in ("fine", "coarse")}
    layers = model.config.decoder_layers
    for out in outs.values():
        assert out.logits.shape == (2, 20)
        assert out.pred_boxes.shape == (2, 20, 4)
        assert out.aux_logits.shape == (2, layers, 20) and out.aux_boxes.shape == (2, layers, 20, 4)
        assert out.enc_logits.shape == (2, 20) and out.enc_boxes.shape == (2, 20, 4)
        assert torch.all((out.pred_boxes >= 0) & (out.pred_boxes <= 1))
        assert torch.equal(out.aux_logits[:, -1], out.logits)
    # the prompt changes what comes out: the two granularities are not the same head
    assert not torch.allclose(outs["fine"].logits, outs["coarse"].logits)
    with pytest.raises(ValueError, match="unknown granularity"):
        model(pixels, granularity="medium")


def test_save_load_round_trip(tmp_path):
    model = small_model()
    model.save_pretrained(tmp_path)
    loaded = UPNModel.from_pretrained(tmp_path).eval()
    pixels = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        a, b = model(pixels, granularity="fine"), loaded(pixels, granularity="fine")
    assert torch.allclose(a.logits, b.logits, atol=1e-6)
    assert torch.allclose(a.pred_boxes, b.pred_boxes, atol=1e-6)
    assert loaded.config.granularities == ["fine", "coarse"]


def test_hungarian_match_recovers_a_permutation_and_zero_box_loss():
    targets = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.6, 0.3, 0.2], [0.5, 0.5, 0.4, 0.4]])
    boxes = torch.rand(1, 6, 4) * 0.3 + 0.1
    boxes[0, [4, 1, 3]] = targets  # query 4 = target 0, query 1 = target 1, query 3 = target 2
    logits = torch.zeros(1, 6)
    ((rows, cols),) = hungarian_match(logits, boxes, [targets])
    assert dict(zip(rows.tolist(), cols.tolist(), strict=True)) == {4: 0, 1: 1, 3: 2}
    terms = set_loss(logits, boxes, [targets])
    assert terms["l1"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["giou"].item() == pytest.approx(0.0, abs=1e-5)
    # an image without targets: no match, only the objectness term pushes every query down
    ((rows, cols),) = hungarian_match(logits, boxes, [torch.zeros(0, 4)])
    assert len(rows) == 0
    assert set_loss(logits, boxes, [torch.zeros(0, 4)])["objectness"].item() > 0


def test_loss_decreases_on_one_image():
    model = small_model()
    model.train()
    pixels = torch.randn(1, 3, 96, 96)
    targets = {
        "coarse": [torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])],
        "fine": [torch.tensor([[0.3, 0.3, 0.2, 0.2]])],
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        enc = model.encode(pixels)
        loss = sum(upn_loss(model.decode(enc, g), targets[g])[0] for g in ("coarse", "fine"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert min(losses[-3:]) < 0.6 * losses[0], losses


def test_granularity_targets_small_objects_and_parts():
    record = {
        "width": 200,
        "height": 100,
        "regions": [
            {"box": [0, 0, 10, 10]},  # side 10 < 0.18 * 100: small
            {"box": [20, 20, 80, 90]},  # large
        ],
    }
    boxes = granularity_boxes(record)
    assert boxes["coarse"] == [[0, 0, 10, 10], [20, 20, 80, 90]]
    assert boxes["fine"] == [[0, 0, 10, 10]]
    record["regions"].append({"box": [30, 30, 60, 60], "part": True})
    boxes = granularity_boxes(record)
    assert boxes["fine"] == [[30, 30, 60, 60]]  # parts, when present, are the fine targets
    assert [30, 30, 60, 60] not in boxes["coarse"]
    assert is_small([0, 0, 17, 17], 100, 100) and not is_small([0, 0, 19, 19], 100, 100)
    t = normalized_cxcywh([[0, 0, 100, 50]], 200, 100)
    assert torch.allclose(t, torch.tensor([[0.25, 0.25, 0.5, 0.5]]))
    _, flipped = hflip(Image.new("RGB", (200, 100)), {"coarse": t})
    assert torch.allclose(flipped["coarse"], torch.tensor([[0.75, 0.25, 0.5, 0.5]]))


def _toy_gt() -> dict:
    images = [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.jpg"} for i in (1, 2)]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 20]},
        {"id": 2, "image_id": 1, "category_id": 5, "bbox": [50, 50, 40, 30]},
        {"id": 3, "image_id": 2, "category_id": 3, "bbox": [0, 0, 100, 100]},
    ]
    return {"images": images, "annotations": anns, "categories": [{"id": 3}, {"id": 5}]}


def test_perfect_proposals_have_recall_one_and_misses_count():
    gt = class_agnostic_gt(_toy_gt())
    perfect = [{"image_id": a["image_id"], "bbox": a["bbox"], "score": 0.9} for a in gt["annotations"]]
    metrics = proposal_recall(gt, perfect, (10, 100))
    assert metrics["AR@100"] == pytest.approx(1.0) and metrics["R@0.5@100"] == pytest.approx(1.0)
    # one object found only at IoU 0.68, one missed: R@0.5 = 2/3, AR below it
    shifted = copy.deepcopy(perfect)
    shifted[0]["bbox"] = [12, 12, 20, 20]  # IoU 0.68
    metrics = proposal_recall(gt, shifted[:2], (10, 100))
    assert metrics["R@0.5@100"] == pytest.approx(2 / 3)
    assert metrics["AR@100"] < 2 / 3
    # maxDets caps boxes per image: the right box ranked 11th does not count at 10
    junk = [{"image_id": 2, "bbox": [80, 80, 5, 5], "score": 0.99}] * 10
    metrics = proposal_recall(gt, junk + [dict(perfect[2], score=0.1)], (10, 100))
    assert metrics["R@0.5@10"] == pytest.approx(0.0) and metrics["R@0.5@100"] == pytest.approx(1 / 3)


def test_prior_ranks_the_most_frequent_box_first_and_covers_it():
    rng = np.random.default_rng(0)
    common = np.array([0.2, 0.2, 0.6, 0.6])
    rare = rng.uniform(0.7, 0.9, size=(30, 2))  # small boxes far from the common one
    rare = np.concatenate([rare, rare + rng.uniform(0.03, 0.08, size=(30, 2))], 1)
    boxes = np.concatenate([np.tile(common, (100, 1)), rare])
    prior = fit_prior(boxes, count=10)
    assert prior.shape == (10, 4)
    assert np.allclose(prior[0], common, atol=1e-6)
    pixels, scores = prior_proposals(prior, 200, 100)
    assert np.allclose(pixels[0], [40, 20, 120, 60], atol=1e-4)
    assert np.all(np.diff(scores) < 0)


def test_eval_predictions_never_see_the_annotations(tmp_path):
    """The UPN under evaluation gets pixels only: removing the ground truth changes no proposal."""
    from pipelines.eval_upn import upn_predictions
    from scaffold.tiny_models import ensure_tiny_model

    coco = json.loads((FIXTURE / "annotations.json").read_text())
    coco["images"] = sorted(coco["images"], key=lambda im: im["id"])[:2]
    blind = dict(coco, annotations=[])
    model = str(ensure_tiny_model("upn"))
    a = upn_predictions(model, coco, FIXTURE, ["coarse"], 10, 0.8, 2)
    b = upn_predictions(model, blind, FIXTURE, ["coarse"], 10, 0.8, 2)
    assert a == b and len(a["coarse"]) == 20
    assert {d["category_id"] for d in a["coarse"]} == {1}


def test_coco_results_export_reads_back_as_proposals(tmp_path):
    """eval_upn's proposals file is COCO results that `chatrex.coco.load_proposals` (and so ChatRex
    training/eval via --proposals) reads back as xyxy boxes."""
    from chatrex.coco import load_proposals
    from pipelines.eval_upn import coco_results

    results = coco_results(7, np.array([[10.0, 20.0, 50.0, 80.0]]), np.array([0.75]))
    assert results == [{"image_id": 7, "bbox": [10.0, 20.0, 40.0, 60.0], "score": 0.75, "category_id": 1}]
    path = tmp_path / "proposals_coarse.json"
    path.write_text(json.dumps(results))
    assert load_proposals(path) == {7: [{"box": [10.0, 20.0, 50.0, 80.0], "score": 0.75}]}
