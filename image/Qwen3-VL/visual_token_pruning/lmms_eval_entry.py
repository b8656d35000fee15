"""Entry point for lmms-eval's `lmms_eval.models` group: declares `qwen3_vl_vtr` without importing the model
code (lmms-eval imports `visual_token_pruning.lmms_eval_plugin.Qwen3VLVTR` only when the model is requested)."""

from lmms_eval.models.registry_v2 import ModelManifest


def manifest() -> ModelManifest:
    return ModelManifest(model_id="qwen3_vl_vtr", simple_class_path="visual_token_pruning.lmms_eval_plugin.Qwen3VLVTR")
