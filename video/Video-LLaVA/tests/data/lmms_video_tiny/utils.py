"""Task functions of the tiny offline video tasks used by the video_llava_vtr end-to-end test.

Videos are written on first use (small mp4s, PyAV) into `videos/` beside this file, so nothing binary is
checked in; docs with an `image` field also get a picture (a mixed video + image prompt)."""

from pathlib import Path

import numpy as np
from PIL import Image

from videollava.vtr.video_io import write_test_video

HERE = Path(__file__).parent


def doc_to_visual(doc):
    path = HERE / "videos" / f"{doc['video']}.mp4"
    if not path.is_file():
        write_test_video(path, num_frames=doc["frames"], size=(64, 48), fps=8)
    visuals = [str(path)]  # lmms-eval video tasks hand over a path
    if doc.get("image"):
        pixels = np.zeros((40, 40, 3), np.uint8)
        pixels[..., doc["question_id"] % 3] = 255
        visuals.append(Image.fromarray(pixels))
    return visuals


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    post = (lmms_eval_specific_kwargs or {}).get("post_prompt", "")
    return f"{doc['question']}{post}"


def process_results(doc, results):
    prediction = results[0].strip().lower().rstrip(".")
    return {"exact_match": float(prediction == doc["answer"])}


def doc_to_choice_index(doc):
    return ["yes", "no"].index(doc["answer"])
