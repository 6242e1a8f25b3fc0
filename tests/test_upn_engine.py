"""The engine's UPN proposals backend on fixture images, the schema's granularity field, the COCO export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.config import ModelRef
from engine.items import Item
from schemas import validate
from schemas.record import to_index_row
from stages.proposals import Proposals, ProposalsConfig

FIXTURE = Path(__file__).parent / "fixtures" / "fixture100"


def fixture_items(n: int) -> list[Item]:
    coco = json.loads((FIXTURE / "annotations.json").read_text())
    items = []
    for image in sorted(coco["images"], key=lambda im: im["id"])[:n]:
        data = (FIXTURE / image["file_name"]).read_bytes()
        record = {"width": image["width"], "height": image["height"], "proposals": []}
        items.append(Item(key=str(image["id"]), uri=image["file_name"], image=data, record=record))
    return items


@pytest.mark.parametrize("granularity", ["coarse", "fine", "both"])
def test_upn_backend_tags_granularity_and_stays_inside_the_image(granularity):
    cfg = ProposalsConfig(
        enabled=True,
        backend="upn",
        granularity=granularity,
        model=ModelRef(name="tiny:upn"),
        score_threshold=0.0,
        min_side=1,
        max_proposals=30,
        max_image_side=256,
    )
    items = fixture_items(3)
    Proposals(cfg).process(items)
    expected = {"coarse", "fine"} if granularity == "both" else {granularity}
    seen = set()
    for item in items:
        props = item.record["proposals"]
        assert 0 < len(props) <= 30
        scores = [p["score"] for p in props]
        assert scores == sorted(scores, reverse=True)
        for p in props:
            x0, y0, x1, y1 = p["box"]
            assert 0 <= x0 < x1 <= item.record["width"] and 0 <= y0 < y1 <= item.record["height"]
            seen.add(p["granularity"])
    assert seen == expected


def test_schema_accepts_granularity_and_index_carries_it():
    from tests.test_schema import valid_record

    record = valid_record()
    record["proposals"] = [
        {"box": [0, 0, 10, 10], "score": 0.5, "granularity": "fine"},
        {"box": [0, 0, 20, 20], "score": 0.4},  # proposers without granularity stay valid
    ]
    assert validate(record) == []
    row = to_index_row(record, "000000")
    assert [p["granularity"] for p in row["proposals"]] == ["fine", None]
    record["proposals"][0]["granularity"] = "medium"
    assert any("granularity" in e for e in validate(record))
