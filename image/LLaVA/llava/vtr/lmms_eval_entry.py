"""Entry point for lmms-eval's `lmms_eval.models` group: declares `llava_vtr` without importing the model
code (lmms-eval imports `llava.vtr.lmms_eval_plugin.LlavaVTR` only when the model is requested).
It also installs the CLI's early checks of `--model_args`, `--include_path` and `--tasks` for this model
(lmms_eval_compat.check_cli_before_tasks): lmms-eval loads this entry point when it starts, before its
task index."""

from lmms_eval.models.registry_v2 import ModelManifest

from .lmms_eval_compat import check_cli_before_tasks


def manifest() -> ModelManifest:
    check_cli_before_tasks("llava_vtr")
    return ModelManifest(model_id="llava_vtr", simple_class_path="llava.vtr.lmms_eval_plugin.LlavaVTR")
