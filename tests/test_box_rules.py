"""Geometric region rules and duplicate removal."""

from stages.box_rules import BoxRulesConfig, apply_box_rules, geometry_problem

CFG = BoxRulesConfig(min_side=4, min_area_frac=0.001, max_area_frac=0.9, max_aspect=5, duplicate_iou=0.8)


def region(rid, box, score=0.5):
    return {"id": rid, "box": box, "score": score, "phrase": 0}


def test_geometry_rules_name_the_problem():
    assert geometry_problem([0, 0, 3, 50], 100, 100, CFG).startswith("too small: side")
    assert geometry_problem([0, 0, 5, 5], 1000, 1000, CFG).startswith("too small: area")
    assert geometry_problem([0, 0, 100, 95], 100, 100, CFG).startswith("whole image")
    assert geometry_problem([0, 0, 60, 10], 100, 100, CFG).startswith("extreme aspect")
    assert geometry_problem([10, 10, 40, 50], 100, 100, CFG) is None


def test_duplicates_keep_the_higher_score_and_order_is_preserved():
    regions = [
        region(0, [10, 10, 50, 50], 0.4),
        region(1, [11, 10, 50, 51], 0.9),  # near-identical to 0, better score
        region(2, [60, 60, 90, 90], 0.5),
        region(3, [0, 0, 2, 2], 0.99),  # too small
    ]
    kept, drops = apply_box_rules(regions, 100, 100, CFG)
    assert [r["id"] for r in kept] == [1, 2]
    assert dict(drops)[0] == "duplicate: of region 1"
    assert dict(drops)[3].startswith("too small")
