#!/usr/bin/env python3
"""Read forks.toml, the registry of the forks and the model families they serve (standard library only: the
Makefile runs it with the system python3 before the virtualenv exists).

    scripts/forks.py check           validate forks.toml (every problem is one line naming the entry)
    scripts/forks.py paths           the forks' folders (the Makefile's FORKS)
    scripts/forks.py testpaths       scripts/tests and every fork's tests folder (pyproject.toml's testpaths)
    scripts/forks.py families        the model families (vtr_run/bench --backbone, make demo BACKBONE=)
    scripts/forks.py demo FAMILY     the demo module of the fork serving FAMILY and the family's demo_args
                                     (make demo BACKBONE=FAMILY)

Lists are printed space-separated on one line. The scripts import it (`forks.load()`); the forks never do.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILE = "forks.toml"
#: the folder of the scripts' own tests (pyproject.toml's first testpath)
SCRIPTS_TESTS = "scripts/tests"
RUNNERS = ("lmms-eval", "video-qa")
NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")  # a fork or family name: no commas, = or spaces (flags list them)
PACKAGE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
#: the keys of each kind of table: (required, optional)
FORK_KEYS = (("path", "package"), ("first_party",))
FAMILY_KEYS = (("fork", "runner", "lmms_model", "checkpoint", "models"), ("bench", "demo_args"))


class RegistryError(Exception):
    """forks.toml is missing, unreadable or wrong; the message names the file and the entry."""


@dataclass(frozen=True)
class Fork:
    name: str
    path: str  # the pip-installable folder, relative to the repository root
    package: str  # import name
    first_party: tuple[str, ...] = ()  # import names besides the package's own (ruff isort)

    @property
    def package_dir(self) -> str:
        return f"{self.path}/{self.package.replace('.', '/')}"

    @property
    def tests(self) -> str:
        return f"{self.path}/tests"

    @property
    def demo(self) -> str:
        return f"{self.package}.demo"

    @property
    def import_names(self) -> list[str]:
        """The top-level import names of the fork (its package's, then first_party): ruff's known-first-party."""
        return list(dict.fromkeys([self.package.split(".")[0], *self.first_party]))


@dataclass(frozen=True)
class Family:
    name: str
    fork: Fork
    runner: str
    lmms_model: str
    checkpoint: str
    models: tuple[str, ...] = ()  # the models it covers, as its fork's BACKBONES names them (matrix columns)
    bench: dict = field(default_factory=dict)
    demo_args: tuple[str, ...] = ()  # arguments of the fork's demo for this family (make demo BACKBONE=<name>)

    @property
    def package(self) -> str:
        return self.fork.package


@dataclass(frozen=True)
class Registry:
    path: Path  # forks.toml
    origin: Fork
    forks: dict[str, Fork]  # in the file's order
    families: dict[str, Family]  # in the file's order

    def family(self, name: str, what: str = "model family") -> Family:
        if name not in self.families:
            raise RegistryError(f"unknown {what} {name!r}; {FILE} has {', '.join(self.families)}")
        return self.families[name]

    def testpaths(self) -> list[str]:
        """What pyproject.toml's [tool.pytest.ini_options] testpaths must hold."""
        return [SCRIPTS_TESTS, *(fork.tests for fork in self.forks.values())]

    def first_party(self) -> list[str]:
        """What pyproject.toml's [tool.ruff.lint.isort] known-first-party must hold."""
        return list(dict.fromkeys(name for fork in self.forks.values() for name in fork.import_names))


def load(root: Path | str | None = None) -> Registry:
    """The registry of the repository at `root` (default: this one), validated: every key known, every name it
    refers to defined, every folder it names present."""
    root = Path(ROOT if root is None else root)
    path = root / FILE
    data = read_toml(path, "the registry of the forks and model families")
    _keys(data, FILE, ("origin", "fork", "family"), ())
    forks = {name: _fork(root, name, table) for name, table in _tables(data, "fork").items()}
    for kind, attr in (("path", "path"), ("package", "package")):
        seen = {}
        for fork in forks.values():
            other = seen.setdefault(getattr(fork, attr), fork.name)
            if other != fork.name:
                raise RegistryError(f"{FILE}: [fork.{other}] and [fork.{fork.name}] have the same {kind}")
    families = {name: _family(forks, name, table) for name, table in _tables(data, "family").items()}
    origin = data["origin"]
    if not isinstance(origin, str) or origin not in forks:
        raise RegistryError(f"{FILE}: origin = {origin!r} is no fork; {FILE} has {', '.join(forks)}")
    return Registry(path, forks[origin], forks, families)


def read_toml(path: Path, what: str) -> dict:
    """A TOML file's data; a RegistryError naming the file if it is missing or unreadable."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise RegistryError(
            f"reading {path.name} needs Python 3.11 or newer (tomllib); this is {sys.version.split()[0]}"
        ) from None
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegistryError(f"{path} does not exist ({what})") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise RegistryError(f"{path}: {error}") from None


def _keys(table: dict, where: str, required: tuple, optional: tuple) -> None:
    missing = [key for key in required if key not in table]
    if missing:
        raise RegistryError(f"{where} lacks {', '.join(missing)}")
    unknown = [key for key in table if key not in required + optional]
    if unknown:
        raise RegistryError(f"{where} has unknown key {unknown[0]!r}; its keys: {', '.join(required + optional)}")


def _tables(data: dict, kind: str) -> dict:
    tables = data[kind]
    if not isinstance(tables, dict) or not tables or not all(isinstance(t, dict) for t in tables.values()):
        raise RegistryError(f"{FILE}: [{kind}.<name>] tables expected, one per {kind}")
    for name in tables:
        if not NAME.fullmatch(name):
            raise RegistryError(f"{FILE}: [{kind}.{name}]: a name is lower-case letters, digits and _ . -")
    return tables


def _text(table: dict, key: str, where: str) -> str:
    value = table[key]
    if not isinstance(value, str) or not value.strip():
        raise RegistryError(f"{where} {key} = {value!r}: a non-empty string expected")
    return value


def _fork(root: Path, name: str, table: dict) -> Fork:
    where = f"{FILE}: [fork.{name}]"
    _keys(table, where, *FORK_KEYS)
    path, package = _text(table, "path", where).rstrip("/"), _text(table, "package", where)
    first_party = table.get("first_party", [])
    if not PACKAGE.fullmatch(package):
        raise RegistryError(f"{where} package = {package!r} is not an import name")
    if not isinstance(first_party, list) or not all(isinstance(n, str) and n.isidentifier() for n in first_party):
        raise RegistryError(f"{where} first_party = {first_party!r}: a list of import names expected")
    fork = Fork(name, path, package, tuple(first_party))
    if Path(path).is_absolute() or ".." in Path(path).parts:
        raise RegistryError(f"{where} path = {path!r}: a folder inside the repository expected")
    for folder, what in ((fork.path, "path"), (fork.tests, "its tests"), (fork.package_dir, "its package")):
        if not (root / folder).is_dir():
            raise RegistryError(f"{where} {what} {folder} does not exist")
    if not (root / path / "pyproject.toml").is_file():
        raise RegistryError(f"{where} path {path} has no pyproject.toml (it must be pip-installable)")
    return fork


def _family(forks: dict, name: str, table: dict) -> Family:
    where = f"{FILE}: [family.{name}]"
    _keys(table, where, *FAMILY_KEYS)
    models = table.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise RegistryError(f"{where} models = {models!r}: a non-empty list of model names expected")
    values = {key: _text(table, key, where) for key in FAMILY_KEYS[0] if key != "models"}
    if values["fork"] not in forks:
        raise RegistryError(f"{where} fork = {values['fork']!r} is no fork; {FILE} has {', '.join(forks)}")
    if values["runner"] not in RUNNERS:
        raise RegistryError(f"{where} runner = {values['runner']!r}; choose {' or '.join(RUNNERS)}")
    bench = table.get("bench", {})
    if not isinstance(bench, dict):
        raise RegistryError(f"{where} bench = {bench!r}: a table of tiny.bench_case keyword arguments expected")
    demo_args = table.get("demo_args", [])
    if not isinstance(demo_args, list) or not all(isinstance(a, str) and a for a in demo_args):
        raise RegistryError(f"{where} demo_args = {demo_args!r}: a list of the demo's command-line arguments expected")
    fork = forks[values.pop("fork")]
    return Family(name, fork, models=tuple(models), bench=bench, demo_args=tuple(demo_args), **values)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    queries = {"check": 0, "paths": 0, "testpaths": 0, "families": 0, "demo": 1}  # query -> its arguments
    if not argv or argv[0] not in queries or len(argv) != 1 + queries[argv[0]]:
        given = repr(" ".join(argv)) if argv else "no query"
        print(f"forks.py: error: {given}: give check, paths, testpaths, families or demo FAMILY", file=sys.stderr)
        return 2
    try:
        registry = load()
        query = argv[0]
        if query == "check":
            print(f"{FILE}: {len(registry.forks)} forks, {len(registry.families)} model families, all folders present")
        elif query == "paths":
            print(" ".join(fork.path for fork in registry.forks.values()))
        elif query == "testpaths":
            print(" ".join(registry.testpaths()))
        elif query == "families":
            print(" ".join(registry.families))
        else:
            family = registry.family(argv[1])
            fork = family.fork
            if not (registry.path.parent / fork.package_dir / "demo.py").is_file():
                raise RegistryError(f"[fork.{fork.name}] has no demo: {fork.package_dir}/demo.py does not exist")
            print(shlex.join([fork.demo, *family.demo_args]))
    except RegistryError as error:
        print(f"forks.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
