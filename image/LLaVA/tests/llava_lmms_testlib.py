"""Requests and a model for the llava_vtr lmms-eval tests (a module of its own: test modules of different forks
share names, so tests never import each other)."""

from lmms_eval.api.instance import Instance

from llava.vtr.lmms_eval_plugin import LlavaVTR
from llava.vtr.tiny import demo_image

DOCS = {i: {"q": q} for i, q in enumerate(["Is it red?", "What shape is shown in the picture?", "Any text?"])}


def make(tiny_path, args):
    lm = LlavaVTR.create_from_arg_string(f"pretrained={tiny_path},{args}", {"batch_size": None, "device": None})
    lm.task_dict = {"t": {"test": DOCS}}
    return lm


def visual(doc):
    return [demo_image(64).rotate(90 * len(doc["q"]))]


def _instance(kind, args, doc_id, task="t"):
    return Instance(kind, args, idx=0, metadata={"task": task, "doc_id": doc_id, "repeats": 1})


def ll_request(doc_id, continuation=" yes", visual_fn=visual):
    return _instance("loglikelihood", (DOCS[doc_id]["q"], continuation, visual_fn, doc_id, "t", "test"), doc_id)


def gen_request(doc_id, visual_fn=visual, **gen_kwargs):
    kwargs = {"max_new_tokens": 5, "temperature": 0, "until": ["\n\n"], **gen_kwargs}
    return _instance("generate_until", (DOCS[doc_id]["q"], kwargs, visual_fn, doc_id, "t", "test"), doc_id)
