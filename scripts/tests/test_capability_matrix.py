"""scripts/capability_matrix.py: the columns are the backbones each fork of forks.toml names, in the registry's
order; a fork naming none is an error, not a column, and so is a broken forks.toml."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "capability_matrix.py"


@pytest.fixture
def capability_matrix(tmp_path, monkeypatch):
    """The script as a module, beside two fake fork packages: `good` (BACKBONES = {"A": an adapter giving the fact
    "grid" and "frames", "B": one giving none}; methods fastv, random, tiled, which requires "grid", and clip, a video
    method: it requires "frames") and `bare`."""
    adapters = "class Gives:\n    facts = ('grid', 'frames')\nclass Lacks:\n    facts = ()\n"
    for name, backbones in (("good", '{"A": Gives, "B": Lacks}'), ("bare", "{}")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"{adapters}BACKBONES = {backbones}\n")
        methods = ["clip", "fastv", "random", "tiled"] if name == "good" else ["fastv"]
        (tmp_path / name / "strategy.py").write_text(
            "# Shared vtr file: a fake fork's registry (only shared methods count)\n"
            f"def available_strategies():\n    return {methods}\n"
            "def get_strategy(name):\n"
            "    needs = {'tiled': ('grid',), 'clip': ('frames',)}.get(name, ())\n"
            "    missing = classmethod(lambda cls, adapter: [f for f in needs if f not in adapter.facts])\n"
            "    return type(name, (), {'__module__': __name__, 'requires': needs, 'missing_facts': missing})\n"
        )
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = importlib.util.spec_from_file_location("capability_matrix_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_columns_are_the_forks_own_backbones(capability_matrix):
    assert capability_matrix.matrix(["good"]).splitlines() == [
        "| method | A | B |",
        "|---|---|---|",
        "| `clip` | video only | — |",  # a video method, where it runs
        "| `fastv` | yes | yes |",
        "| `random` | yes | yes |",
        "| `tiled` | yes | — |",  # B's adapter lacks the fact it requires
    ]


def test_a_fork_naming_no_backbone_is_an_error(capability_matrix, monkeypatch, capsys):
    monkeypatch.setattr(capability_matrix, "fork_packages", lambda: ["good", "bare"])
    assert capability_matrix.main([]) == 2
    err = capsys.readouterr().err
    assert "bare.BACKBONES is missing or empty" in err and "Traceback" not in err


def test_the_forks_are_forks_toml_s_in_its_order(capability_matrix, monkeypatch, tmp_path, capsys):
    registry = capability_matrix.forks.load()
    assert capability_matrix.fork_packages() == [fork.package for fork in registry.forks.values()]
    assert capability_matrix.fork_packages()[0] == registry.origin.package == "llava.vtr"
    for folder in ("image", "video"):  # a repository whose forks.toml's origin names no fork
        (tmp_path / folder).symlink_to(registry.path.parent / folder)
    (tmp_path / "forks.toml").write_text(registry.path.read_text().replace('origin = "llava"', 'origin = "nope"'))
    monkeypatch.setattr(capability_matrix.forks, "ROOT", tmp_path)
    assert capability_matrix.main(["--check"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("capability_matrix: error: forks.toml: origin = 'nope' is no fork; forks.toml has llava, ")
    assert err.count("\n") == 1


def test_forks_toml_and_the_forks_agree_on_the_models(capability_matrix, monkeypatch, tmp_path, capsys):
    """Each fork's [family.*] models cover exactly its BACKBONES: a model only one of them names is an error."""
    registry = capability_matrix.forks.load()
    for folder in ("image", "video"):
        (tmp_path / folder).symlink_to(registry.path.parent / folder)
    text = registry.path.read_text()
    assert 'models = ["Qwen2-VL"]' in text
    (tmp_path / "forks.toml").write_text(text.replace('models = ["Qwen2-VL"]', 'models = ["Qwen2-VL-72B"]'))
    monkeypatch.setattr(capability_matrix.forks, "ROOT", tmp_path)
    assert capability_matrix.main(["--check"]) == 2
    err = capsys.readouterr().err
    assert "models of fork 'qwen3vl' and visual_token_pruning.BACKBONES differ" in err
    assert "not in BACKBONES: Qwen2-VL-72B; in no family: Qwen2-VL" in err and err.count("\n") == 1
