"""`tiny:<name>` model names -> built folders, for every tiny model of the scaffolding.

One entry point above both factories (`tiny_models` for the backends, `tiny_chatrex` built from their
parts), so that neither factory imports the other's caller: `engine.models.resolve_model` imports this.
"""

from __future__ import annotations

from scaffold.tiny_chatrex import TINY_NAME, resolve_chatrex
from scaffold.tiny_models import resolve_model as resolve_backend


def resolve_model(name_or_path: str) -> str:
    """A tiny name -> its folder (built first if needed); any other model id or path unchanged."""
    if name_or_path == TINY_NAME:
        return resolve_chatrex(name_or_path)
    return resolve_backend(name_or_path)
