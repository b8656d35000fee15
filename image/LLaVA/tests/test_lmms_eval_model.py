"""The llava_vtr lmms-eval model in process: loglikelihood with pruning, batching, prompts, loading."""

import json

import pytest
import torch

from llava.vtr.lmms_eval_plugin import VICUNA_SYSTEM
from llava.vtr.tiny import build_tiny_original_llava, demo_image
from llava_lmms_testlib import DOCS, gen_request, ll_request, make, visual  # noqa: F401
from llava_testlib import oracle_forward, stage_drops

IMG = demo_image(64)  # any image: build_prompt only counts them


def test_prompt_uses_the_llava_15_conversation_template(tiny_path):
    lm = make(tiny_path, "strategy=none")
    assert lm.build_prompt("Is it red?", [IMG]) == f"{VICUNA_SYSTEM} USER: <image>\nIs it red? ASSISTANT:"
    assert (
        lm.build_prompt("<image> first. Is it red?", [IMG])
        == f"{VICUNA_SYSTEM} USER: <image> first. Is it red? ASSISTANT:"
    )
    plain = make(tiny_path, "strategy=none,conv_template=plain")
    assert plain.build_prompt("Q?", [IMG, IMG]) == "<image>\n<image>\nQ?"
    with pytest.raises(ValueError, match="conv_template='chatml'"):
        make(tiny_path, "conv_template=chatml")
    with pytest.raises(ValueError, match="no automatic batch size"):
        make(tiny_path, "max_batch_size=8")


def test_loglikelihood_applies_pruning_and_equals_the_oracle(tiny_path, stock_models):
    """The value is a loss (mean negative log-likelihood per token), as lmms-eval's own models return it: its
    multiple_choice scoring picks the option with the SMALLEST value."""
    lm = make(tiny_path, "strategy=fastv,keep_tokens=6,prune_layer=1")
    ((score, greedy),) = lm.loglikelihood([ll_request(1, " yes no")])
    record = lm.model.vtr_last
    assert record is not None and record.stages[0].image_tokens_kept == [6]

    # the oracle: the context alone is pruned (tokens dropped from layer 1 on); the continuation rows are
    # decode rows, which see the dropped tokens in layer 0 only (FastV keeps those layers' cache whole)
    inputs = lm.encode([lm.build_prompt(DOCS[1]["q"], visual(DOCS[1]))], [visual(DOCS[1])])
    target = lm.tokenizer(" yes no", add_special_tokens=False, return_tensors="pt")["input_ids"]
    ctx_len = inputs["input_ids"].shape[1]
    assert record.original_len == ctx_len, "pruning must see the context only"
    full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], target], 1))
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    stages = stage_drops(record, 1, ctx_len, inputs["input_ids"] == lm.model.config.image_token_id)
    conventions = lm.model.vtr_conventions()
    assert conventions.earlier_cache == "keep"
    logits = oracle_forward(stock_models["eager"], full, stages, ctx_len, conventions=conventions)
    logprobs = torch.log_softmax(logits[0, ctx_len - 1 : -1], -1)
    expected = -float(logprobs.gather(1, target[0][:, None]).mean())
    assert score == pytest.approx(expected, abs=1e-4)
    assert greedy == bool((logprobs.argmax(-1) == target[0]).all())

    unpruned = make(tiny_path, "strategy=none")
    ((unpruned_score, _),) = unpruned.loglikelihood([ll_request(1, " yes no")])
    assert unpruned_score != pytest.approx(score, abs=1e-4), "pruning must change the context the score sees"


def test_every_option_and_generation_keep_the_same_image_tokens(tiny_path):
    """The continuation being scored must not choose which image tokens survive."""
    lm = make(tiny_path, "strategy=fastv,keep_tokens=4,prune_layer=2")
    lm.generate_until([gen_request(1)])
    kept = [lm.model.vtr_last.stages[0].kept_positions[0].tolist()]
    for option in [" red", " blue", " yes", " a green square in the middle"]:
        lm.loglikelihood([ll_request(1, option)])
        kept.append(lm.model.vtr_last.stages[0].kept_positions[0].tolist())
    assert all(k == kept[0] for k in kept), kept


def test_generate_until_batches_give_the_single_request_answers(tiny_path):
    requests = [gen_request(i) for i in DOCS]
    batched = make(tiny_path, "strategy=priortr,keep_tokens=8,prune_layer=2,batch_size=3").generate_until(requests)
    single = make(tiny_path, "strategy=priortr,keep_tokens=8,prune_layer=2,batch_size=1").generate_until(requests)
    assert batched == single and len(batched) == 3


def test_until_cuts_the_answer(tiny_path):
    lm = make(tiny_path, "strategy=none")
    (full,) = lm.generate_until([gen_request(0, until=["\n\n"])])
    assert full, "the random model must produce some text for this test to mean anything"
    stop = full.strip()[1]
    (cut,) = lm.generate_until([gen_request(0, until=[stop])])
    assert cut == full.split(stop)[0].strip()


def test_original_format_checkpoint_loads_through_the_plugin(tmp_path):
    path, _ = build_tiny_original_llava(tmp_path / "orig")
    lm = make(str(path), "strategy=fastv,keep_tokens=4,prune_layer=2")
    (answer,) = lm.generate_until([gen_request(2)])
    assert isinstance(answer, str)
    assert lm.model.vtr_last.stages[0].image_tokens_kept == [4]


def test_response_cache_is_keyed_by_the_lmms_eval_release_not_by_our_git_commit():
    """The virtualenv sits inside this repository, so lmms-eval's `git describe` would name OUR commit and
    every commit would silently empty the response cache; the plugin keys it by the installed release."""
    import importlib.metadata

    import lmms_eval.utils

    import llava.vtr.lmms_eval_plugin  # noqa: F401  (importing the plugin installs the workarounds)

    version = lmms_eval.utils.get_lmms_eval_cache_version()
    assert version == importlib.metadata.version("lmms-eval") + "+vtr-loss", "the release and our response format"


def test_under_the_cli_a_failing_request_ends_the_process_with_status_1(tiny_path, monkeypatch, capsys):
    """lmms-eval's CLI logs any exception and exits 0; a request that fails inside our model stops the run."""
    from llava.vtr import lmms_eval_compat as compat

    lm = make(tiny_path, "strategy=fastv,keep_tokens=6,prune_layer=2")
    bad = ll_request(1, " yes", visual_fn=lambda doc: ["not an image"])
    with pytest.raises(ValueError, match="takes images"):  # outside the CLI: the error itself
        lm.loglikelihood([bad])
    monkeypatch.setattr(compat, "under_lmms_eval_cli", lambda: True)
    with pytest.raises(SystemExit) as stop:
        lm.loglikelihood([bad])
    assert stop.value.code == 1 and "llava_vtr: the run failed: ValueError" in capsys.readouterr().err


def test_generation_kwargs_reach_generate_and_unknown_ones_are_named(tiny_path):
    from loguru import logger

    lm = make(tiny_path, "strategy=fastv,keep_tokens=6,prune_layer=2")
    messages = []
    handler = logger.add(messages.append, level="WARNING")
    try:
        kwargs = lm.generation_kwargs({"max_new_tokens": 3, "repetition_penalty": 1.3, "image_aspect_ratio": "pad"})
    finally:
        logger.remove(handler)
    assert kwargs["repetition_penalty"] == 1.3 and kwargs["max_new_tokens"] == 3
    assert "image_aspect_ratio" not in kwargs
    assert any("['image_aspect_ratio'] are not used" in m for m in messages)


class FakeAccelerator:
    """Process 5 of 8 over two nodes of 4 (local process 1 of the second node)."""

    process_index, local_process_index, num_processes = 5, 1, 8


def test_requests_are_sharded_by_the_global_rank(tiny_path, monkeypatch):
    """lmms-eval splits the requests by `lm.rank` / `lm.world_size`: with several nodes the local rank would
    give two processes the same shard and leave another one unanswered."""
    from llava.vtr import lmms_eval_base

    monkeypatch.setattr(lmms_eval_base, "Accelerator", FakeAccelerator)
    lm = make(tiny_path, "strategy=none")
    assert (lm.rank, lm.world_size) == (5, 8)
    assert lm.device == torch.device("cpu")


def test_with_several_processes_one_record_is_written(tiny_path, tmp_path):
    """After the merge every process holds the whole run's record: process 0 alone writes it (to stats_path=
    too); processes that could not be merged each write their own `_rank<r>` file."""
    lm = make(tiny_path, f"strategy=fastv,keep_tokens=6,prune_layer=2,stats_path={tmp_path / 'run.json'}")
    lm.generate_until([gen_request(0)])
    lm._world_size = 2
    lm._merged_ranks, lm._rank = 2, 1
    assert lm.write_stats(tmp_path, "") is None and not list(tmp_path.iterdir())
    lm._rank = 0
    assert lm.write_stats(tmp_path, "") == tmp_path / "run.json"
    record = json.loads((tmp_path / "run.json").read_text())
    assert (record["processes_merged"], record["prefills"]) == (2, 1)
    lm._merged_ranks, lm._rank = 0, 1
    assert lm.write_stats(tmp_path, "") == tmp_path / "run_rank1.json"
    lm.stats_path = None
    assert (
        lm.write_stats(tmp_path / "out", "20260101")
        == tmp_path / "out" / "vtr_stats_fastv_K2_keep6_20260101_rank1.json"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run.json", "run_rank1.json"]


class RecordingCacheHook:
    def __init__(self):
        self.calls = []

    def add_partial(self, *args):
        self.calls.append(args)


def test_answers_are_not_handed_to_a_cache_keyed_on_the_context_alone(tiny_path):
    """lmms-eval's cache hook keys an answer by (context, gen_kwargs): the same question under another image,
    pruning setting or option list would get this answer back. The plugin hands it nothing (the response
    cache of --use_cache keys on the model args and the doc instead)."""
    lm = make(tiny_path, "strategy=fastv,keep_tokens=6,prune_layer=2")
    hook = RecordingCacheHook()
    lm.set_cache_hook(hook)
    lm.generate_until([gen_request(0), gen_request(1)])
    lm.loglikelihood([ll_request(1, " yes")])
    assert hook.calls == []


def test_a_four_option_question_costs_one_prefill_with_the_same_numbers(tiny_path):
    """Every option of a document is scored on one pruned prefill of its context: the same (loss, greedy) as
    scoring each option alone, and the record counts one prefill per document."""
    options = [" red", " blue", " yes", " a green square in the middle"]
    args = "strategy=fastv,keep_tokens=6,prune_layer=2"
    alone = [make(tiny_path, args).loglikelihood([ll_request(1, o)])[0] for o in options]
    lm = make(tiny_path, args)
    requests = [ll_request(1, o) for o in options] + [ll_request(2, " yes")]
    together = lm.loglikelihood(requests)
    assert together[:4] == alone, "bit-identical to one prefill per option"
    assert together[4] == make(tiny_path, args).loglikelihood([ll_request(2, " yes")])[0]
    record = lm.stats_summary()
    assert record["prefills"] == 2, "one per document, not one per option"
    assert record["prefill_ms_samples"] == [s["prefill_ms"] for s in lm._stats.samples]
    first, second = sorted(record["prefill_ms_samples"])
    assert record["prefill_ms"] == pytest.approx(dict(
        min=first, p25=first + (second - first) / 4, median=(first + second) / 2,
        p75=first + 3 * (second - first) / 4, max=second,
    )), "the record gives the prefill times' spread, not only their mean"  # fmt: skip


def test_an_image_file_path_is_an_image_as_in_the_other_forks(tiny_path, tmp_path):
    """lmms-eval tasks may hand over image file paths (InternVL, Qwen3-VL and Video-LLaVA take them, through
    the same base helper): the same pixels and the same answer as the PIL image."""
    lm = make(tiny_path, "strategy=fastv,keep_tokens=6,prune_layer=2")
    picture = visual(DOCS[0])[0]
    path = tmp_path / "picture.png"
    picture.save(path)
    (image,) = lm.prepare_visuals([str(path)])
    assert image.mode == "RGB" and image.tobytes() == picture.convert("RGB").tobytes()
    from_path = lm.generate_until([gen_request(0, visual_fn=lambda doc: [str(path)])])
    assert from_path == lm.generate_until([gen_request(0)])
    with pytest.raises(FileNotFoundError, match="image file not found: .*missing.png"):
        lm.prepare_visuals([str(tmp_path / "missing.png")])
    with pytest.raises(ValueError, match=r"llava_vtr takes images \(PIL, or an image file path\); got str 'clip.mp4'"):
        lm.prepare_visuals(["clip.mp4"])


def test_model_args_are_validated_without_loading_anything(tmp_path):
    """`validate_model_args` (for a caller that starts lmms-eval, like scripts/vtr_run) raises what the CLI
    prints before exiting 2; nothing is loaded, so the checkpoint need not exist yet."""
    from llava.vtr.lmms_eval_base import validate_model_args

    validate_model_args(f"pretrained={tmp_path / 'not-yet'},strategy=fastv,keep_tokens=64,conv_template=plain")
    validate_model_args("strategy=priortr,prune_layer=[2,8],keep_tokens=[96,48]", {"batch_size": "4", "device": None})
    for args, extra, message in [
        ("keep_token=64", None, r"unknown model_args key 'keep_token' \(did you mean 'keep_tokens'\?\); valid keys: "),
        ("conv_template=chatml", None, "conv_template='chatml': choose one of"),  # LLaVA's own key
        ("strategy=fastv,keep_ratio=1.5", None, "keep_ratio"),
        ("", {"batch_size": "auto"}, "batch_size='auto'"),  # --batch_size auto, as lmms-eval hands it over
        ("dtype=float17", None, "dtype='float17' is not a torch dtype"),
    ]:
        with pytest.raises(ValueError, match=message):
            validate_model_args(args, extra)
