"""Backends that run the official research packages (`sam2`, `groundingdino-py`) instead of transformers.

Each module imports its package lazily, so importing `stages.backends` costs nothing and works where the
package is not installed; only building a backend object needs it.
"""
