#!/usr/bin/env python3
"""Keep deliberate cross-fork copies identical.

A file that is a copy of another fork's file starts with one marker line:

    # Copied from image/LLaVA/llava/vtr/strategy/fastv.py
    # Copied from image/LLaVA/llava/vtr/strategy/fastv.py with llava->internvl_vtr, LLaVA->InternVL

The rest of the copy must equal the origin (paths are relative to the repository root) after the
plain-text substitutions `old->new`, applied left to right. An origin may not itself be a copy.

The shared core (engine, config, strategies, scoring attention, model_args, cost model) is listed in
MANIFEST below: every fork of forks.toml must hold a byte-identical copy of every shared file of the origin
fork's package (forks.toml's `origin`), so a fork that never got a file, or a copy whose header was deleted,
is an error rather than a new origin. pyproject.toml's pytest testpaths and ruff known-first-party (which
cannot read forks.toml) must name exactly the registry's forks: a missing or extra entry is an error too.

    scripts/check_copies.py                  check every copy and the manifest; exit 1 on drift, with a diff.
                                             A copy that is behind only because you edited its origin
                                             (uncommitted; the copy has no edits of its own) is brought up
                                             to date and named, not reported: nothing can be lost.
    scripts/check_copies.py --fix            rewrite drifted copies from their origins, create missing ones
    scripts/check_copies.py --share METHOD   put strategy/METHOD.py, written in one fork, into every fork
                                             (`make share-method METHOD=...`; see docs/adding-a-method.md)
    scripts/check_copies.py --add SRC DST [--sub old->new ...]
                                             drop a new copy of SRC at DST (how a method moves to a fork)
    --root DIR                               the tree to work on (default: this repository)
"""

from __future__ import annotations

import argparse
import difflib
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import forks  # noqa: E402  (scripts/forks.py: the registry of the forks)

MARKER = re.compile(r"^# Copied from (?P<origin>\S+)(?: with (?P<subs>.+))?$")
SKIP_DIRS = {".git", ".venv", "__pycache__", ".cache", "node_modules", "build"}

#: The shared core: the files of the origin fork's package (forks.toml) every other fork copies byte-identically.
SHARED_FILES = [
    "engine.py",
    "attention.py",
    "config.py",
    "model_args.py",
    "cost.py",
    "lmms_eval_base.py",
    "lmms_eval_compat.py",
    "timing.py",
    "strategy/builtin.py",
    "strategy/base.py",
    "strategy/registry.py",
    "strategy/fastv.py",
    "strategy/priortr.py",
    "strategy/random.py",
    "strategy/priortr_2f.py",
    "strategy/pdrop.py",
    "strategy/sparsevlm.py",
    "strategy/vispruner.py",
    "strategy/divprune.py",
    "strategy/clse.py",
]
SHARED_HEADER = "# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork."


def registry(root: Path) -> forks.Registry:
    """`root`'s forks.toml: the forks (the origin's package holds the shared core) and the model families."""
    try:
        return forks.load(root)
    except forks.RegistryError as error:
        raise CopyError(str(error)) from None


def packages(root: Path) -> tuple[str, list[str]]:
    """The origin fork's package folder and the other forks' package folders."""
    reg = registry(root)
    others = [fork.package_dir for fork in reg.forks.values() if fork.name != reg.origin.name]
    return reg.origin.package_dir, others


def check_pyproject(root: Path) -> int:
    """pyproject.toml's pytest testpaths and ruff known-first-party (neither tool can read forks.toml) must name
    exactly the registry's forks: a line per entry missing or extra; returns their number."""
    reg = registry(root)
    try:
        data = forks.read_toml(root / "pyproject.toml", "it holds pytest's testpaths and ruff's known-first-party")
    except forks.RegistryError as error:
        raise CopyError(str(error)) from None
    testpaths = {forks.SCRIPTS_TESTS: "the scripts' tests"}
    testpaths.update({fork.tests: f"the tests of [fork.{fork.name}]" for fork in reg.forks.values()})
    first_party = {n: f"an import name of [fork.{f.name}]" for f in reg.forks.values() for n in f.import_names}
    settings = [
        ("[tool.pytest.ini_options] testpaths", ("tool", "pytest", "ini_options", "testpaths"), testpaths),
        (
            "[tool.ruff.lint.isort] known-first-party",
            ("tool", "ruff", "lint", "isort", "known-first-party"),
            first_party,
        ),
    ]
    problems = 0
    for setting, keys, want in settings:
        have = data
        for key in keys:
            have = have.get(key) if isinstance(have, dict) else None
        have = have if isinstance(have, list) else []
        for entry, why in want.items():
            if entry not in have:
                problems += 1
                print(f"pyproject.toml: {setting} lacks {entry!r} ({why} in forks.toml); add it")
        for entry in have:
            if entry not in want:
                problems += 1
                print(f"pyproject.toml: {setting} has {entry!r}, which forks.toml does not name; remove it")
    return problems


def shared_names(root: Path) -> list[str]:
    """SHARED_FILES, plus any other file of the origin package that starts with SHARED_HEADER (a method
    shared with `--share`)."""
    names = list(SHARED_FILES)
    origin = packages(root)[0]
    for path in sorted((root / origin).rglob("*.py")):
        name = path.relative_to(root / origin).as_posix()
        if name not in names and "__pycache__" not in name and _first_line(path) == SHARED_HEADER:
            names.append(name)
    return names


def _first_line(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").split("\n", 1)[0]
    except (UnicodeDecodeError, OSError):
        return ""


def manifest(root: Path) -> list[tuple[str, str]]:
    """(origin, copy) pairs the manifest requires; empty for trees without the origin package's engine."""
    origin, others = packages(root)
    if not (root / origin / "engine.py").is_file():
        return []
    return [(f"{origin}/{name}", f"{fork}/{name}") for name in shared_names(root) for fork in others]


def check_manifest(root: Path, fix: bool) -> int:
    """Every shared origin starts with SHARED_HEADER and every fork holds a marked copy of it."""
    problems = 0
    for origin, dst in manifest(root):
        if not (root / origin).is_file():
            raise CopyError(f"shared origin {origin} (scripts/check_copies.py MANIFEST) does not exist")
        first = (root / origin).read_text(encoding="utf-8").split("\n", 1)[0]
        if first != SHARED_HEADER:
            raise CopyError(f"shared origin {origin} must start with the line: {SHARED_HEADER}")
        target = root / dst
        marker = f"# Copied from {origin}"
        copy = read_marker(target) if target.is_file() else None
        if copy is not None and copy.origin == origin and not copy.subs:
            continue  # content is compared by check()
        problems += 1
        if not fix:
            why = "is missing" if not target.is_file() else f"does not start with '{marker}' (byte-identical copy)"
            print(f"MANIFEST {dst} {why}")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(expected_text(root, Copy(target, origin, [], marker)), encoding="utf-8")
        print(f"fixed {dst} (from {origin}, required by the manifest)")
    return problems


class CopyError(Exception):
    pass


@dataclass
class Copy:
    path: Path
    origin: str
    subs: list[tuple[str, str]]
    marker: str


def parse_subs(text: str | None) -> list[tuple[str, str]]:
    subs = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        if "->" not in part:
            raise CopyError(f"bad substitution {part!r}: expected old->new")
        old, new = (s.strip() for s in part.split("->", 1))
        if not old:
            raise CopyError(f"bad substitution {part!r}: empty pattern")
        subs.append((old, new))
    return subs


def read_marker(path: Path) -> Copy | None:
    try:
        first = path.read_text(encoding="utf-8").split("\n", 1)[0]
    except (UnicodeDecodeError, OSError):
        return None
    m = MARKER.match(first.rstrip())
    if not m:
        return None
    return Copy(path, m.group("origin"), parse_subs(m.group("subs")), first.rstrip())


def find_copies(root: Path) -> list[Copy]:
    copies = []
    for path in sorted(root.rglob("*.py")):
        if SKIP_DIRS & set(path.relative_to(root).parts):
            continue
        copy = read_marker(path)
        if copy is not None:
            copies.append(copy)
    return copies


def expected_text(root: Path, copy: Copy) -> str:
    origin = root / copy.origin
    if not origin.is_file():
        raise CopyError(f"{copy.path.relative_to(root)}: origin {copy.origin} does not exist")
    if read_marker(origin) is not None:
        raise CopyError(f"{copy.path.relative_to(root)}: origin {copy.origin} is itself a copy; point at its origin")
    body = origin.read_text(encoding="utf-8")
    for old, new in copy.subs:
        body = body.replace(old, new)
    return copy.marker + "\n" + body


def _git(root: Path, *args: str) -> str | None:
    """git's output; None outside a git checkout or when git fails (e.g. a file the revision does not hold)."""
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, check=False, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.decode("utf-8") if out.returncode == 0 else None


def _expanded(copy: Copy, origin_text: str) -> str:
    for old, new in copy.subs:
        origin_text = origin_text.replace(old, new)
    return copy.marker + "\n" + origin_text


def untouched(root: Path, copy: Copy, have: str, since_last_sync: bool = False) -> bool:
    """True when the copy has no edits of its own, so updating it from its origin loses nothing: it equals its
    committed text, which equalled its origin at HEAD (the origin's edits are uncommitted), or, with
    `since_last_sync`, at the last commit that touched the copy (the origin's edits may be committed)."""
    rel = copy.path.relative_to(root).as_posix()
    committed_copy = _git(root, "show", f"HEAD:{rel}")
    if committed_copy is None or committed_copy != have:
        return False
    revision = "HEAD"
    if since_last_sync:
        revision = (_git(root, "log", "-1", "--format=%H", "--", rel) or "").strip()
        if not revision:
            return False
    committed_origin = _git(root, "show", f"{revision}:{copy.origin}")
    return committed_origin is not None and _expanded(copy, committed_origin) == committed_copy


def check(root: Path, fix: bool) -> int:
    mismatched = check_pyproject(root)
    missing = check_manifest(root, fix)
    copies = find_copies(root)
    drifted, followed = 0, []
    for copy in copies:
        rel = copy.path.relative_to(root)
        want = expected_text(root, copy)
        have = copy.path.read_text(encoding="utf-8")
        if have == want:
            continue
        if not fix and untouched(root, copy, have):  # the origin's uncommitted edits: carried, nothing lost
            copy.path.write_text(want, encoding="utf-8")
            followed.append(str(rel))
            continue
        drifted += 1
        if fix:
            copy.path.write_text(want, encoding="utf-8")
            print(f"fixed {rel} (from {copy.origin})")
        else:
            diff = difflib.unified_diff(
                want.splitlines(True), have.splitlines(True), f"{copy.origin} (expected)", f"{rel} (actual)"
            )
            hint = (
                " (it has no edits of its own: `make fix-copies` brings it up to date)"
                if untouched(root, copy, have, since_last_sync=True)
                else ""
            )
            print(f"DRIFT {rel} differs from {copy.origin}{hint}:")
            sys.stdout.writelines(list(diff)[:60])
    if followed:
        print(f"check_copies: your edits of their origins are now in {len(followed)} copies: {', '.join(followed)}")
    status = "fixed" if fix else "drifted"
    extra = f", {missing} required by the manifest {'created' if fix else 'missing'}" if missing else ""
    extra += f", {mismatched} pyproject.toml entries to fix by hand" if mismatched else ""
    print(f"check_copies: {len(copies)} copies checked, {drifted} {status}{extra}.")
    return 1 if ((drifted or missing) and not fix) or mismatched else 0


def add(root: Path, src: str, dst: str, subs: list[str]) -> int:
    origin = root / src
    if not origin.is_file():
        raise CopyError(f"no such origin file: {src}")
    target = root / dst
    if target.exists():
        raise CopyError(f"{dst} already exists; use --fix to refresh an existing copy")
    marker = f"# Copied from {src}" + (f" with {', '.join(subs)}" if subs else "")
    copy = Copy(target, src, parse_subs(", ".join(subs)), marker)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(expected_text(root, copy), encoding="utf-8")
    print(f"added {dst} as a copy of {src}")
    return 0


def share(root: Path, method: str) -> int:
    """Put a method written in one fork (its `strategy/<method>.py` and the import line in that fork's
    `strategy/__init__.py`) into every fork: the file moves to the origin package with SHARED_HEADER, its
    import moves into the shared `strategy/builtin.py`, and every fork gets a copy (config fields it added to
    the origin's config.py travel with the shared core). Refuses when a copy has edits of its own."""
    module = Path(method).stem
    origin_package, others = packages(root)
    homes = [p for p in [origin_package, *others] if (root / p / "strategy" / f"{module}.py").is_file()]
    if not homes:
        raise CopyError(f"no fork has strategy/{module}.py (looked in {origin_package} and {', '.join(others)})")
    if len(homes) > 1:
        raise CopyError(f"strategy/{module}.py exists in several forks ({', '.join(homes)}); keep one and retry")
    home = root / homes[0]
    source = home / "strategy" / f"{module}.py"
    text = source.read_text(encoding="utf-8")
    if text.split("\n", 1)[0] == SHARED_HEADER or read_marker(source) is not None:
        raise CopyError(f"{source.relative_to(root)} is already shared")
    own_edits = [
        str(c.path.relative_to(root))
        for c in find_copies(root)
        if c.path.read_text(encoding="utf-8") != expected_text(root, c)
        and not untouched(root, c, c.path.read_text(encoding="utf-8"), since_last_sync=True)
    ]
    if own_edits:
        raise CopyError(
            f"these copies have edits of their own, which sharing would overwrite: {', '.join(own_edits)}; "
            f"make the same edits in their origin ({origin_package}) and undo them in the copies first"
        )
    origin = root / origin_package / "strategy" / f"{module}.py"
    origin.write_text(SHARED_HEADER + "\n" + text, encoding="utf-8")
    if source != origin:
        source.unlink()
    init = home / "strategy" / "__init__.py"
    line = re.compile(rf"^from \. import {re.escape(module)}\b.*\n?", re.M)
    init.write_text(line.sub("", init.read_text(encoding="utf-8")), encoding="utf-8")
    builtin = root / origin_package / "strategy" / "builtin.py"
    body = builtin.read_text(encoding="utf-8")
    start = body.index("from . import (")
    end = body.index(")", start)
    names = {n.strip().rstrip(",") for n in body[start:end].splitlines()[1:] if n.strip()} | {module}
    listing = "".join(f"    {n},\n" for n in sorted(names))
    first = body[start : body.index("\n", start) + 1]
    builtin.write_text(body[:start] + first + listing + body[end:], encoding="utf-8")
    print(f"shared strategy/{module}.py (from {homes[0]}): its import is in strategy/builtin.py")
    check(root, fix=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--fix", action="store_true", help="rewrite drifted copies from their origins")
    parser.add_argument("--add", nargs=2, metavar=("SRC", "DST"), help="create DST as a marked copy of SRC")
    parser.add_argument("--sub", action="append", default=[], metavar="OLD->NEW", help="substitution for --add")
    parser.add_argument(
        "--share", metavar="METHOD", help="put strategy/METHOD.py, written in one fork, into every fork"
    )
    args = parser.parse_args(argv)
    root = args.root.resolve()
    try:
        if args.add:
            return add(root, args.add[0], args.add[1], args.sub)
        if args.share:
            return share(root, args.share)
        return check(root, args.fix)
    except CopyError as err:
        print(f"check_copies: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
