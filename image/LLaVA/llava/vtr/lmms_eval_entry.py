"""Entry point for lmms-eval's `lmms_eval.models` group: declares `llava_vtr` without importing the model
code (lmms-eval imports `llava.vtr.lmms_eval_plugin.LlavaVTR` only when the model is requested)."""

from lmms_eval.models.registry_v2 import ModelManifest


def manifest() -> ModelManifest:
    return ModelManifest(model_id="llava_vtr", simple_class_path="llava.vtr.lmms_eval_plugin.LlavaVTR")
