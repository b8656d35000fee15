# Copied from image/LLaVA/llava/vtr/model_args.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""Command-line `key=value` arguments -> `VTRConfig`, typed from the dataclass annotations.

Every `VTRConfig` field is accepted by name with no per-field code, so a field added to the dataclass
is settable from `--model_args` at once. Lists are written `[3,7,16]` or `3;7;16` (lmms-eval splits
`--model_args` on commas outside brackets). Unknown keys are errors that list the valid ones.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import fields

from .config import VTRConfig

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class ModelArgsError(ValueError):
    """A `--model_args` entry is unknown or has the wrong type."""


class CheckpointNotFoundError(FileNotFoundError):
    """A checkpoint given as a local folder that does not exist or holds no model config."""


#: files one of which a saved processor folder holds
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json", "config.json")


def check_checkpoint(pretrained, files=("config.json",)) -> None:
    """Fail clearly on a local checkpoint folder that is missing or is not a saved model (transformers would
    answer "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"); `files`: one of them must be
    in the folder (PROCESSOR_FILES for a processor). A hub id (`name` or
    `namespace/name`) that is not a local path passes through to transformers."""
    import os
    from pathlib import Path

    text = os.fspath(pretrained)
    path = Path(text).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in files):
            raise CheckpointNotFoundError(
                f"model folder {text!r} holds no {' or '.join(files)}: not a saved checkpoint"
            )
        return
    parts = text.replace("\\", "/").split("/")
    looks_local = (
        text.startswith((".", "/", "~")) or len(parts) > 2 or "" in parts or (len(parts) == 2 and path.parent.is_dir())
    )
    if path.is_file():
        raise CheckpointNotFoundError(f"model path {text!r} is a file; give the checkpoint's folder (or a hub id)")
    if looks_local:
        raise CheckpointNotFoundError(
            f"model folder {text!r} does not exist (a local path; a hub id has the form 'namespace/name')"
        )


def checkpoint_model_type(pretrained: str, **kwargs) -> str:
    """The `model_type` of a checkpoint's config (hub id or local folder, checked first); of `kwargs` only the
    hub options (revision, trust_remote_code, cache_dir, token, local_files_only) reach transformers."""
    from transformers import AutoConfig

    check_checkpoint(pretrained)
    keys = ("revision", "trust_remote_code", "cache_dir", "token", "local_files_only")
    return AutoConfig.from_pretrained(pretrained, **{k: v for k, v in kwargs.items() if k in keys}).model_type


def split_args(arg_string: str) -> dict[str, str]:
    """`a=1,b=[2,3],c=x` -> {'a': '1', 'b': '[2,3]', 'c': 'x'} (commas inside brackets/quotes kept)."""
    parts, current, depth, quote = [], [], 0, None
    for ch in arg_string.strip():
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[({":
            depth += 1
        elif ch in "])}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    out = {}
    for part in (p.strip() for p in parts):
        if not part:
            continue
        if "=" not in part:
            raise ModelArgsError(f"model_args entry {part!r} is not key=value")
        key, value = part.split("=", 1)
        out[key.strip()] = value.strip().strip("\"'")
    return out


def _scalar(text: str, kind):
    if kind is bool:
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError
    if kind is int:
        return int(text)
    if kind is float:
        return float(text)
    if kind is str:
        return text
    raise ValueError


def _options(annotation) -> list:
    """Flatten `int | list[int] | None` into [int, list[int], NoneType]."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return list(typing.get_args(annotation))
    return [annotation]


def convert(value, annotation, name: str):
    """Convert a command-line value to the field's annotated type (already-typed values pass through)."""
    if not isinstance(value, str):
        value = str(value).lower() if isinstance(value, bool) else str(value)
    text = value.strip()
    options = _options(annotation)
    if type(None) in options and text.lower() in ("none", "null", ""):
        return None
    is_list = text.startswith("[") or ";" in text
    for option in options:
        if typing.get_origin(option) is list and is_list:
            (item,) = typing.get_args(option)
            items = [t.strip() for t in text.strip("[]").replace(";", ",").split(",") if t.strip()]
            try:
                return [_scalar(t, item) for t in items]
            except ValueError:
                continue
        if option in (bool, int, float, str) and not is_list:
            try:
                return _scalar(text, option)
            except ValueError:
                continue
    shown = " | ".join(getattr(o, "__name__", str(o)) if o is not type(None) else "None" for o in options)
    raise ModelArgsError(f"model_args {name}={value!r} does not parse as {shown}")


def vtr_field_types() -> dict[str, object]:
    hints = typing.get_type_hints(VTRConfig)
    return {f.name: hints[f.name] for f in fields(VTRConfig) if f.init}


def parse_model_args(raw: dict, load_args: dict[str, object]) -> tuple[dict, VTRConfig]:
    """Split `raw` into (loading kwargs, VTRConfig).

    `load_args` maps each accepted loading key to its annotated type. Anything that is neither a loading
    key nor a `VTRConfig` field is an error naming the closest valid key and listing them all.
    """
    vtr_types = vtr_field_types()
    loading, vtr = {}, {}
    for key, value in raw.items():
        if key in vtr_types:
            vtr[key] = convert(value, vtr_types[key], key)
        elif key in load_args:
            loading[key] = convert(value, load_args[key], key)
        else:
            valid = sorted(load_args) + sorted(vtr_types)
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ModelArgsError(f"unknown model_args key {key!r}{hint}; valid keys: {', '.join(valid)}")
    return loading, VTRConfig(**vtr)


_BUDGET_TAGS = {"keep_tokens": "keep", "score_threshold": "thr", "keep_ratio": "ratio"}


def describe(config: VTRConfig) -> str:
    """A short, filesystem-safe tag of the settings that change results, e.g. `fastv_K2_keep64`."""
    if not config.enabled:
        return "unpruned"
    parts = [config.strategy, "K" + "-".join(str(k) for k in config.prune_layers)]
    for name, tag in _BUDGET_TAGS.items():  # the budget that takes priority
        value = getattr(config, name)
        if value is not None:
            parts.append(tag + "-".join(str(v) for v in (value if isinstance(value, list) else [value])))
            break
    if config.query_aggregation != "last":
        parts.append(f"q{config.query_aggregation}")
    if config.head_aggregation != "mean":
        parts.append(f"h{config.head_aggregation}")
    if config.strategy == "random":
        parts.append(f"seed{config.seed}")
    # every other field that differs from its default (method options such as important_ratio=0.25)
    named = {"enabled", "strategy", "prune_layer", "query_aggregation", "head_aggregation", "seed", *_BUDGET_TAGS}
    for f in fields(VTRConfig):
        if f.init and f.name not in named and getattr(config, f.name) != f.default:
            value = getattr(config, f.name)
            parts.append(f"{f.name}{'-'.join(map(str, value)) if isinstance(value, list) else value}")
    return "_".join(parts)
