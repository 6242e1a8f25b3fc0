"""The run's books, per source: every member a source holds comes back once, as a record or a reject."""

import pandas as pd
import pytest

from engine.ledger import Ledger, missing, to_ranges
from engine.pipeline import AccountingError, check_accounting, write_lost
from engine.storage import Folder


def books(*parts: dict[str, list[int]]) -> Ledger:
    """A ledger of parts, each {source: ordinals it covers}."""
    ledger = Ledger()
    for part in parts:
        sources = {
            s: {"ranges": [list(r) for r in to_ranges(ns)], "stage_errors": []} for s, ns in part.items()
        }
        ledger.add_marker({"sources": sources})
    return ledger


def test_balanced_books_pass():
    ledger = books({"a.tar": [0, 1]}, {"a.tar": [2], "b.tar": [0]})
    assert check_accounting(ledger, {"a.tar": 3, "b.tar": 1}, False) == {}


def test_a_lost_member_fails_loudly_naming_its_source():
    with pytest.raises(AccountingError, match=r"a.tar: 1 of 3 members never came back \(first: #2\).*rerun"):
        check_accounting(books({"a.tar": [0, 1]}), {"a.tar": 3}, tolerate_lost=False)


def test_a_member_written_twice_fails_even_when_losses_are_tolerated():
    with pytest.raises(AccountingError, match="a.tar: 1 members written twice"):
        check_accounting(books({"a.tar": [0, 1]}, {"a.tar": [1]}), {"a.tar": 2}, tolerate_lost=True)


def test_a_source_never_read_to_its_end_fails():
    with pytest.raises(AccountingError, match="never read to their end \\(first: b.tar\\)"):
        check_accounting(books({"a.tar": [0]}), {"a.tar": 1, "b.tar": None}, tolerate_lost=False)


def test_tolerated_losses_become_reject_rows(tmp_path):
    gaps = check_accounting(books({"a.tar": [0]}), {"a.tar": 3}, tolerate_lost=True)
    assert gaps == {"a.tar": [(1, 3)]}
    out = Folder(tmp_path)
    results = write_lost(out, "run1", gaps, shard_size=100)
    assert sum(r["rejects"] for r in results) == 2 and results[0]["sources"]["a.tar"]["ranges"] == [[1, 3]]
    rejects = pd.read_parquet(tmp_path / "rejects")
    assert sorted(rejects["uri"]) == ["a.tar@1", "a.tar@2"] and set(rejects["stage"]) == {"engine"}
    assert rejects["reason"].str.startswith("lost:").all()


def test_ranges():
    assert to_ranges([5, 0, 1, 2, 2, 7]) == [(0, 3), (5, 6), (7, 8)]
    assert missing([(0, 3), (5, 6)], 8) == [(3, 5), (6, 8)] and missing([(0, 4)], 4) == []
