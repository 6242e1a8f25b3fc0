"""Test and demo scaffolding, outside the core packages: tiny random models and the fixture generator.

Nothing in `engine/`, `stages/`, `schemas/` or `chatrex/` imports this package at import time; `tiny:<name>`
model names reach it (`scaffold.names`) through `engine.models.resolve_model`, which imports it only when
such a name is used.
"""
