"""scripts/capability_matrix.py: every fork names the backbones it serves; none named is an error, not a column."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "capability_matrix.py"


@pytest.fixture
def capability_matrix(tmp_path, monkeypatch):
    """The script as a module, its FORKS pointed at two fake forks: `good` (BACKBONES = ["A", "B"]) and `bare`."""
    for name, backbones in (("good", '["A", "B"]'), ("bare", "[]")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"BACKBONES = {backbones}\n")
        methods = ["fastv", "random"] if name == "good" else ["fastv"]
        (tmp_path / name / "strategy.py").write_text(
            "# Shared vtr file: a fake fork's registry (only shared methods count)\n"
            f"def available_strategies():\n    return {methods}\n"
            "def get_strategy(name):\n    return type(name, (), {'__module__': __name__})\n"
        )
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = importlib.util.spec_from_file_location("capability_matrix_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_columns_are_the_forks_own_backbones(capability_matrix, monkeypatch):
    monkeypatch.setattr(capability_matrix, "FORKS", ["good"])
    assert capability_matrix.matrix().splitlines() == [
        "| method | A | B |",
        "|---|---|---|",
        "| `fastv` | yes | yes |",
        "| `random` | yes | yes |",
    ]


def test_a_fork_naming_no_backbone_is_an_error(capability_matrix, monkeypatch, capsys):
    monkeypatch.setattr(capability_matrix, "FORKS", ["good", "bare"])
    assert capability_matrix.main([]) == 2
    err = capsys.readouterr().err
    assert "bare.BACKBONES is missing or empty" in err and "Traceback" not in err
