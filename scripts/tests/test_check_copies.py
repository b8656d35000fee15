"""scripts/check_copies.py on small fixture trees: it catches drift, fixes it, and adds copies; the forks it
requires copies in, and pyproject.toml's testpaths and known-first-party, come from the tree's forks.toml."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "check_copies.py"
ORIGIN = "image/LLaVA/llava/vtr/strategy/fastv.py"
ORIGIN_TEXT = (
    '"""FastV."""\n\nfrom llava.vtr.strategy.base import PruningStrategy\n\n\nclass FastV(PruningStrategy):\n    pass\n'
)


#: fork name -> (folder, package, extra first-party names), as the repository's forks.toml has them; llava: the origin
FORKS = {
    "llava": ("image/LLaVA", "llava.vtr", ["llava_testlib"]),
    "internvl": ("image/InternVL", "internvl_vtr", []),
    "qwen3vl": ("image/Qwen3-VL", "visual_token_pruning", []),
    "videollava": ("video/Video-LLaVA", "videollava.vtr", []),
}
ORIGIN_PACKAGE = "image/LLaVA/llava/vtr"
FORK_PACKAGES = [
    "image/InternVL/internvl_vtr",
    "image/Qwen3-VL/visual_token_pruning",
    "video/Video-LLaVA/videollava/vtr",
]


def registry(root, names=tuple(FORKS)):
    """forks.toml (the forks `names`, one model family each) and a pyproject.toml that agrees with it, and the
    folders forks.toml names."""
    lines = ['origin = "llava"']
    for name in names:
        path, package, first_party = FORKS[name]
        lines += [f"[fork.{name}]", f'path = "{path}"', f'package = "{package}"', f"first_party = {first_party}"]
        lines += [f"[family.{name}]", f'fork = "{name}"', 'runner = "lmms-eval"', f'lmms_model = "{name}_vtr"']
        lines += [f'checkpoint = "org/{name}"', f'models = ["{name}"]']
        package_dir = root / path / package.replace(".", "/")
        package_dir.mkdir(parents=True, exist_ok=True)
        (root / path / "tests").mkdir(exist_ok=True)
        (root / path / "pyproject.toml").write_text("")
    (root / "forks.toml").write_text("\n".join(lines).replace("'", '"') + "\n")
    testpaths = ["scripts/tests", *(f"{FORKS[n][0]}/tests" for n in names)]
    first_party = [FORKS[n][1].split(".")[0] for n in names] + (["llava_testlib"] if "llava" in names else [])
    pyproject = f"[tool.pytest.ini_options]\ntestpaths = {testpaths}\n\n[tool.ruff.lint.isort]\n"
    (root / "pyproject.toml").write_text((pyproject + f"known-first-party = {first_party}\n").replace("'", '"'))


def run(root, *args):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--root", str(root), *args], capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture
def tree(tmp_path):
    registry(tmp_path, ["llava", "internvl"])
    (tmp_path / ORIGIN).parent.mkdir(parents=True)
    (tmp_path / ORIGIN).write_text(ORIGIN_TEXT)
    copy = tmp_path / "image/InternVL/internvl_vtr/strategy/fastv.py"
    copy.parent.mkdir(parents=True)
    marker = f"# Copied from {ORIGIN} with llava.vtr->internvl_vtr\n"
    copy.write_text(marker + ORIGIN_TEXT.replace("llava.vtr", "internvl_vtr"))
    return tmp_path, copy


def test_identical_copy_with_substitution_passes(tree):
    root, _ = tree
    code, out = run(root)
    assert code == 0, out
    assert "1 copies checked, 0 drifted" in out


def test_drift_in_the_copy_fails_with_a_diff(tree):
    root, copy = tree
    copy.write_text(copy.read_text().replace("pass", "return None"))
    code, out = run(root)
    assert code == 1
    assert "DRIFT image/InternVL/internvl_vtr/strategy/fastv.py" in out
    assert "-    pass" in out and "+    return None" in out


def test_drift_in_the_origin_fails_too_and_fix_propagates_it(tree):
    root, copy = tree
    (root / ORIGIN).write_text(ORIGIN_TEXT + "\n\nTOP_K = 3\n")
    assert run(root)[0] == 1
    code, out = run(root, "--fix")
    assert code == 0 and "fixed image/InternVL/internvl_vtr/strategy/fastv.py" in out
    assert copy.read_text().endswith("TOP_K = 3\n")
    assert "from internvl_vtr.strategy.base" in copy.read_text()
    assert run(root)[0] == 0


def test_missing_origin_and_chained_copies_are_errors(tree):
    root, copy = tree
    chained = root / "video/Video-LLaVA/videollava/vtr/strategy/fastv.py"
    chained.parent.mkdir(parents=True)
    chained.write_text("# Copied from image/InternVL/internvl_vtr/strategy/fastv.py\n")
    code, out = run(root)
    assert code == 2 and "is itself a copy" in out
    chained.write_text("# Copied from image/Nope/x.py\n")
    code, out = run(root)
    assert code == 2 and "does not exist" in out


def test_add_drops_a_marked_copy_into_another_fork(tree):
    root, _ = tree
    dst = "image/Qwen3-VL/visual_token_pruning/strategy/fastv.py"
    code, out = run(root, "--add", ORIGIN, dst, "--sub", "llava.vtr->visual_token_pruning")
    assert code == 0, out
    text = (root / dst).read_text()
    assert text.startswith(f"# Copied from {ORIGIN} with llava.vtr->visual_token_pruning\n")
    assert "from visual_token_pruning.strategy.base" in text
    assert run(root)[0] == 0
    assert run(root, "--add", ORIGIN, dst)[0] == 2  # refuses to overwrite


def test_the_repository_itself_is_consistent():
    code, out = run(SCRIPT.parents[1])
    assert code == 0, out


def _load_checker():
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_copies", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def shared_tree(tmp_path):
    """A tree holding every file of the manifest: origins with the shared header, forks with exact copies."""
    cc = _load_checker()
    registry(tmp_path)
    for name in cc.SHARED_FILES:
        origin = tmp_path / ORIGIN_PACKAGE / name
        origin.parent.mkdir(parents=True, exist_ok=True)
        origin.write_text(f"{cc.SHARED_HEADER}\nNAME = {name!r}\n")
    assert run(tmp_path, "--fix")[0] == 0
    return tmp_path, cc


def test_manifest_requires_every_shared_file_in_every_fork(shared_tree):
    root, cc = shared_tree
    code, out = run(root)
    assert code == 0, out
    assert f"{len(cc.SHARED_FILES) * len(FORK_PACKAGES)} copies checked, 0 drifted" in out
    missing = root / FORK_PACKAGES[1] / "engine.py"
    missing.unlink()
    code, out = run(root)
    assert code == 1 and f"MANIFEST {FORK_PACKAGES[1]}/engine.py is missing" in out
    assert run(root, "--fix")[0] == 0 and missing.read_text().startswith(f"# Copied from {ORIGIN_PACKAGE}/engine.py\n")


def test_a_copy_that_lost_its_header_is_not_promoted_to_an_origin(shared_tree):
    root, cc = shared_tree
    copy = root / FORK_PACKAGES[0] / "strategy/base.py"
    copy.write_text(copy.read_text().split("\n", 1)[1])  # header deleted, content otherwise intact
    code, out = run(root)
    assert code == 1 and f"MANIFEST {FORK_PACKAGES[0]}/strategy/base.py does not start with" in out
    copy.write_text(copy.read_text().replace("NAME", "OTHER"))
    assert run(root)[0] == 1


def test_a_shared_origin_must_carry_the_shared_header(shared_tree):
    root, cc = shared_tree
    origin = root / ORIGIN_PACKAGE / "config.py"
    origin.write_text("NAME = 'config.py'\n")
    code, out = run(root)
    assert code == 2 and "must start with the line" in out


def test_readme_capability_matrix_is_generated_from_the_registries():
    script = SCRIPT.parent / "capability_matrix.py"
    proc = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = subprocess.run([sys.executable, str(script)], capture_output=True, text=True).stdout
    from llava.vtr import available_strategies, get_strategy

    for method in available_strategies():
        if method.startswith(("test_", "contract_")):  # strategies the tests register
            continue
        if "frames" in get_strategy(method).requires:  # a video method: LLaVA-1.5 / 1.6 take no videos
            assert f"| `{method}` | — | — | video only |" in table, method
        else:
            assert f"| `{method}` | yes | yes |" in table, method


def _commit(root):
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "base"]):
        subprocess.run(git + cmd, cwd=root, check=True, capture_output=True)


def test_an_uncommitted_origin_edit_is_carried_into_untouched_copies_but_a_copy_edit_never_is(tree):
    root, copy = tree
    _commit(root)
    (root / ORIGIN).write_text(ORIGIN_TEXT + "\n\nTOP_K = 3\n")
    code, out = run(root)
    assert code == 0 and "now in 1 copies: image/InternVL/internvl_vtr/strategy/fastv.py" in out
    assert copy.read_text().endswith("TOP_K = 3\n")
    _commit(root)
    copy.write_text(copy.read_text().replace("TOP_K = 3", "TOP_K = 4"))  # a hand edit of the copy
    (root / ORIGIN).write_text(ORIGIN_TEXT + "\n\nTOP_K = 5\n")
    code, out = run(root)
    assert code == 1 and "DRIFT image/InternVL/internvl_vtr/strategy/fastv.py" in out
    assert "TOP_K = 4" in copy.read_text(), "the copy's own edit is kept"


def test_a_committed_origin_edit_is_drift_with_a_hint_and_share_still_runs(tmp_path):
    """Once the origin's edit is committed the copy is reported (CI stays strict) with the fix to run; sharing a
    method overwrites such untouched copies, and refuses a copy with a committed edit of its own."""
    registry(tmp_path, ["llava", "internvl"])
    origin = tmp_path / "image/LLaVA/llava/vtr"
    fork = tmp_path / "image/InternVL/internvl_vtr"
    header = "# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.\n"
    (origin / "strategy").mkdir()
    (fork / "strategy").mkdir()
    (origin / "config.py").write_text(header + "A = 1\n")
    (fork / "config.py").write_text("# Copied from image/LLaVA/llava/vtr/config.py\n" + header + "A = 1\n")
    (origin / "strategy/builtin.py").write_text(header + "from . import (  # noqa: F401\n    fastv,\n)\n")
    (origin / "strategy/__init__.py").write_text("from . import builtin  # noqa: F401\nfrom . import mine  # noqa\n")
    (origin / "strategy/mine.py").write_text("MINE = 1\n")
    _commit(tmp_path)
    (origin / "config.py").write_text(header + "A = 1\nB = 2\n")
    _commit(tmp_path)
    code, out = run(tmp_path)
    assert code == 1 and "config.py differs from image/LLaVA/llava/vtr/config.py (it has no edits of its own" in out
    code, out = run(tmp_path, "--share", "mine")
    assert code == 0, out
    assert (fork / "config.py").read_text().endswith("B = 2\n")
    assert (origin / "strategy/mine.py").read_text() == header + "MINE = 1\n"  # copies: the recipe test
    assert "    fastv,\n    mine,\n" in (origin / "strategy/builtin.py").read_text()
    assert "mine" not in (origin / "strategy/__init__.py").read_text()
    _commit(tmp_path)
    (fork / "config.py").write_text((fork / "config.py").read_text() + "C = 3\n")  # an edit of the copy itself
    _commit(tmp_path)
    (origin / "strategy/other.py").write_text("OTHER = 1\n")
    code, out = run(tmp_path, "--share", "other")
    assert code == 2 and "have edits of their own" in out and "internvl_vtr/config.py" in out
    assert "C = 3" in (fork / "config.py").read_text()


def test_the_forks_that_must_hold_the_shared_core_are_forks_toml_s(tmp_path):
    """A fork added to forks.toml must get every shared file; the other forks' copies are unaffected."""
    cc = _load_checker()
    registry(tmp_path, ["llava", "internvl", "qwen3vl"])
    for name in cc.SHARED_FILES:
        (tmp_path / ORIGIN_PACKAGE / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / ORIGIN_PACKAGE / name).write_text(f"{cc.SHARED_HEADER}\nNAME = {name!r}\n")
    assert run(tmp_path, "--fix")[0] == 0
    code, out = run(tmp_path)
    assert code == 0 and f"{len(cc.SHARED_FILES) * 2} copies checked, 0 drifted" in out, out
    assert not (tmp_path / FORK_PACKAGES[2] / "engine.py").exists()
    registry(tmp_path)  # [fork.videollava] added
    code, out = run(tmp_path)
    assert code == 1 and f"MANIFEST {FORK_PACKAGES[2]}/engine.py is missing" in out
    assert f"{len(cc.SHARED_FILES)} required by the manifest missing" in out
    assert run(tmp_path, "--fix")[0] == 0 and run(tmp_path)[0] == 0
    assert (tmp_path / FORK_PACKAGES[2] / "engine.py").read_text().startswith(f"# Copied from {ORIGIN_PACKAGE}/")


def test_pyproject_must_name_exactly_the_forks_of_forks_toml(tree):
    root, _ = tree
    pyproject = root / "pyproject.toml"
    text = pyproject.read_text()
    pyproject.write_text(
        text.replace('"image/InternVL/tests"', '"image/Old/tests"').replace('"llava_testlib"', '"llava_old"')
    )
    code, out = run(root)
    assert code == 1, out
    testpaths, first_party = "[tool.pytest.ini_options] testpaths", "[tool.ruff.lint.isort] known-first-party"
    assert (
        f"pyproject.toml: {testpaths} lacks 'image/InternVL/tests' (the tests of [fork.internvl] in forks.toml)" in out
    )
    assert f"pyproject.toml: {testpaths} has 'image/Old/tests', which forks.toml does not name; remove it" in out
    assert f"pyproject.toml: {first_party} lacks 'llava_testlib' (an import name of [fork.llava] in forks.toml)" in out
    assert f"{first_party} has 'llava_old'" in out and "4 pyproject.toml entries to fix by hand" in out
    code, out = run(root, "--fix")  # --fix cannot fix them: still a failure, the file untouched
    assert code == 1 and "4 pyproject.toml entries to fix by hand" in out and "image/Old/tests" in pyproject.read_text()
    pyproject.write_text(text)
    assert run(root)[0] == 0


def test_a_broken_or_missing_forks_toml_is_one_line_and_exit_2(tree):
    root, _ = tree
    registry_file = root / "forks.toml"
    registry_file.write_text(registry_file.read_text().replace('fork = "internvl"', 'fork = "intervl"'))
    code, out = run(root)
    assert code == 2 and "Traceback" not in out and out.count("\n") == 1, out
    assert out.startswith("check_copies: error: forks.toml: [family.internvl] fork = 'intervl' is no fork; ")
    registry_file.unlink()
    code, out = run(root)
    assert code == 2 and out.count("\n") == 1 and f"{registry_file} does not exist" in out, out
