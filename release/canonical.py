"""Canonical JSON: sorted keys, fixed separators, so identical data always gives identical bytes."""

from __future__ import annotations

import json
from typing import Any


def dumps(data: Any) -> str:
    return json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
