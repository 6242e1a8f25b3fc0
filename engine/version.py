"""The code version recorded in manifests and release cards: package version plus the git commit."""

from __future__ import annotations

import subprocess
from pathlib import Path


def code_version() -> str:
    """Package version plus git commit when run from a checkout (builds of one commit match)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("rexverse")
    except PackageNotFoundError:
        text = "unknown"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{text}+{commit}" if commit else text
