"""The ChatRex task mix and the index-based detection metrics."""

import random

from test_schema import valid_record

from chatrex.metrics import DetectionCounts, coco_map, matched
from chatrex.parsing import parse_answer
from chatrex.tasks import make_task, mix_boxes, sample_task


def record_with_proposals():
    record = valid_record()
    record["regions"][1]["category"] = "ball"  # two regions of one category
    record["proposals"] = [
        {"box": [1.0, 2.0, 50.0, 61.0], "score": 0.9},  # duplicate of region 0 -> left out
        {"box": [0.0, 0.0, 10.0, 10.0], "score": 0.5},
        {"box": [20.0, 20.0, 30.0, 30.0], "score": 0.4},
    ]
    return record


def test_mix_keeps_every_region_drops_duplicate_proposals_and_caps():
    record = record_with_proposals()
    boxes = mix_boxes(record, 100, random.Random(0))
    assert len(boxes.boxes) == 4 and set(boxes.region_index) == {0, 3}
    for region in record["regions"]:
        assert boxes.boxes[boxes.region_index[region["id"]]] == region["box"]
    capped = mix_boxes(record, 3, random.Random(0))
    assert len(capped.boxes) == 3 and set(capped.region_index) == {0, 3}


def test_detection_answer_points_at_all_regions_of_the_category():
    record = record_with_proposals()
    boxes = mix_boxes(record, 100, random.Random(1))
    sample = make_task("detect", record, boxes, random.Random(0))
    (group,) = parse_answer(sample.answer, len(boxes.boxes))
    assert group.phrase == "ball" and sorted(group.indices) == sorted(boxes.region_index.values())
    assert sample.question == "Detect every ball in the image."


def test_proposals_mode_answers_every_box_that_covers_an_object():
    record = record_with_proposals()
    record["regions"][1]["category"] = "box"
    record["proposals"] = [
        {"box": [2.0, 2.0, 50.0, 60.0], "score": 0.9},  # covers region 0 (ball), IoU 0.96
        {"box": [1.0, 4.0, 48.0, 60.0], "score": 0.8},  # covers region 0 too, IoU 0.91
        {"box": [60.0, 12.0, 100.0, 80.0], "score": 0.7},  # covers region 3 (box)
        {"box": [30.0, 30.0, 70.0, 70.0], "score": 0.6},  # partial: covers nothing
    ]
    boxes = mix_boxes(record, 100, random.Random(0), candidates="proposals")
    index_of = {tuple(b): i for i, b in enumerate(boxes.boxes)}
    ball = sorted(index_of[tuple(p["box"])] for p in record["proposals"][:2])
    assert boxes.covers == {0: ball, 3: [index_of[(60.0, 12.0, 100.0, 80.0)]]}
    assert boxes.region_index[0] in ball  # the one-to-one match still names the region
    detect = make_task("detect", record, boxes, random.Random(1))
    (group,) = parse_answer(detect.answer, len(boxes.boxes))
    assert sorted(group.indices) == (ball if group.phrase == "ball" else boxes.covers[3])
    for seed in range(6):
        count = make_task("count", record, boxes, random.Random(seed))
        assert count.answer.startswith("1 ")  # one ball, though two boxes cover it


def test_region_refer_caption_and_count_tasks_are_consistent():
    record = record_with_proposals()
    boxes = mix_boxes(record, 100, random.Random(2))
    refer = make_task("refer", record, boxes, random.Random(3))
    (group,) = parse_answer(refer.answer, len(boxes.boxes))
    region = next(r for r in record["regions"] if r["referring"] == group.phrase)
    assert group.indices == [boxes.region_index[region["id"]]]
    caption = make_task("caption", record, boxes, random.Random(0))
    assert [g.phrase for g in parse_answer(caption.answer, len(boxes.boxes))] == ["red ball", "blue box"]
    count = make_task("count", record, boxes, random.Random(0))
    assert count.answer.startswith("2 ")
    region_task = make_task("region", record, boxes, random.Random(5))
    assert region_task.task.startswith("region_") and "<obj" in region_task.question


def test_sample_task_returns_none_without_regions():
    record = valid_record()
    record["regions"] = []
    record["grounded_caption"]["spans"] = []
    assert sample_task(record, random.Random(0), 100) is None


def test_matching_is_one_to_one_at_iou_half():
    gt = [[0, 0, 10, 10], [20, 20, 30, 30]]
    assert matched([[0, 0, 10, 10], [0, 0, 10, 11]], gt) == 1  # two predictions, one object
    assert matched([[0, 0, 10, 10], [20, 20, 30, 30]], gt) == 2
    assert matched([[0, 0, 4, 10]], gt) == 0  # IoU 0.4
    counts = DetectionCounts()
    counts.add([[0, 0, 10, 10], [50, 50, 60, 60]], gt)
    assert (counts.precision, counts.recall) == (0.5, 0.5) and abs(counts.f1 - 0.5) < 1e-9


def test_coco_map_of_perfect_detections_is_one():
    gt = {
        "images": [{"id": 1}],
        "categories": [{"id": 1, "name": "ball"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0}
        ],
    }
    perfect = coco_map(gt, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9}])
    wrong = coco_map(gt, [{"image_id": 1, "category_id": 1, "bbox": [50, 50, 10, 10], "score": 0.9}])
    assert perfect == {"mAP": 1.0, "AP50": 1.0} and wrong["AP50"] == 0.0


def test_learning_rate_schedule_warms_up_then_decays_to_a_tenth():
    from chatrex.train_config import StageConfig
    from pipelines.train_chatrex import lr_factor

    stage = StageConfig(name="perception", steps=100, lr=1e-3, warmup_steps=10)
    factors = [lr_factor(s, stage) for s in range(100)]
    assert factors[0] == 0.1 and factors[9] == 1.0
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert abs(lr_factor(100, stage) - 0.1) < 1e-9 and factors[55] > 0.5
