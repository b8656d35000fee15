"""Task functions of the tiny offline lmms-eval tasks used by the qwen3_vl_vtr end-to-end test (the videos
are written by the test itself, with video_io.write_test_video)."""

from pathlib import Path

from PIL import Image

HERE = Path(__file__).parent


def doc_to_visual(doc):
    return [Image.open(HERE / doc["image"]).convert("RGB")]


def doc_to_video(doc):
    return [str(HERE / doc["video"])]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    post = (lmms_eval_specific_kwargs or {}).get("post_prompt", "")
    return f"{doc['question']}{post}"


def process_results(doc, results):
    prediction = results[0].strip().lower().rstrip(".")
    return {"exact_match": float(prediction == doc["answer"])}


def doc_to_choice_index(doc):
    return ["yes", "no"].index(doc["answer"])
