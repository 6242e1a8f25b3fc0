"""ChatRex scoring on hand-computed cases; the guard that no evaluation mode hands the answer to the model."""

import json
import random

import pytest
from conftest import FIXTURE

from chatrex.proposals import (
    JITTER_IOU,
    PARTIAL_IOU,
    iou_matrix,
    is_verbatim,
    proposals_to_results,
    synthetic_proposals,
)
from chatrex.scoring import baseline_picks, bucket_of, score

G0, G1, OTHER = [0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]
# c0 and c1 both cover G0 (IoU 0.909 and 0.818), c2 covers G1 (0.909), c3 covers nothing, c4 covers OTHER
CANDIDATES = [[0, 0, 10, 11], [1, 0, 11, 10], [20, 20, 30, 31], [60, 60, 70, 70], [40, 40, 50, 51]]


def detection(answer, gt=(G0, G1), scores=None, key="img"):
    row = {
        "key": key,
        "dataset": "d",
        "task": "detection",
        "question": "Detect every a in the image.",
        "answer": answer,
        "category": "a",
        "boxes": CANDIDATES,
        "gt_boxes": list(gt),
        "image_gt_boxes": [G0, G1, OTHER],
        "gt_box": [],
    }
    if scores is not None:
        row["index_scores"] = scores
    return row


def objects(*indices):
    return "<ground>a</ground><objects>" + "".join(f"<obj{i}>" for i in indices) + "</objects>"


def test_one_to_one_matching_counts_two_boxes_on_one_object_once():
    metrics, rows = score([detection(objects(0, 1))], seed=0)
    d = metrics["all"]["detection"]
    # c0 and c1 both overlap G0 only: one true positive, one false positive; G1 missed
    assert (d["tp"], d["predicted"], d["ground_truth"]) == (1, 2, 2)
    assert (d["P@0.5"], d["R@0.5"], d["F1@0.5"]) == (0.5, 0.5, 0.5)
    assert rows[0]["indices"] == [0, 1] and rows[0]["gt_boxes"] == [G0, G1]


def test_repeated_index_counts_once_and_totals_add_up_over_questions():
    metrics, _ = score([detection(objects(0, 1)), detection(objects(0, 2, 0), key="img2")], seed=0)
    d = metrics["all"]["detection"]
    # second question: indices [0, 2] (the repeat counts once) -> 2 TP of 2; totals 3 TP / 4 answered / 4 GT
    assert (d["tp"], d["predicted"], d["ground_truth"]) == (3, 4, 4)
    assert (d["P@0.5"], d["R@0.5"], d["F1@0.5"]) == (0.75, 0.75, 0.75)
    assert metrics["d"]["detection"]["tp"] == 3


def test_empty_answer_and_empty_ground_truth():
    metrics, _ = score([detection("I see nothing.")], seed=0)
    d = metrics["all"]["detection"]
    assert (d["tp"], d["predicted"], d["ground_truth"]) == (0, 0, 2)
    assert (d["P@0.5"], d["R@0.5"], d["F1@0.5"]) == (0.0, 0.0, 0.0)
    metrics, _ = score([detection(objects(3), gt=())], seed=0)
    d = metrics["all"]["detection"]
    assert (d["tp"], d["predicted"], d["ground_truth"]) == (0, 1, 0)
    assert (d["P@0.5"], d["R@0.5"]) == (0.0, 0.0)
    assert d["oracle_R@0.5"] == 0.0 and d["baselines"]["random_k"]["P@0.5"] == 0.0  # k = 0 picks nothing


def test_baselines_on_the_same_candidates():
    picks = baseline_picks(CANDIDATES, [G0, G1], [G0, G1, OTHER], random.Random(0))
    assert picks["all_overlapping"] == [0, 1, 2, 4]  # c3 overlaps nothing
    assert sorted(picks["oracle"]) == [0, 2] or sorted(picks["oracle"]) == [1, 2]
    assert len(picks["random_k"]) == 2 and len(set(picks["random_k"])) == 2
    assert len(picks["blind_random_k"]) == 2 and set(picks["blind_random_k"]) <= {0, 1, 2, 4}
    metrics, _ = score([detection(objects(0, 2))], seed=0)
    d = metrics["all"]["detection"]
    # all overlapping: c0-G0 and c2-G1 match, c1 and c4 do not -> P 2/4, R 1
    assert d["baselines"]["all_overlapping"] == {"P@0.5": 0.5, "R@0.5": 1.0, "F1@0.5": 0.6667}
    assert d["recall_ceiling_R@0.5"] == 1.0
    assert d["baselines"]["oracle"] == {"P@0.5": 1.0, "R@0.5": 1.0, "F1@0.5": 1.0}
    # the recall ceiling is never the baseline, even with the better F1 (0.667 here)
    blind = d["baselines"]["blind_random_k"]
    assert d["baseline"] == {"strategy": "blind_random_k", **blind}
    assert d["by_objects"]["2-3"]["R@0.5"] == 1.0 and set(d["by_objects"]) == {"2-3"}


def test_duplicate_suppression_keeps_the_models_most_confident_box_per_object():
    # c0 and c1 overlap each other at IoU 0.75 (both on G0); c2 is on G1
    answer = detection(objects(0, 1, 2), scores={"0": 0.6, "1": 0.9, "2": 0.7})
    metrics, rows = score([answer], seed=0)
    assert metrics["all"]["detection"]["P@0.5"] == pytest.approx(2 / 3, abs=1e-4)  # off by default
    metrics, rows = score([answer], seed=0, dedup_iou=0.3)
    d = metrics["all"]["detection"]
    assert rows[0]["indices"] == [0, 1, 2] and rows[0]["kept_indices"] == [1, 2]  # c0 loses to c1 (0.9)
    assert (d["tp"], d["predicted"], d["ground_truth"]) == (2, 2, 2)
    # the baselines' picks go through the same suppression (by pick order): all overlapping keeps c0, c2, c4
    assert d["baselines"]["all_overlapping"] == {"P@0.5": 0.6667, "R@0.5": 1.0, "F1@0.5": 0.8}
    assert d["baselines"]["oracle"]["R@0.5"] == 1.0
    # a threshold above the pair's IoU keeps both
    _, rows = score([answer], seed=0, dedup_iou=0.8)
    assert rows[0]["kept_indices"] == [0, 1, 2]


def test_buckets():
    assert [bucket_of(n) for n in (0, 1, 2, 3, 4, 6, 7, 10, 11)] == [
        "0",
        "1",
        "2-3",
        "2-3",
        "4-6",
        "4-6",
        "7-10",
        "7-10",
        "11+",
    ]


def test_map_ranks_by_the_models_confidence():
    # one correct box (c0, IoU 0.909 with G0) and one wrong (c3); two GT boxes, so recall stops at 0.5.
    # Correct ranked first: precision 1 up to recall 0.5 -> AP50 = 51/101 (COCO's 101 recall points);
    # the IoU thresholds 0.5..0.9 pass and 0.95 fails -> mAP = 0.9 * 51/101.
    right_first = score([detection(objects(0, 3), scores={"0": 0.9, "3": 0.8})], seed=0)[0]
    d = right_first["all"]["detection"]
    assert d["AP50"] == pytest.approx(51 / 101, abs=1e-4)
    assert d["mAP"] == pytest.approx(0.9 * 51 / 101, abs=1e-4)
    assert d["map_scores"].startswith("model")
    # wrong ranked first: precision 0.5 at recall 0.5 -> AP50 = 0.5 * 51/101
    wrong_first = score([detection(objects(0, 3), scores={"0": 0.8, "3": 0.9})], seed=0)[0]
    assert wrong_first["all"]["detection"]["AP50"] == pytest.approx(0.5 * 51 / 101, abs=1e-4)
    unscored = score([detection(objects(0, 3))], seed=0)[0]["all"]["detection"]
    assert unscored["mAP"] is None and unscored["map_scores"].startswith("none")


def test_referring_and_naming():
    base = {"key": "k", "dataset": "d", "boxes": CANDIDATES, "image_gt_boxes": [G0], "gt_boxes": []}
    rows = [
        base | {"task": "referring", "question": "q", "answer": objects(2, 0), "gt_box": G1, "category": "a"},
        base | {"task": "referring", "question": "q", "answer": objects(3), "gt_box": G1, "category": "a"},
        base | {"task": "naming", "question": "q", "answer": "circle", "gt_box": G0, "category": "circle"},
        base | {"task": "naming", "question": "q", "answer": "square", "gt_box": G0, "category": "circle"},
        base | {"task": "naming", "question": "q", "answer": "circle", "gt_box": G0, "category": "circle"},
    ]
    metrics, _ = score(rows, seed=0)
    assert metrics["all"]["referring"] == {"accuracy": 0.5, "questions": 2}
    assert metrics["all"]["naming"] == {"accuracy": 0.6667, "questions": 3}


# --- the answer is never among the inputs --------------------------------------------------------------


def scene(rng):
    width, height = rng.randint(200, 500), rng.randint(200, 500)
    boxes = []
    for _ in range(rng.randint(1, 6)):
        side = rng.uniform(20, 100)
        x, y = rng.uniform(0, width - side), rng.uniform(0, height - side)
        boxes.append([round(x), round(y), round(x + side), round(y + side)])
    return boxes, width, height


def test_synthetic_proposals_never_contain_a_gt_box_and_follow_their_recipe():
    rng = random.Random(0)
    good, other = [], []
    for _ in range(150):
        gt, width, height = scene(rng)
        proposals = synthetic_proposals(gt, width, height, 6, rng)
        boxes = [p["box"] for p in proposals]
        assert not any(is_verbatim(b, gt) for b in boxes)
        ious = iou_matrix(boxes, gt)
        for box, row, p in zip(boxes, ious, proposals, strict=True):
            assert 0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height
            best = float(row.max())
            # every candidate is a jitter (IoU in JITTER_IOU with some object), a partial box or background
            assert best <= JITTER_IOU[1] + 1e-6
            assert best >= JITTER_IOU[0] - 1e-6 or best <= PARTIAL_IOU[1] + 1e-6 or best < 0.5
            (good if best >= 0.5 else other).append(p["score"])
        # each object has at least one candidate that covers it at IoU >= 0.55
        assert all(float(ious[:, j].max()) >= JITTER_IOU[0] - 1e-6 for j in range(len(gt)))
    # the scores say nothing about which candidates are good
    assert abs(sum(good) / len(good) - sum(other) / len(other)) < 0.05
    assert len(good) > 300 and len(other) > 300


def leaky_record(proposals):
    return {
        "key": "k",
        "source": {"dataset": "d"},
        "regions": [
            {"id": 0, "box": G0, "category": "a", "referring": "the a"},
            {"id": 1, "box": G1, "category": "b", "referring": "the b"},
        ],
        "proposals": proposals,
    }


def test_eval_questions_drop_candidates_that_repeat_a_gt_box():
    from pipelines.eval_chatrex import questions

    record = leaky_record(
        [
            {"box": G0, "score": 0.9},
            {"box": [0, 0, 10, 11], "score": 0.5},
            {"box": [20, 20, 31, 30], "score": 0.1},
        ]
    )
    items, dropped = questions(record, b"", ("detection", "referring", "naming"), 100)
    assert dropped == 1
    assert {i["task"] for i in items} == {"detection", "referring", "naming"}
    for item in items:
        assert item["boxes"] == [[0, 0, 10, 11], [20, 20, 31, 30]]
        assert not any(is_verbatim(b, item["image_gt_boxes"]) for b in item["boxes"])
    naming = [i for i in items if i["task"] == "naming"]
    assert [i["question"] for i in naming] == [
        "What is <obj0>? Answer with its category name.",
        "What is <obj1>? Answer with its category name.",
    ]
    # no proposals at all -> no question (never falls back to the annotations)
    assert questions(leaky_record([]), b"", ("detection",), 100) == ([], 0)


@pytest.mark.parametrize("source", ["proposals-file", "synthetic"])
def test_no_coco_evaluation_mode_hands_a_gt_box_to_the_model(source, tmp_path):
    from pipelines.eval_chatrex import candidate_source, parse_args, questions

    coco = json.loads((FIXTURE / "annotations.json").read_text())
    argv = ["--model", "m", "--coco", str(FIXTURE / "annotations.json"), "--output", str(tmp_path)]
    if source == "proposals-file":  # a detections file that (wrongly) repeats every annotation verbatim
        dets = [
            {"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.5}
            for a in coco["annotations"]
        ] + [
            {
                "image_id": a["image_id"],
                "category_id": 1,
                "bbox": [a["bbox"][0] + 3, *a["bbox"][1:]],
                "score": 0.4,
            }
            for a in coco["annotations"]
        ]
        (tmp_path / "dets.json").write_text(json.dumps(dets))
        argv += ["--proposals", str(tmp_path / "dets.json")]
    else:
        argv += ["--synthetic-proposals"]
    found = candidate_source(parse_args([*argv, "--limit", "15"]))
    asked = 0
    for n, (record, image) in enumerate(found["records"]):
        if n >= 15:
            break
        items, _ = questions(record, image, ("detection", "referring", "naming"), 100)
        gt = [r["box"] for r in record["regions"]]
        for item in items:
            assert not any(is_verbatim(b, gt) for b in item["boxes"])
        asked += len(items)
    assert asked > 0


def test_coco_evaluation_without_a_proposal_source_is_an_error(tmp_path):
    from pipelines.eval_chatrex import candidate_source, parse_args

    args = parse_args(
        ["--model", "m", "--coco", str(FIXTURE / "annotations.json"), "--output", str(tmp_path)]
    )
    with pytest.raises(SystemExit, match="--proposals DETS.json"):
        candidate_source(args)


def test_proposals_export_round_trips_through_coco_results(tmp_path):
    from chatrex.coco import iter_coco_records
    from chatrex.proposals import load_proposals

    records = [
        r for r, _ in iter_coco_records(FIXTURE / "annotations.json", synthetic_distractors=4, limit=5)
    ]
    results = proposals_to_results(records)
    assert results and all(r["category_id"] == 1 for r in results)
    (tmp_path / "p.json").write_text(json.dumps(results))
    loaded = load_proposals(tmp_path / "p.json")
    for record in records:
        image_id = record["provenance"]["coco"]["image_id"]
        got = [c for p in loaded[image_id] for c in p["box"]]
        assert got == pytest.approx([c for p in record["proposals"] for c in p["box"]], abs=0.02)
    with pytest.raises(ValueError, match="provenance.coco.image_id"):
        proposals_to_results([{"key": "x", "proposals": [{"box": G0, "score": 1.0}]}])
