#!/usr/bin/env python3
"""The method x backbone matrix, read from the forks' own registries (never written by hand).

Each fork package of forks.toml (the columns follow its order) registers its methods
(`<package>.strategy.available_strategies()`; only those of the shared core count, not one written in a single
fork and not yet shared) and names the model families it has an adapter for (`<package>.BACKBONES`: name -> adapter
class; a fork naming none is an error). A cell is "yes" when the fork that serves the backbone registers the method
and the family's adapter provides every fact the method `requires` (its `facts`), "—" otherwise; a video method
(one that `requires` the `frames` fact: it reduces video tokens only) reads "video only" where it runs.

    scripts/capability_matrix.py            print the Markdown table
    scripts/capability_matrix.py --check    exit 1 if README.md's table differs (make test runs this)
    scripts/capability_matrix.py --write    rewrite README.md's table
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import forks  # noqa: E402  (scripts/forks.py: the registry of the forks)

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- capability-matrix:start -->", "<!-- capability-matrix:end -->"


class MatrixError(Exception):
    pass


def backbones(package: str) -> list[str]:
    """The model families `package` has an adapter for (its `BACKBONES`)."""
    mapping = getattr(importlib.import_module(package), "BACKBONES", None)
    if not mapping:
        raise MatrixError(f"{package}.BACKBONES is missing or empty: name the model families it has an adapter for")
    if not isinstance(mapping, dict):
        raise MatrixError(f"{package}.BACKBONES must map each model family to its adapter class")
    return list(mapping)


def shipped(package: str) -> list[str]:
    """The methods a fork registers from its shared core (files carrying the shared header or a copy
    marker); a method written in one fork and not yet shared (`make share-method`) is left out."""
    strategy = importlib.import_module(f"{package}.strategy")
    names = []
    for name in strategy.available_strategies():
        module = sys.modules[strategy.get_strategy(name).__module__]
        first = Path(module.__file__).read_text(encoding="utf-8").split("\n", 1)[0] if module.__file__ else ""
        if first.startswith(("# Shared vtr file:", "# Copied from ")):
            names.append(name)
    return names


def fork_packages() -> list[str]:
    """The fork packages, in the table's column order: forks.toml's."""
    try:
        return [fork.package for fork in forks.load().forks.values()]
    except forks.RegistryError as error:
        raise MatrixError(str(error)) from None


def check_families() -> None:
    """Each fork's families in forks.toml cover exactly the models its package names (`BACKBONES`): the
    registry and the forks never disagree about what a fork serves."""
    try:
        registry = forks.load()
    except forks.RegistryError as error:
        raise MatrixError(str(error)) from None
    for fork in registry.forks.values():
        listed = {m for family in registry.families.values() if family.fork is fork for m in family.models}
        named = set(backbones(fork.package))
        if listed != named:
            extra, missing = sorted(listed - named), sorted(named - listed)
            raise MatrixError(
                f"forks.toml's [family.*] models of fork {fork.name!r} and {fork.package}.BACKBONES differ: "
                + "; ".join(
                    part
                    for part in (
                        f"not in BACKBONES: {', '.join(extra)}" if extra else "",
                        f"in no family: {', '.join(missing)}" if missing else "",
                    )
                    if part
                )
            )


def supported(package: str, method: str, backbone: str) -> bool:
    """Whether the adapter of `backbone` (`<package>.BACKBONES[backbone]`) provides every fact the method
    `requires` (a family that lacks one refuses the method: "not supported on ...")."""
    adapter = importlib.import_module(package).BACKBONES[backbone]
    return not importlib.import_module(f"{package}.strategy").get_strategy(method).missing_facts(adapter)


def video_only(package: str, method: str) -> bool:
    """Whether `method` reduces video tokens only (it `requires` the `frames` fact)."""
    return "frames" in importlib.import_module(f"{package}.strategy").get_strategy(method).requires


def matrix(packages: list[str]) -> str:
    columns, methods, cells = [], set(), {}
    for package in packages:
        registered = shipped(package)
        methods.update(registered)
        for backbone in backbones(package):
            columns.append(backbone)
            for method in registered:
                if supported(package, method, backbone):
                    cells[(method, backbone)] = "video only" if video_only(package, method) else "yes"
    header = "| method | " + " | ".join(columns) + " |"
    lines = [header, "|---" * (len(columns) + 1) + "|"]
    for method in sorted(methods):
        marks = [cells.get((method, b), "—") for b in columns]
        lines.append(f"| `{method}` | " + " | ".join(marks) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true", help="fail if README.md's table is stale")
    group.add_argument("--write", action="store_true", help="rewrite README.md's table")
    args = parser.parse_args(argv)
    try:
        check_families()
        table = matrix(fork_packages())
    except MatrixError as error:
        print(f"capability_matrix: error: {error}", file=sys.stderr)
        return 2
    if not (args.check or args.write):
        print(table)
        return 0
    text = README.read_text()
    if START not in text or END not in text:
        print(f"capability_matrix: README.md has no {START} ... {END} block", file=sys.stderr)
        return 2
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{table}\n{END}{tail}"
    if args.write:
        README.write_text(new)
        return 0
    if new != text:
        print(
            "capability_matrix: README.md's table is stale; run scripts/capability_matrix.py --write", file=sys.stderr
        )
        return 1
    print("capability_matrix: README.md is up to date.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
