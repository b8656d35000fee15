"""Post-install check of the one environment: every fork imports, and torchvision either works or is absent.

lmms-eval depends on torchvision, but PyPI's torchvision wheel is built against the CUDA torch and fails
to load beside the CPU `torch==2.13.0+cpu` ("operator torchvision::nms does not exist"). Transformers
then refuses to import LLaVA at all. Without torchvision, transformers uses its PIL image processors,
which is all the CPU setup needs. So a torchvision that cannot import is removed, loudly; with a CUDA
torch (README, "GPU install") the matching torchvision imports and stays.
"""

import subprocess
import sys


def can_import(module: str) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0


def main() -> int:
    installed = subprocess.run([sys.executable, "-m", "pip", "show", "-q", "torchvision"], capture_output=True)
    if installed.returncode == 0 and not can_import("torchvision"):
        print(
            "post_install: torchvision cannot load beside this torch build; removing it (PIL image processors are used)."
        )
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", "torchvision"], check=True)
    check = "import llava.vtr, internvl_vtr, visual_token_pruning, videollava, lmms_eval, transformers, torch"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    if result.returncode != 0:
        print(result.stderr, file=sys.stderr)
        print("post_install: the environment is broken (see above).", file=sys.stderr)
        return 1
    print("post_install: all four forks import in one environment.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
