"""The run's books: every processed input comes back exactly once as a record or a reject."""

import pandas as pd
import pytest

from engine.pipeline import AccountingError, check_accounting, write_lost
from engine.sources import SourceItem
from engine.storage import Folder


def sent(*uris: str) -> list[SourceItem]:
    return [SourceItem(uri=u, dataset="d", path=u) for u in uris]


def part(uris: list[str], records: int) -> dict:
    return {"part": "p", "records": records, "rejects": len(uris) - records, "stats": {}, "uris": uris}


def test_balanced_books_pass():
    assert check_accounting(sent("a", "b", "c"), [part(["a", "b"], 2), part(["c"], 0)], False) == []


def test_a_lost_input_fails_loudly_naming_it():
    with pytest.raises(AccountingError, match=r"1 inputs never came back \(first: c\).*rerun"):
        check_accounting(sent("a", "b", "c"), [part(["a", "b"], 2)], tolerate_lost=False)


def test_an_input_written_twice_fails_even_when_losses_are_tolerated():
    with pytest.raises(AccountingError, match="1 inputs written twice"):
        check_accounting(sent("a", "b"), [part(["a", "b"], 2), part(["a"], 1)], tolerate_lost=True)


def test_tolerated_losses_become_reject_rows(tmp_path):
    lost = check_accounting(sent("a", "b", "c"), [part(["a"], 1)], tolerate_lost=True)
    assert lost == ["b", "c"]
    out = Folder(tmp_path)
    results = write_lost(out, "run1", lost, shard_size=100)
    assert sum(r["rejects"] for r in results) == 2
    rejects = pd.read_parquet(tmp_path / "rejects")
    assert sorted(rejects["uri"]) == ["b", "c"] and set(rejects["stage"]) == {"engine"}
    assert rejects["reason"].str.startswith("lost:").all()
