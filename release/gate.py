"""The quality gate (`--require`): thresholds on each input's audit.json and on its reject rates.

A release is only as good as its worst input, so every requirement must hold for every --from output.
Metrics of an input: every number in its `audit.json` (nested keys joined with '.', e.g. `box_recall@0.5`),
`reject_rate` (rejects / (records + rejects)) and `reject_rate.<stage>` (that stage's share of inputs).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any

from release.inputs import EngineOutput

OPERATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
_REQUIREMENT = re.compile(r"^\s*([^<>=\s]+)\s*(>=|<=|==|>|<)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class Requirement:
    metric: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


def parse_requirement(text: str) -> Requirement:
    match = _REQUIREMENT.match(text)
    if not match:
        raise ValueError(
            f"--require {text!r}: expected METRIC OP NUMBER with OP one of >=, <=, >, <, ==, "
            "e.g. --require 'box_recall@0.5>=0.6' --require 'reject_rate<=0.3'"
        )
    try:
        return Requirement(match.group(1), match.group(2), float(match.group(3)))
    except ValueError as err:
        raise ValueError(f"--require {text!r}: {match.group(3)!r} is not a number") from err


def _flatten(data: Any, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
    elif isinstance(data, int | float) and not isinstance(data, bool):
        out[prefix[:-1]] = float(data)
    return out


def metrics(out: EngineOutput) -> dict[str, float]:
    """Every metric the gate can test for one input."""
    found = _flatten(out.audit) if out.audit else {}
    counts = out.manifest.get("counts", {})
    total = counts.get("records", 0) + counts.get("rejects", 0)
    found["reject_rate"] = counts.get("rejects", 0) / total if total else 0.0
    for stage, stats in out.manifest.get("stages", {}).items():
        rejected = sum(stats.get("rejected", {}).values())
        found[f"reject_rate.{stage}"] = rejected / total if total else 0.0
    return found


def check(requirements: list[Requirement], outputs: list[EngineOutput]) -> tuple[list[str], list[dict]]:
    """(failures as sentences, every evaluated requirement per input for the manifest)."""
    failures, results = [], []
    for out in outputs:
        available = metrics(out)
        for req in requirements:
            value = available.get(req.metric)
            passed = value is not None and OPERATORS[req.op](value, req.value)
            results.append({"input": out.uri, "requirement": str(req), "value": value, "passed": passed})
            if value is None:
                where = "its audit.json" if out.audit is not None else "it has no audit.json"
                hint = (
                    "run the audit (pipelines/audit.py) on it first"
                    if out.audit is None
                    else f"known metrics: {', '.join(sorted(available))}"
                )
                failures.append(f"{out.uri}: {req.metric} is not available ({where}); {hint}")
            elif not passed:
                failures.append(f"{out.uri}: {req.metric} = {value:.4g}, required {req}")
    return failures, results
