"""Entry points for lmms-eval's `lmms_eval.models` group: declare `qwen3_vl_vtr`, `qwen2_5_vl_vtr`,
`qwen2_vl_vtr` and `qwen3_5_vtr` without importing the model code (lmms-eval imports their classes in
`visual_token_pruning.lmms_eval_plugin` only when a model is requested).
It also installs the CLI's early checks of `--model_args`, `--include_path` and `--tasks` for this model
(lmms_eval_compat.check_cli_before_tasks): lmms-eval loads this entry point when it starts, before its
task index."""

from lmms_eval.models.registry_v2 import ModelManifest

from .lmms_eval_compat import check_cli_before_tasks


def _manifest(model_id: str, class_name: str) -> ModelManifest:
    check_cli_before_tasks(model_id)
    return ModelManifest(model_id=model_id, simple_class_path=f"visual_token_pruning.lmms_eval_plugin.{class_name}")


def manifest() -> ModelManifest:
    return _manifest("qwen3_vl_vtr", "Qwen3VLVTR")


def manifest_qwen2_5_vl() -> ModelManifest:
    return _manifest("qwen2_5_vl_vtr", "Qwen2_5_VLVTR")


def manifest_qwen2_vl() -> ModelManifest:
    return _manifest("qwen2_vl_vtr", "Qwen2VLVTR")


def manifest_qwen3_5() -> ModelManifest:
    return _manifest("qwen3_5_vtr", "Qwen3_5VTR")
