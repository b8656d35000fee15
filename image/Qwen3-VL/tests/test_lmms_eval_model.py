"""The fork's lmms-eval models in process (qwen3_vl_vtr, qwen2_5_vl_vtr, qwen2_vl_vtr, qwen3_5_vtr): images and
videos, batching, loglikelihood pruned on the context, loading keys and their counterparts' defaults, thinking,
bad arguments."""

import importlib
import inspect
import sys

import pytest
import torch
from lmms_eval.api.instance import Instance
from qwen3vl_testlib import oracle_forward, stage_drops, visual_ids

from visual_token_pruning import load_processor
from visual_token_pruning.lmms_eval_plugin import Qwen2_5_VLVTR, Qwen2VLVTR, Qwen3_5VTR, Qwen3VLVTR
from visual_token_pruning.tiny import demo_image
from visual_token_pruning.video_io import write_test_video

DOCS = {i: {"q": q} for i, q in enumerate(["Is it red?", "What shape is shown in the picture?", "Any text?"])}


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    return str(write_test_video(tmp_path_factory.mktemp("clips") / "long.mp4", num_frames=48, size=(32, 32), fps=8))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return str(write_test_video(tmp_path_factory.mktemp("clips") / "clip.mp4", num_frames=16, size=(32, 32), fps=8))


def make(tiny_path, args, model=Qwen3VLVTR):
    lm = model.create_from_arg_string(f"pretrained={tiny_path},{args}", {"batch_size": None, "device": None})
    lm.task_dict = {"t": {"test": DOCS}}
    return lm


def image_visual(doc):
    return [demo_image(64).rotate(90 * len(doc["q"]))]


def _instance(kind, args, doc_id):
    return Instance(kind, args, idx=0, metadata={"task": "t", "doc_id": doc_id, "repeats": 1})


def gen_request(doc_id, visual_fn=image_visual):
    kwargs = {"max_new_tokens": 4, "temperature": 0, "until": ["\n\n"]}
    return _instance("generate_until", (DOCS[doc_id]["q"], kwargs, visual_fn, doc_id, "t", "test"), doc_id)


def test_images_and_videos_in_batches_give_the_single_request_answers(tiny_path, clip):
    def mixed(doc):  # doc 1: a video; the others an image and a video
        return [clip] if len(doc["q"]) > 20 else [*image_visual(doc), clip]

    requests = [gen_request(i, mixed) for i in DOCS]
    args = "strategy=priortr,keep_tokens=8,prune_layer=2,max_num_frames=4,fps=2"
    batched = make(tiny_path, args + ",batch_size=3")
    answers = batched.generate_until(requests)
    assert answers == make(tiny_path, args + ",batch_size=1").generate_until(requests) and len(answers) == 3
    assert batched.model.vtr_last.stages[0].image_tokens_kept == [8, 8, 8]
    prefill = batched._stats.samples[0]
    assert prefill["stages"][0]["image_kept"] == 8 and prefill["image_tokens"] > 8


def test_loglikelihood_prunes_the_context_and_equals_the_oracle(tiny_path, stock_models):
    lm = make(tiny_path, "strategy=fastv,keep_tokens=6,prune_layer=2")
    request = _instance("loglikelihood", (DOCS[1]["q"], " yes no", image_visual, 1, "t", "test"), 1)
    ((score, _),) = lm.loglikelihood([request])
    record = lm.model.vtr_last
    assert record.stages[0].image_tokens_kept == [6]
    visuals = lm.prepare_visuals(image_visual(DOCS[1]))
    inputs = lm.encode([lm.build_prompt(DOCS[1]["q"], visuals)], [visuals])
    target = lm.tokenizer(" yes no", add_special_tokens=False, return_tensors="pt")["input_ids"]
    ctx_len = inputs["input_ids"].shape[1]
    assert record.original_len == ctx_len, "pruning sees the context only"
    full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], target], 1))
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    visual = torch.isin(inputs["input_ids"], torch.tensor(visual_ids(lm.model.config)))
    logits = oracle_forward(stock_models["eager"], full, stage_drops(record, 1, ctx_len, visual), ctx_len)
    logprobs = torch.log_softmax(logits[0, ctx_len - 1 : -1], -1)
    assert score == pytest.approx(-float(logprobs.gather(1, target[0][:, None]).mean()), abs=1e-4), "the mean NLL"
    # unpruned: the continuation chunk runs on the stock path, given no positions
    ((unpruned, _),) = make(tiny_path, "strategy=none").loglikelihood([request])
    assert unpruned != pytest.approx(score, abs=1e-4)


def test_loading_keys_reach_the_processor(tiny_path):
    lm = make(tiny_path, "strategy=none,min_pixels=1024,max_pixels=2048,max_num_frames=6")
    assert lm.processor.image_processor.size["longest_edge"] == 2048
    assert lm.processor.video_processor.max_frames == 6
    visuals = lm.prepare_visuals([demo_image(128)])
    inputs = lm.encode([lm.build_prompt("Q?", visuals)], [visuals])
    assert int(inputs["image_grid_thw"].prod()) * 16 <= 2048, "max_pixels bounds the image"
    user = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q?<|im_end|>\n<|im_start|>assistant\n"
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"  # lmms-eval's qwen3_vl default
    assert lm.build_prompt("<image>Q?", visuals) == system + user
    assert make(tiny_path, "strategy=none,system_prompt=").build_prompt("<image>Q?", visuals) == user


@pytest.mark.parametrize(
    "args,message",
    [
        ("max_num_frames=0", "max_num_frames=0"),
        ("min_pixels=4096,max_pixels=1024", "min_pixels=4096"),
        ("frames=8", "frames"),
    ],
)
def test_bad_arguments_are_refused_naming_the_key(tiny_path, args, message):
    # (under the lmms-eval CLI the same errors end the process with status 2: lmms_eval_base)
    with pytest.raises(ValueError, match=message):
        make(tiny_path, args)


def test_a_visual_of_another_kind_is_refused(tiny_path):
    lm = make(tiny_path, "strategy=none")
    with pytest.raises(ValueError, match="PIL images and video file paths"):
        lm.prepare_visuals([torch.zeros(3)])
    with pytest.raises(ValueError, match="video file not found"):
        lm.prepare_visuals(["/no/such/video.mp4"])


def test_an_image_file_path_is_an_image_and_task_placeholders_are_dropped(tiny_path, tmp_path):
    lm = make(tiny_path, "strategy=none")
    path = tmp_path / "picture.jpg"
    demo_image(64).save(path)
    ((kind, image),) = lm.prepare_visuals([str(path)])
    assert kind == "image" and image.size == (64, 64)
    prompt = lm.build_prompt("<video>\n<image>\nWhat is it?", [(kind, image)])
    assert "<video>" not in prompt and "<image>" not in prompt and prompt.count("<|vision_start|>") == 1


def test_the_cli_checks_model_args_before_the_task_index(monkeypatch, capsys):
    """`python -m lmms_eval --model qwen3_vl_vtr`: this fork's entry point installs the check, with this fork's own
    keys, before lmms-eval indexes its tasks (in process: lmms-eval's own argument parsing and run function)."""
    from lmms_eval.__main__ import cli_evaluate_single, parse_eval_args
    from lmms_eval.tasks import TaskManager

    from visual_token_pruning.lmms_eval_base import validate_model_args

    validate_model_args("strategy=fastv,max_pixels=1003520,max_num_frames=8,fps=1.5")  # this fork's own keys
    with pytest.raises(ValueError, match="fps=0.0: must be > 0"):
        validate_model_args("fps=0")
    monkeypatch.setattr(TaskManager, "initialize_tasks", lambda *a, **k: pytest.fail("the task index was built"))
    monkeypatch.setattr(
        sys, "argv", ["lmms_eval", "--model", "qwen3_vl_vtr", "--model_args", "max_num_frame=8", "--tasks", "mme"]
    )
    with pytest.raises(SystemExit) as stop:
        cli_evaluate_single(parse_eval_args()[1])
    assert stop.value.code == 2
    assert (
        "qwen3_vl_vtr: invalid --model_args: unknown model_args key 'max_num_frame' (did you mean 'max_num_frames'?)"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize("model,family", [(Qwen2_5_VLVTR, "qwen2_5_vl"), (Qwen2VLVTR, "qwen2_vl")])
def test_qwen2_families_batch_images_and_videos_with_their_counterparts_defaults(
    model, family, family_paths, clip, long_clip
):
    """qwen2_5_vl_vtr / qwen2_vl_vtr: batched answers equal single ones on images + videos, the pixel bounds
    default to lmms-eval's qwen2_5_vl / qwen2_vl values (read from lmms-eval), video frames are sized as
    qwen-vl-utils sizes them, and a video file is sampled at 2 frames per second (or `fps`, at most
    max_num_frames) as qwen-vl-utils does."""
    path = family_paths(family)

    def mixed(doc):
        return [clip] if len(doc["q"]) > 20 else [*image_visual(doc), clip]

    requests = [gen_request(i, mixed) for i in DOCS]
    args = "strategy=fastv,keep_tokens=8,prune_layer=2"
    batched = make(path, args + ",batch_size=3", model)
    answers = batched.generate_until(requests)
    assert answers == make(path, args + ",batch_size=1", model).generate_until(requests) and len(answers) == 3
    assert batched.model.vtr_last.stages[0].image_tokens_kept == [8, 8, 8]
    counterpart = {"qwen2_5_vl": "Qwen2_5_VL", "qwen2_vl": "Qwen2_VL"}[family]
    module = importlib.import_module(f"lmms_eval.models.simple.{family}")
    params = inspect.signature(getattr(module, counterpart).__init__).parameters  # lmms-eval's own defaults
    low, high = params["min_pixels"].default, params["max_pixels"].default
    size = batched.processor.image_processor.size
    assert (size["shortest_edge"], size["longest_edge"]) == (low, high)
    video = batched.processor.video_processor.size  # qwen-vl-utils: within the bounds, at most 768 x 28 x 28
    assert (video["shortest_edge"], video["longest_edge"]) == (low, min(high, 602112))
    visuals = batched.prepare_visuals([long_clip])
    for fps, groups in ((None, 6), (1, 3)):  # 6 s: 12 frames at the default 2 per second, 6 at fps=1
        lm = make(path, "strategy=none" + (f",fps={fps}" if fps else ""), model)
        inputs = lm.encode([lm.build_prompt("Q?", visuals)], [visuals])
        assert inputs["video_grid_thw"][0, 0].tolist() == groups, fps
        if family == "qwen2_5_vl":  # seconds per temporal patch: 2 frames at the sampled fps
            assert inputs["second_per_grid_ts"].tolist() == [2 / (fps or 2)]
    few = make(path, "strategy=none,max_num_frames=4", model)
    assert few.encode([few.build_prompt("Q?", visuals)], [visuals])["video_grid_thw"][0, 0].tolist() == 2


def test_a_checkpoint_of_another_family_names_the_right_model(tiny_path, family_paths):
    with pytest.raises(
        ValueError, match="'qwen3_vl' checkpoint; qwen2_5_vl_vtr takes qwen2_5_vl: use --model qwen3_vl_vtr"
    ):
        make(tiny_path, "strategy=none", Qwen2_5_VLVTR)
    with pytest.raises(ValueError, match="'qwen2_vl' checkpoint; qwen3_vl_vtr .*use --model qwen2_vl_vtr"):
        make(family_paths("qwen2_vl"), "strategy=none")


# ----------------------------------------------------------------------------------------------- qwen3_5_vtr


def test_qwen3_5_batches_images_and_videos_with_its_counterparts_defaults(family_paths, clip):
    """qwen3_5_vtr on Qwen3.5-MoE (a hybrid decoder; no intermediate_size for the cost model): batched answers equal
    single ones on images + videos at a prune layer scored from a full-attention layer; the image pixel bounds, the
    frame cap and the new-token default are lmms-eval's qwen3_5 values (read from lmms-eval), videos keep the
    processor's own frame size."""
    path = family_paths("qwen3_5_moe")

    def mixed(doc):
        return [clip] if len(doc["q"]) > 20 else [*image_visual(doc), clip]

    requests = [gen_request(i, mixed) for i in DOCS]
    args = "strategy=fastv,keep_tokens=8,prune_layer=4,enable_thinking=false"
    batched = make(path, args + ",batch_size=3", Qwen3_5VTR)
    answers = batched.generate_until(requests)
    assert answers == make(path, args + ",batch_size=1", Qwen3_5VTR).generate_until(requests) and len(answers) == 3
    assert batched.model.vtr_last.stages[0].image_tokens_kept == [8, 8, 8]
    assert 0 < batched._stats.samples[0]["flops_ratio"] < 1
    params = inspect.signature(importlib.import_module("lmms_eval.models.simple.qwen3_5").Qwen3_5.__init__).parameters
    size = batched.processor.image_processor.size
    assert (size["shortest_edge"], size["longest_edge"]) == (params["min_pixels"].default, params["max_pixels"].default)
    assert batched.processor.video_processor.max_frames == params["max_num_frames"].default
    assert batched.processor.video_processor.size == load_processor(path).video_processor.size
    counterpart = importlib.import_module("lmms_eval.models.simple.qwen3_5").Qwen3_5.DEFAULT_GEN_KWARGS
    assert batched.default_max_new_tokens == counterpart["max_new_tokens"]


THINKING_TEMPLATE = (  # Qwen3.5's generation prompt: an open think block, or an empty one with thinking off
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "<|im_start|>assistant\n{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}"
)


def test_qwen3_5_thinks_by_default_and_answers_with_what_follows_the_think_block(family_paths, monkeypatch):
    """enable_thinking reaches the chat template (on by default, as lmms-eval's qwen3_5), and the answer is what
    follows </think> before the task's stop sequences cut it (empty where the block never closed); off, the text
    stays whole. The folder of a run that sets it names it."""
    path = family_paths("qwen3_5")
    visuals = [("image", demo_image(64))]
    for args, opened in (("", "<think>\n"), (",enable_thinking=false", "<think>\n\n</think>\n\n")):
        lm = make(path, "strategy=none" + args, Qwen3_5VTR)
        lm.processor.chat_template = THINKING_TEMPLATE
        assert lm.build_prompt("Q?", visuals).endswith("<|im_start|>assistant\n" + opened)
        answers = []
        for text in ("reasoning.\n\nmore</think>\n\nA red house.\n\nextra", "cut off while thinking"):
            monkeypatch.setattr(lm.tokenizer, "batch_decode", lambda ids, text=text, **k: [text])
            answers += lm.generate_until([gen_request(0)])
        assert answers == (["A red house.", ""] if not args else ["reasoning.", "cut off while thinking"])
    assert "__enable_thinking-False" in Qwen3_5VTR.folder_name("enable_thinking=false", "org/ckpt")
    assert "enable_thinking" not in Qwen3_5VTR.folder_name("strategy=fastv", "org/ckpt")


def test_qwen3_5_loglikelihood_puts_the_recurrent_states_back_after_each_option(family_paths):
    """Options scored on one pruned context cache, whose linear-attention layers' convolution and recurrent states
    each option updates in place: every option scores as it does on a fresh prefill of its own (one-token,
    two-token and longer options: the single-token step updates the convolution state in place)."""
    lm = make(family_paths("qwen3_5"), "strategy=fastv,keep_tokens=6,prune_layer=4", Qwen3_5VTR)
    options = [" yes no", " one", " one two", " left right top bottom", " yes no"]
    requests = [_instance("loglikelihood", (DOCS[1]["q"], o, image_visual, 1, "t", "test"), 1) for o in options]
    scores = lm.loglikelihood(requests)
    assert lm.model.vtr_last.stages[0].image_tokens_kept == [6] and lm._stats.samples[-1]["stages"][0]["layer"] == 4
    for request, (score, greedy) in zip(requests, scores):
        ((alone, alone_greedy),) = lm.loglikelihood([request])
        assert score == pytest.approx(alone, abs=1e-5) and greedy == alone_greedy, request.args[1]
    assert scores[0] == scores[-1] and len({round(s, 4) for s, _ in scores}) == 4


def test_qwen3_5_refuses_a_schedule_its_decoder_cannot_run_before_loading(family_paths):
    """With the checkpoint's config on disk, the layer kinds are checked with the arguments (the CLI's and vtr_run's
    check): a prune layer scored from a linear-attention layer, CLSE's trim; a default schedule that moves is
    accepted."""
    from visual_token_pruning.lmms_eval_base import validate_model_args

    path = family_paths("qwen3_5")
    with pytest.raises(ValueError, match="prune_layer=2: 'fastv' .* prune that stage at layer 3 or later"):
        validate_model_args(f"pretrained={path},strategy=fastv,prune_layer=2", model="qwen3_5_vtr")
    with pytest.raises(ValueError, match=r"earlier_cache='trim' \(the official convention of 'clse'\)"):
        validate_model_args(f"pretrained={path},strategy=clse,prune_layer=[3;5]", model="qwen3_5_vtr")
    validate_model_args(f"pretrained={path},strategy=dart,enable_thinking=false", model="qwen3_5_vtr")  # 2 moves to 3
    validate_model_args("pretrained=Qwen/Qwen3.5-4B,strategy=fastv,prune_layer=2", model="qwen3_5_vtr")  # not on disk


def test_qwen3_5_and_qwen3_vl_checkpoints_name_each_others_model(tiny_path, family_paths):
    with pytest.raises(
        ValueError, match="'qwen3_vl' checkpoint; qwen3_5_vtr takes qwen3_5, qwen3_5_moe: use --model qwen3_vl_vtr"
    ):
        make(tiny_path, "strategy=none", Qwen3_5VTR)
    with pytest.raises(ValueError, match="'qwen3_5_moe' checkpoint; qwen3_vl_vtr .*use --model qwen3_5_vtr"):
        make(family_paths("qwen3_5_moe"), "strategy=none")
