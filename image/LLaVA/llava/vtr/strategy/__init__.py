"""Token-scoring strategies: the built-in ones (builtin.py, shared by every fork) and this fork's own.

Adding a method: write a file here with a `@register_strategy("name")` class, then add one import line
at the end of this file. `make share-method METHOD=name` later puts it into every fork."""

from . import builtin  # noqa: F401
from .base import PruningStrategy
from .registry import available_strategies, get_strategy, register_strategy

__all__ = ["PruningStrategy", "available_strategies", "get_strategy", "register_strategy"]

# This fork's own methods: one import line each.
