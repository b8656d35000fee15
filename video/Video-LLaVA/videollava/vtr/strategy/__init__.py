# Copied from image/LLaVA/llava/vtr/strategy/__init__.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""Token-scoring strategies. Adding one: write a file here, then add one import line below."""

# Built-in methods: one import line each (importing registers them).
from . import (
    clse,  # noqa: E402,F401
    divprune,  # noqa: E402,F401
    fastv,  # noqa: E402,F401
    pdrop,  # noqa: E402,F401
    priortr,  # noqa: E402,F401
    priortr_2f,  # noqa: E402,F401
    random,  # noqa: E402,F401
    sparsevlm,  # noqa: E402,F401
    vispruner,  # noqa: E402,F401
)
from .base import PruningStrategy
from .registry import available_strategies, get_strategy, register_strategy

__all__ = ["PruningStrategy", "available_strategies", "get_strategy", "register_strategy"]
