"""Entry point for lmms-eval's `lmms_eval.models` group: declares `internvl_vtr` without importing the model
code (lmms-eval imports `internvl_vtr.lmms_eval_plugin.InternVLVTR` only when the model is requested)."""

from lmms_eval.models.registry_v2 import ModelManifest


def manifest() -> ModelManifest:
    return ModelManifest(model_id="internvl_vtr", simple_class_path="internvl_vtr.lmms_eval_plugin.InternVLVTR")
