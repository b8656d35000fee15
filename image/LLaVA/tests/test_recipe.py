"""docs/adding-a-method.md, followed literally on a temporary copy of the package."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import llava

DOC = Path(__file__).resolve().parents[3] / "docs" / "adding-a-method.md"

RUN = r"""
import json, sys, torch
from transformers import AutoProcessor
import llava
from llava.vtr import VTRConfig, load_model, available_strategies
from llava.vtr.tiny import demo_image
path, names = sys.argv[1], sys.argv[2].split(",")
proc = AutoProcessor.from_pretrained(path)
inputs = proc(images=demo_image(64), text="USER: <image>\nWhat is shown? ASSISTANT:", return_tensors="pt")
out = {"package": llava.__file__, "registered": available_strategies(), "kept": {}}
for name in names:
    model = load_model(path, VTRConfig(strategy=name, keep_tokens=[10, 5], prune_layer=[1, 3]))
    tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    out["kept"][name] = [s.image_tokens_kept[0] for s in model.vtr_last.stages]
print(json.dumps(out))
"""


def doc_blocks():
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_recipe_in_the_doc_works_on_a_copy_of_the_package(tmp_path, tiny_path):
    package = tmp_path / "llava"
    shutil.copytree(Path(llava.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    strategy_files = [b for b in doc_blocks() if b.startswith("# llava/vtr/strategy/")]
    import_line = next(b for b in doc_blocks() if b.startswith("from . import hidden_norm")).strip()
    assert len(strategy_files) == 3
    init = package / "vtr" / "strategy" / "__init__.py"
    names = []
    for block in strategy_files:
        rel = block.splitlines()[0].removeprefix("# ").strip()
        (tmp_path / rel).write_text(block)  # step 1: one new file
        module = Path(rel).stem
        line = import_line.replace("hidden_norm", module)
        init.write_text(init.read_text() + line + "\n")  # step 2: one import line
        names.append(re.search(r'@register_strategy\("(\w+)"\)', block).group(1))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-c", RUN, tiny_path, ",".join(names)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["package"].startswith(str(tmp_path)), "the copy, not the installed package, must be used"
    assert {"hidden_norm", "router", "cumulative"} <= set(out["registered"])
    for name in names:  # step 3: run by name; the framework applied each stage's budget
        assert out["kept"][name] == [10, 5], (name, out)
