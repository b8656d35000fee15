"""Entry points for lmms-eval's `lmms_eval.models` group: declare `llava_vtr` and `llava_onevision_vtr` without
importing the model code (lmms-eval imports their classes in `llava.vtr.lmms_eval_plugin` only when a model is
requested).
Each also installs the CLI's early checks of `--model_args`, `--include_path` and `--tasks` for its model
(lmms_eval_compat.check_cli_before_tasks): lmms-eval loads these entry points when it starts, before its
task index."""

from lmms_eval.models.registry_v2 import ModelManifest

from .lmms_eval_compat import check_cli_before_tasks


def _manifest(model_id: str, class_name: str) -> ModelManifest:
    check_cli_before_tasks(model_id)
    return ModelManifest(model_id=model_id, simple_class_path=f"llava.vtr.lmms_eval_plugin.{class_name}")


def manifest() -> ModelManifest:
    return _manifest("llava_vtr", "LlavaVTR")


def manifest_onevision() -> ModelManifest:
    return _manifest("llava_onevision_vtr", "LlavaOnevisionVTR")
