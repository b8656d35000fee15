"""Task functions of the tiny offline lmms-eval tasks used by the llava_vtr end-to-end test."""

from pathlib import Path

from PIL import Image

HERE = Path(__file__).parent


def doc_to_visual(doc):
    return [Image.open(HERE / doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    post = (lmms_eval_specific_kwargs or {}).get("post_prompt", "")
    return f"{doc['question']}{post}"


def process_results(doc, results):
    prediction = results[0].strip().lower().rstrip(".")
    return {"exact_match": float(prediction == doc["answer"])}


def doc_to_choice_index(doc):
    return ["yes", "no"].index(doc["answer"])
