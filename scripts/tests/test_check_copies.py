"""scripts/check_copies.py on small fixture trees: it catches drift, fixes it, and adds copies."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "check_copies.py"
ORIGIN = "image/LLaVA/llava/vtr/strategy/fastv.py"
ORIGIN_TEXT = (
    '"""FastV."""\n\nfrom llava.vtr.strategy.base import PruningStrategy\n\n\nclass FastV(PruningStrategy):\n    pass\n'
)


def run(root, *args):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--root", str(root), *args], capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture
def tree(tmp_path):
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
