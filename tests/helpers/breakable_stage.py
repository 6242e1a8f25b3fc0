"""A stage that fails on every image while a flag file exists: a stand-in for a broken model stage."""

from __future__ import annotations

from pathlib import Path

from engine.config import Resources, Strict
from engine.items import Item
from engine.stage import Stage


class BreakableConfig(Strict):
    broken_while: str = ""  # path of the flag file; while it exists every item raises
    resources: Resources = Resources(batch_size=4, num_cpus=0.25)


class Breakable(Stage):
    """Passes items through, or raises (like a model that cannot run) while the flag exists."""

    name = "breakable"
    config_class = BreakableConfig
    unit = ""

    def process(self, items: list[Item]) -> None:
        if self.cfg.broken_while and Path(self.cfg.broken_while).exists():
            raise RuntimeError("Input type (float) and bias type (c10::BFloat16) should be the same")
