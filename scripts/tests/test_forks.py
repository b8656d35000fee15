"""scripts/forks.py and forks.toml: the repository's registry is valid and agrees with the forks (their folders,
demos and lmms-eval models); every kind of mistake in it is one line naming the entry, from Python, from its
CLI and from the Makefile, which takes FORKS and `make demo BACKBONE=` from it."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import forks  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "forks.py"
#: what the Makefile ran before forks.toml (DEMO_<BACKBONE>): these BACKBONE names keep working
DEMOS = {
    "llava": "llava.vtr.demo",
    "internvl": "internvl_vtr.demo",
    "qwen3vl": "visual_token_pruning.demo",
    "videollava": "videollava.vtr.demo",
}
#: the Makefile runs forks.py with the system python3 before the virtualenv exists
PYTHON = shutil.which("python3") or sys.executable
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="no make")


def cli(*args, root=ROOT):
    proc = subprocess.run([PYTHON, str(root / "scripts" / "forks.py"), *args], capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr


def test_the_repository_registry_agrees_with_the_forks():
    registry = forks.load()
    assert registry.origin.name == "llava" and registry.origin.package_dir == "image/LLaVA/llava/vtr"
    paths = ["image/LLaVA", "image/InternVL", "image/Qwen3-VL", "video/Video-LLaVA"]
    assert [fork.path for fork in registry.forks.values()] == paths
    for name, module in DEMOS.items():
        assert registry.family(name).fork.demo == module
        assert (ROOT / registry.family(name).fork.package_dir / "demo.py").is_file()
    assert registry.family("llava-next").fork is registry.forks["llava"]
    assert registry.family("llava-next").bench == {"anyres": True} and registry.family("llava").bench == {}
    assert registry.family("videollava").runner == "video-qa" and registry.family("llava").runner == "lmms-eval"
    for family in registry.families.values():  # the lmms-eval model each family names is its fork's
        project = tomllib.loads((ROOT / family.fork.path / "pyproject.toml").read_text())["project"]
        assert family.lmms_model in project["entry-points"]["lmms_eval.models"], family.name
        assert family.checkpoint.count("/") == 1, family.name
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]
    assert pyproject["pytest"]["ini_options"]["testpaths"] == registry.testpaths()
    assert sorted(pyproject["ruff"]["lint"]["isort"]["known-first-party"]) == sorted(registry.first_party())


def test_the_cli_answers_the_makefile_s_queries():
    assert cli("paths") == (0, "image/LLaVA image/InternVL image/Qwen3-VL video/Video-LLaVA\n", "")
    code, out, _ = cli("testpaths")
    assert code == 0 and out.split() == forks.load().testpaths() and out.split()[0] == "scripts/tests"
    code, out, _ = cli("families")
    assert code == 0 and out.split() == list(forks.load().families) and set(DEMOS) <= set(out.split())
    assert cli("demo", "qwen3vl") == (0, "visual_token_pruning.demo\n", "")
    assert cli("demo", "llava-next") == (0, "llava.vtr.demo\n", "")
    code, out, _ = cli("check")
    assert code == 0 and "4 forks" in out
    code, out, err = cli("demo", "qwen")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("forks.py: error: unknown model family 'qwen'; forks.toml has llava, llava-next, internvl, ")
    for args in ([], ["demo"], ["paths", "x"], ["nope"]):
        code, out, err = cli(*args)
        assert code == 2 and err.count("\n") == 1 and "give check, paths, testpaths, families or demo FAMILY" in err
    assert cli("--help")[0] == 0 and "forks.py demo FAMILY" in cli("--help")[1]


@pytest.fixture
def repo(tmp_path):
    """A repository beside this one: its forks.toml, Makefile and what `make install` needs, links to the forks."""
    for rel in ("forks.toml", "Makefile", "requirements.txt", "scripts/forks.py", "scripts/post_install.py"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    for folder in ("image", "video"):
        (tmp_path / folder).symlink_to(ROOT / folder)
    return tmp_path


def edit(repo, old, new):
    registry = repo / "forks.toml"
    text = registry.read_text()
    assert old in text, old
    registry.write_text(text.replace(old, new, 1))


MISTAKES = [
    ('fork = "internvl"', 'fork = "intervl"', "[family.internvl] fork = 'intervl' is no fork; forks.toml has llava, "),
    ('checkpoint = "OpenGVLab/InternVL3-2B-hf"\n', "", "[family.internvl] lacks checkpoint"),
    ("checkpoint =", "chekpoint =", "[family.llava] lacks checkpoint"),
    ("[family.llava]\n", "[family.llava]\ncheckpont = 'x'\n", "[family.llava] has unknown key 'checkpont'; its keys: "),
    (
        'runner = "video-qa"',
        'runner = "videoqa"',
        "[family.videollava] runner = 'videoqa'; choose lmms-eval or video-qa",
    ),
    ('lmms_model = "llava_vtr"', "lmms_model = ''", "[family.llava] lmms_model = '': a non-empty string expected"),
    ('checkpoint = "Qwen', 'bench = 3\ncheckpoint = "Qwen', "[family.qwen3vl] bench = 3: a table of tiny.bench_case"),
    ('checkpoint = "Qwen', 'demo_args = "-x"\ncheckpoint = "Qwen', "[family.qwen3vl] demo_args = '-x': a list of the"),
    ('path = "image/InternVL"', 'path = "image/InternVLX"', "[fork.internvl] path image/InternVLX does not exist"),
    (
        'package = "internvl_vtr"',
        'package = "internvl"',
        "[fork.internvl] its package image/InternVL/internvl does not",
    ),
    (
        'package = "internvl_vtr"',
        'package = "internvl-vtr"',
        "[fork.internvl] package = 'internvl-vtr' is not an import",
    ),
    (
        '"image/InternVL"\npackage = "internvl_vtr"',
        '"image/LLaVA"\npackage = "llava.vtr"',
        "[fork.llava] and [fork.internvl] have the same path",
    ),
    ('path = "image/InternVL"', 'path = "../x"', "[fork.internvl] path = '../x': a folder inside the repository"),
    ('path = "image/InternVL"', 'path = "/tmp"', "[fork.internvl] path = '/tmp': a folder inside the repository"),
    ('package = "internvl_vtr"', 'package = "internvl_vtr"\nfirst_party = "x"', "first_party = 'x': a list of impor"),
    ('origin = "llava"', 'origin = "lava"', "origin = 'lava' is no fork; forks.toml has llava, internvl, qwen3vl, "),
    ('origin = "llava"', "", "forks.toml lacks origin"),
    ("[family.qwen3vl]", '[family."qwen 3"]', "[family.qwen 3]: a name is lower-case letters, digits and _ . -"),
    ("[family.qwen3vl]", "[family.qwen3vl", "forks.toml: Expected ']' at the end of a table declaration (at line"),
]


@pytest.mark.parametrize("old, new, message", MISTAKES, ids=[m[2][:40] for m in MISTAKES])
def test_a_mistake_in_forks_toml_is_one_line_naming_the_entry(repo, old, new, message):
    edit(repo, old, new)
    with pytest.raises(forks.RegistryError) as raised:
        forks.load(repo)
    assert message in str(raised.value) and "\n" not in str(raised.value)
    code, out, err = cli("paths", root=repo)
    assert code == 2 and out == "" and err.startswith("forks.py: error: ") and err.count("\n") == 1
    assert message in err and "Traceback" not in err


def test_a_missing_forks_toml_is_one_line(repo):
    (repo / "forks.toml").unlink()
    code, _, err = cli("families", root=repo)
    assert (
        code == 2
        and err
        == f"forks.py: error: {repo / 'forks.toml'} does not exist (the registry of the forks and model families)\n"
    )


def test_adding_a_family_to_a_fork_is_one_block(repo):
    block = '[family.newfamily]\nfork = "qwen3vl"\nrunner = "lmms-eval"\nlmms_model = "qwen2_vl_vtr"\n'
    block += 'checkpoint = "Qwen/x"\nbench = { family = "qwen2_vl" }\ndemo_args = ["--family", "qwen2_vl"]\n'
    block += 'models = ["Qwen2-VL"]\n'
    (repo / "forks.toml").write_text((repo / "forks.toml").read_text() + "\n" + block)
    registry = forks.load(repo)
    assert list(registry.families)[-1] == "newfamily" and registry.family("newfamily").package == "visual_token_pruning"
    assert registry.family("newfamily").bench == {"family": "qwen2_vl"} and len(registry.forks) == 4
    assert registry.family("qwen3vl").demo_args == () and registry.family("qwen3vl").bench == {}
    assert cli("demo", "newfamily", root=repo) == (0, "visual_token_pruning.demo --family qwen2_vl\n", "")
    assert cli("families", root=repo)[1].split()[-1] == "newfamily"
    if shutil.which("make"):  # make demo passes the family's demo arguments
        stamp = repo / "installed"
        stamp.touch()
        code, out, err = make("-n", "demo", "BACKBONE=newfamily", "MODEL=m", f"STAMP={stamp}", cwd=repo)
        assert (code, out) == (0, ".venv/bin/python -m visual_token_pruning.demo --family qwen2_vl --model m\n"), err


def make(*args, cwd=ROOT):
    proc = subprocess.run(["make", "--no-print-directory", *args], cwd=cwd, capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr


@needs_make
def test_make_demo_runs_the_demo_of_the_family_s_fork_and_a_bad_backbone_lists_the_families(tmp_path):
    stamp = tmp_path / "installed"  # an up-to-date install: the dry run shows the demo's command alone
    stamp.touch()
    for family in forks.load().families.values():
        code, out, err = make("-n", "demo", f"BACKBONE={family.name}", f"STAMP={stamp}")
        want = " ".join([f".venv/bin/python -m {family.fork.demo}", *family.demo_args])
        assert code == 0 and out.strip() == want, (family.name, out, err)
    code, out, _ = make("-n", "demo", f"STAMP={stamp}")
    assert out.strip() == ".venv/bin/python -m llava.vtr.demo"  # BACKBONE defaults to llava
    code, out, err = make("demo", "BACKBONE=qwen")  # refused before anything is installed or run
    assert code == 2 and out == "" and err.count("\n") == 1
    names = ", ".join(forks.load().families)
    assert f"*** BACKBONE=qwen: unknown model family 'qwen'; forks.toml has {names}.  Stop." in err


@needs_make
def test_the_makefile_installs_every_fork_of_forks_toml_and_refuses_a_broken_registry(repo, tmp_path):
    code, out, err = make("-n", "install", f"STAMP={tmp_path / 'never-installed'}", cwd=repo)
    assert code == 0, err
    paths = " ".join(f"-e {fork.path}" for fork in forks.load().forks.values())
    assert f"--no-deps --no-build-isolation {paths}\n" in out
    edit(repo, 'fork = "videollava"', 'fork = "video-llava"')
    for goal in ("test", "install", "lint"):
        code, out, err = make("-n", goal, cwd=repo)
        assert code == 2 and out == "" and err.count("\n") == 1, (goal, out, err)
        assert "*** forks.toml: [family.videollava] fork = 'video-llava' is no fork; forks.toml has llava," in err


def test_every_familys_demo_args_are_its_demos_own():
    """`make demo BACKBONE=<family>` runs `<fork's demo> <demo_args>`: the demo's own parser takes them (a
    typo in forks.toml would only show when someone runs the demo)."""
    for family in forks.load().families.values():
        if not family.demo_args:
            continue
        # a bad --budgets stops the demo right after its arguments are parsed, before any model loads
        argv = [sys.executable, "-m", family.fork.demo, *family.demo_args, "--budgets", "abc"]
        proc = subprocess.run(argv, capture_output=True, text=True)
        assert proc.returncode == 2 and "--budgets 'abc'" in proc.stderr, (family.name, proc.stderr[-500:])
