"""Task functions of `vtr_tiny_qa` and `vtr_tiny_mc`, a tiny local lmms-eval task folder that runs offline
(README "Evaluating with lmms-eval", docs/lmms-eval.md): four 64x64 pictures in images/, one question each in
data.jsonl. A copy of this folder, with its own data, names and functions, is a local task of your own."""

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
