"""Entry point for lmms-eval's `lmms_eval.models` group: declares `video_llava_vtr` without importing the
model code (lmms-eval imports `videollava.vtr.lmms_eval_plugin.VideoLlavaVTR` only when it is requested)."""

from lmms_eval.models.registry_v2 import ModelManifest


def manifest() -> ModelManifest:
    return ModelManifest(model_id="video_llava_vtr", simple_class_path="videollava.vtr.lmms_eval_plugin.VideoLlavaVTR")
