"""The stage base class lives with the engine's contract (`engine/stage.py`); re-exported for stages."""

from engine.stage import RunContext, Stage

__all__ = ["RunContext", "Stage"]
