# Copied from image/LLaVA/llava/vtr/strategy/builtin.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""The built-in methods, shared by every fork: one import line each (importing registers them).

`make share-method METHOD=<name>` moves a method you wrote in one fork here and copies it into every fork."""

from . import (  # noqa: F401
    cdpruner,
    clse,
    dart,
    divprune,
    dycoke,
    evs,
    fastervlm,
    fastv,
    fastvid,
    framefusion,
    hiprune,
    holitom,
    pdrop,
    pool,
    priortr,
    priortr_2f,
    random,
    sparsevlm,
    vidcom2,
    visionzip,
    vispruner,
)
