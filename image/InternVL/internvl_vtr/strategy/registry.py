# Copied from image/LLaVA/llava/vtr/strategy/registry.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""Name -> strategy class registry. `@register_strategy("name")` on a `PruningStrategy` subclass."""

from __future__ import annotations

_REGISTRY: dict[str, type] = {}


class UnknownStrategyError(ValueError):
    """Raised for a strategy name nobody registered; the message lists the registered names."""


def register_strategy(name: str):
    """Class decorator: make a `PruningStrategy` subclass available as `VTRConfig(strategy=name)`."""
    key = name.strip().lower()
    if not key or key == "none":
        raise ValueError(f"{name!r} cannot be a strategy name")

    def decorator(cls):
        from .base import PruningStrategy

        if not (isinstance(cls, type) and issubclass(cls, PruningStrategy)):
            raise TypeError(f"@register_strategy({name!r}) must decorate a PruningStrategy subclass, got {cls!r}")
        existing = _REGISTRY.get(key)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"strategy {key!r} is already registered by {existing.__module__}.{existing.__qualname__}")
        _REGISTRY[key] = cls
        cls.name = key
        return cls

    return decorator


def get_strategy(name: str) -> type:
    """The class registered under `name`."""
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        raise UnknownStrategyError(
            f"unknown strategy {name!r}; registered strategies: {', '.join(available_strategies())} "
            "(or 'none' for the unpruned baseline)"
        )
    return _REGISTRY[key]


def available_strategies() -> list[str]:
    return sorted(_REGISTRY)
