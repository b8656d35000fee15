# Copied from image/LLaVA/tests/lmms_scores.py
"""Checks that an lmms-eval CLI run's scores are the model's own answers, scored (from `--log_samples`).

Copied byte-identically into every fork's tests (scripts/check_copies.py), imported by the lmms-eval CLI tests.
"""

import importlib.util
import json
from pathlib import Path

import pytest


def task_module(task_dir: Path, name: str):
    """The task folder's `utils.py` (doc_to_visual, process_results), loaded under `name`."""
    spec = importlib.util.spec_from_file_location(name, task_dir / "utils.py")
    task = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(task)
    return task


def logged_samples(results_file: Path, task: str) -> list[dict]:
    """The per-doc samples `--log_samples` wrote beside the results, in doc order."""
    (path,) = results_file.parent.glob(results_file.name.replace("_results.json", f"_samples_{task}.jsonl"))
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])


def read_docs(task_dir: Path, data: str) -> list[dict]:
    return [json.loads(line) for line in (task_dir / data).read_text().splitlines()]


def check_multiple_choice(results, results_file, lm, task, docs, mc_task, choices=("yes", "no")):
    """Each option's logged loss is its mean negative log-likelihood computed in process, and acc is 1 where
    the MORE likely option is the answer (lmms-eval picks the smaller loss, so a log-probability in its place
    would pick the less likely one)."""
    lm.task_dict = {"t": {"test": docs}}
    logged = logged_samples(results_file, mc_task)
    likelihood = []  # per doc and option: the mean log-probability of its tokens
    for i, sample in enumerate(logged):
        visuals = lm.doc_visuals(task.doc_to_visual, i, "t", "test")
        inputs = lm.encode([lm.build_prompt(sample["input"], visuals)], [visuals])
        pair = []
        for choice in choices:
            target = lm.tokenizer(f" {choice}", add_special_tokens=False, return_tensors="pt")["input_ids"]
            logprobs = lm.continuation_logprobs(inputs, target.to(lm.device))
            pair.append(float(logprobs.gather(1, target[0][:, None].to(lm.device)).mean()))
        likelihood.append(pair)
    losses = [[float(loss) for loss, _ in s["filtered_resps"]] for s in logged]
    assert losses == [pytest.approx([-x for x in pair], abs=1e-4) for pair in likelihood], "losses: mean NLL"
    acc = [float(choices[pair.index(max(pair))] == doc["answer"]) for doc, pair in zip(docs, likelihood)]
    assert [s["acc"] for s in logged] == acc and len(acc) == len(docs)
    assert results["results"][mc_task]["acc,none"] == pytest.approx(sum(acc) / len(acc))


def check_scores(results, results_file, lm, task_dir, generation_tasks, mc_task):
    """exact_match is the task's rule on each logged answer of each (task, data file) in `generation_tasks`;
    the multiple-choice task is `check_multiple_choice` on `data.jsonl`."""
    task = task_module(task_dir, f"{mc_task}_utils")
    for name, data in generation_tasks:
        logged, docs = logged_samples(results_file, name), read_docs(task_dir, data)
        exact = [task.process_results(doc, [s["filtered_resps"]])["exact_match"] for doc, s in zip(docs, logged)]
        assert [s["exact_match"] for s in logged] == exact and len(exact) == len(docs)
        assert results["results"][name]["exact_match,none"] == pytest.approx(sum(exact) / len(exact))
    check_multiple_choice(results, results_file, lm, task, read_docs(task_dir, "data.jsonl"), mc_task)
