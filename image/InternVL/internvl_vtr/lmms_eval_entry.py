"""Entry point for lmms-eval's `lmms_eval.models` group: declares `internvl_vtr` without importing the model
code (lmms-eval imports `internvl_vtr.lmms_eval_plugin.InternVLVTR` only when the model is requested).
It also installs the CLI's early checks of `--model_args`, `--include_path` and `--tasks` for this model
(lmms_eval_compat.check_cli_before_tasks): lmms-eval loads this entry point when it starts, before its
task index."""

from lmms_eval.models.registry_v2 import ModelManifest

from .lmms_eval_compat import check_cli_before_tasks


def manifest() -> ModelManifest:
    check_cli_before_tasks("internvl_vtr")
    return ModelManifest(model_id="internvl_vtr", simple_class_path="internvl_vtr.lmms_eval_plugin.InternVLVTR")
