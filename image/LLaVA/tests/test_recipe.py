"""docs/adding-a-method.md, followed literally on a copy of the repository: the method file, the import line,
a new config field, a run by name and `make check-copies` in one fork; then `make share-method` puts the
method into every fork."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
DOC = REPO / "docs" / "adding-a-method.md"
FORKS = ["image/LLaVA", "image/InternVL", "image/Qwen3-VL", "video/Video-LLaVA"]

RUN = r"""
import json, sys, torch
from transformers import AutoProcessor
import llava
from llava.vtr import VTRConfig, load_model, available_strategies
from llava.vtr.model_args import parse_model_args, split_args
from llava.vtr.tiny import demo_image
path, names = sys.argv[1], sys.argv[2].split(",")
proc = AutoProcessor.from_pretrained(path)
inputs = proc(images=demo_image(64), text="USER: <image>\nWhat is shown? ASSISTANT:", return_tensors="pt")
out = {"package": llava.__file__, "registered": available_strategies(), "kept": {}}
for name in names:
    model = load_model(path, VTRConfig(strategy=name, keep_tokens=[10, 5], prune_layer=[1, 3]))
    tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    out["kept"][name] = [s.image_tokens_kept[0] for s in model.vtr_last.stages]
_, cfg = parse_model_args(split_args("strategy=hidden_norm,hidden_norm_order=1"), {})
out["field"] = cfg.hidden_norm_order
print(json.dumps(out))
"""


def doc_blocks(lang="python"):
    """The doc's fenced blocks of one language ("" = no language given), in order."""
    blocks, block = [], None  # block: the lines of the open fence, None outside one
    for line in DOC.read_text().splitlines(keepends=True):
        if block is None and line.startswith("```"):
            block, wanted = [], line[3:].strip() == lang
        elif block is not None and line.strip() == "```":
            if wanted:
                blocks.append("".join(block))
            block = None
        elif block is not None:
            block.append(line)
    return blocks


def run(args, tree, *forks, **kwargs):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(tree / f) for f in forks))
    return subprocess.run(args, cwd=tree, env=env, capture_output=True, text=True, **kwargs)


@pytest.fixture
def tree(tmp_path):
    """The repository's files (tracked and new, not ignored) in a fresh git checkout of their own."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split("\0")  # fmt: skip
    root = tmp_path / "repo"
    for rel in filter(None, listed):
        if (REPO / rel).is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, root / rel)
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "base"]):
        subprocess.run(git + cmd, cwd=root, check=True, capture_output=True)
    return root


def test_the_recipe_works_in_one_fork_then_in_every_fork(tree, tiny_path):
    package = tree / "image" / "LLaVA"
    strategy_files = [b for b in doc_blocks() if b.startswith("# llava/vtr/strategy/")]
    import_line = next(b for b in doc_blocks() if b.startswith("from . import hidden_norm")).strip()
    assert len(strategy_files) == 3
    init = package / "llava" / "vtr" / "strategy" / "__init__.py"
    names = []
    for block in strategy_files:
        rel = block.splitlines()[0].removeprefix("# ").strip()
        (package / rel).write_text(block)  # step 1: one new file
        module = Path(rel).stem
        init.write_text(init.read_text() + import_line.replace("hidden_norm", module) + "\n")  # step 2
        names.append(re.search(r'@register_strategy\("(\w+)"\)', block).group(1))
    field = next(b for b in doc_blocks() if b.lstrip().startswith("hidden_norm_order:"))
    config = package / "llava" / "vtr" / "config.py"
    anchor = "    # Filled in __post_init__"
    config.write_text(config.read_text().replace(anchor, field.rstrip("\n") + "\n" + anchor, 1))  # a new field

    proc = run([sys.executable, "-c", RUN, tiny_path, ",".join(names)], tree, "image/LLaVA")  # step 3
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["package"].startswith(str(tree)), "the copy, not the installed package, must be used"
    assert {"hidden_norm", "router", "cumulative"} <= set(out["registered"])
    for name in names:  # the framework applied each stage's budget
        assert out["kept"][name] == [10, 5], (name, out)
    assert out["field"] == 1.0, "the new field is settable by name from the command line"

    # `make check-copies` itself, with this environment's interpreter (an up-to-date install stamp: no reinstall)
    stamp = tree / "installed.stamp"
    stamp.touch()
    venv = Path(sys.executable).parent.parent
    copies = run(["make", "check-copies", f"VENV={venv}", f"STAMP={stamp}"], tree)
    assert copies.returncode == 0, copies.stdout[-3000:] + copies.stderr[-2000:]
    assert "image/InternVL/internvl_vtr/config.py" in copies.stdout, "the field's edit is carried, and said"
    matrix = run([sys.executable, "scripts/capability_matrix.py", "--check"], tree, *FORKS)
    assert matrix.returncode == 0, matrix.stderr

    make = doc_blocks("")[0].strip()  # the documented all-forks command
    assert make == "make share-method METHOD=hidden_norm"
    shared = run(make.split() + [f"VENV={venv}"], tree, timeout=300)
    assert shared.returncode == 0, shared.stdout[-2000:] + shared.stderr[-2000:]
    assert run([sys.executable, "scripts/check_copies.py"], tree).returncode == 0
    assert run([sys.executable, "scripts/capability_matrix.py", "--check"], tree, *FORKS).returncode == 0
    assert "| `hidden_norm` | yes | yes | yes | yes |" in (tree / "README.md").read_text()
    probe = "import {0} as f; from {0}.config import VTRConfig; print(sorted(f.available_strategies()), VTRConfig.hidden_norm_order)"
    for fork, package_name in zip(FORKS[1:], ["internvl_vtr", "visual_token_pruning", "videollava.vtr"]):
        got = run([sys.executable, "-c", probe.format(package_name)], tree, fork)
        assert got.returncode == 0 and "'hidden_norm'" in got.stdout and "2.0" in got.stdout, (fork, got.stderr[-2000:])
        assert "'router'" not in got.stdout, "only the shared method moved"
