"""LLaVA-1.6 (LLaVA-NeXT, anyres) on the same engine: loading, defaults, exactness, tile coordinates."""

import json

import pytest
import torch
from transformers import LlavaNextForConditionalGeneration

from llava.vtr import (
    VTRConfig,
    VTRLlavaForConditionalGeneration,
    VTRLlavaNextForConditionalGeneration,
    load_model,
    wrap,
)
from llava.vtr.tiny import demo_image
from llava.vtr.visualize import patch_coordinates
from llava_testlib import chat, oracle_forward, oracle_greedy, stage_drops

IMG = demo_image(64)  # any image: build_prompt only counts them

ATOL = 1e-5
STEPS = 5
GRID = 4  # 32 px tiles, 8 px patches


def vtr(path, impl="sdpa", **cfg):
    return load_model(path, VTRConfig(**cfg), attn_implementation=impl)


def visual(model, inputs):
    return inputs["input_ids"] == model.config.image_token_id


def greedy(model, inputs, steps=STEPS):
    out = model.generate(
        **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
        return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.logits, 1)


def test_load_model_picks_the_class_from_the_checkpoint(next_path, tiny_path, tmp_path):
    assert type(vtr(next_path)) is VTRLlavaNextForConditionalGeneration
    assert type(vtr(tiny_path)) is VTRLlavaForConditionalGeneration
    stock = LlavaNextForConditionalGeneration.from_pretrained(next_path)
    assert type(wrap(stock, VTRConfig(keep_tokens=4))) is VTRLlavaNextForConditionalGeneration
    other = tmp_path / "mistral"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(ValueError, match="'mistral' checkpoint; the LLaVA fork handles"):
        load_model(str(other))


def test_stock_weights_load_unchanged(next_path, next_stock):
    model = vtr(next_path)
    for (name, p), (stock_name, q) in zip(model.state_dict().items(), next_stock["sdpa"].state_dict().items()):
        assert name == stock_name and torch.equal(p, q), name


def test_defaults_are_llava_16s_unless_the_user_sets_a_budget(next_path, tiny_path):
    assert vtr(next_path).vtr_config.keep_tokens == 320
    assert vtr(next_path).vtr_config.query_aggregation == "last"
    assert vtr(tiny_path).vtr_config.keep_tokens == 192
    assert vtr(next_path, keep_tokens=50).vtr_config.keep_tokens == 50
    ratio = vtr(next_path, keep_ratio=0.5).vtr_config
    assert ratio.keep_tokens is None and ratio.keep_ratio == 0.5


@pytest.mark.parametrize(
    "cfg",
    [
        dict(strategy="fastv", prune_layer=2, keep_tokens=10),
        dict(strategy="priortr", prune_layer=1, keep_ratio=0.25, query_aggregation="question"),
        dict(strategy="random", prune_layer=3, keep_tokens=7),
        dict(strategy="fastv", prune_layer=[1, 2, 3], keep_tokens=[40, 20, 6]),
    ],
)
def test_pruned_prefill_and_decode_equal_the_oracle(next_path, next_stock, two_shapes, cfg):
    model = vtr(next_path, "sdpa", **cfg)
    inputs = two_shapes
    with torch.no_grad():
        logits = model(**inputs).logits
    record = model.vtr_last
    prompt_len = inputs["input_ids"].shape[1]
    stages = stage_drops(record, 2, prompt_len, visual(model, inputs))
    expected = oracle_forward(next_stock["eager"], inputs, stages, prompt_len)
    for b in range(2):
        rows = record.kept_index[b] >= 0  # not re-padding ...
        rows &= inputs["attention_mask"][b].bool()[record.kept_index[b].clamp_min(0)]  # ... nor prompt padding
        torch.testing.assert_close(logits[b, rows], expected[b, record.kept_index[b, rows]], atol=ATOL, rtol=0)
    tokens, step_logits = greedy(model, inputs)
    want_tokens, want_logits = oracle_greedy(next_stock["eager"], inputs, stages, STEPS)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(step_logits, want_logits, atol=ATOL, rtol=0)


def test_the_budget_is_global_over_base_view_tiles_and_newlines(next_path, square):
    model = vtr(next_path, "sdpa", strategy="fastv", prune_layer=2, keep_tokens=30)
    with torch.no_grad():
        model(**square)
    stage = model.vtr_last.stages[0]
    assert stage.image_tokens_before == [88] and stage.image_tokens_kept == [30]
    first = int(visual(model, square)[0].nonzero().min())
    coords = patch_coordinates(model, square["image_sizes"][0])
    kept = coords[stage.kept_positions[0] - first]
    assert kept.shape == (30, 3) and set(kept[:, 0].tolist()) <= {-1, 0, 1, 2, 3, 4}


def test_patch_coordinates_follow_the_anyres_layout(next_path, next_processor):
    model = vtr(next_path)
    # square 64 px image: base view (tile 0, 4x4), then a 2x2 tile mosaic of 8x8 patches, a newline per row
    coords = patch_coordinates(model, (64, 64))
    assert coords.shape == (88, 3)
    base = [(0, r, c) for r in range(GRID) for c in range(GRID)]
    mosaic = []
    for r in range(2 * GRID):
        for c in range(2 * GRID):
            mosaic.append((1 + (r // GRID) * 2 + c // GRID, r % GRID, c % GRID))
        mosaic.append((-1, -1, -1))
    assert [tuple(x) for x in coords.tolist()] == base + mosaic
    # a wide image: the mosaic is unpadded to the aspect ratio; every position matches the processor's count
    wide = next_processor(images=demo_image(64).resize((96, 40)), text=chat(next_processor), return_tensors="pt")
    coords = patch_coordinates(model, wide["image_sizes"][0])
    assert coords.shape[0] == int(visual(model, wide).sum())
    patches = [tuple(x) for x in coords.tolist() if x[0] >= 0]
    assert len(set(patches)) == len(patches), "each (tile, row, col) appears once"
    assert coords[: GRID * GRID, 0].eq(0).all(), "the base view comes first"
    rows = int((coords[:, 0] == -1).sum())
    mosaic = coords[GRID * GRID :].reshape(rows, -1, 3)  # each mosaic row ends with its newline token
    assert mosaic[:, -1].eq(-1).all() and mosaic[:, :-1, 0].ge(1).all()
    assert rows < 2 * GRID, "the wide image's mosaic lost rows to unpadding"


def test_lmms_eval_plugin_runs_llava_16_with_different_tile_counts_in_one_batch(next_path):
    from llava_lmms_testlib import DOCS, gen_request, ll_request, make

    def wide_visual(doc):  # a different aspect ratio per question: 3, 5 or 3 tiles
        return [demo_image(64).resize((96, 40) if len(doc["q"]) % 2 else (64, 64))]

    batched = make(next_path, "strategy=fastv,keep_tokens=12,prune_layer=2,batch_size=3")
    assert isinstance(batched.model, VTRLlavaNextForConditionalGeneration)
    assert batched.vtr_tag == "fastv_K2_keep12"
    requests = [gen_request(i, visual_fn=wide_visual) for i in DOCS]
    answers = batched.generate_until(requests)
    single = make(next_path, "strategy=fastv,keep_tokens=12,prune_layer=2,batch_size=1")
    assert answers == single.generate_until(requests)
    ((score, _),) = single.loglikelihood([ll_request(1, " yes", visual_fn=wide_visual)])
    assert single.model.vtr_last.stages[0].image_tokens_kept == [12] and score > 0, "a loss (mean NLL)"
    default = make(next_path, "strategy=fastv,prune_layer=2")
    assert default.vtr_tag == "fastv_K2_keep320", "LLaVA-1.6's default budget when none is given"


def test_llava_16_prompt_formats(next_path):
    from transformers import LlavaNextConfig, MistralConfig

    from llava.vtr.lmms_eval_plugin import VICUNA_SYSTEM, default_conv_template
    from llava_lmms_testlib import make

    lm = make(next_path, "strategy=none")
    assert lm.build_prompt("Is it red?", [IMG]) == f"{VICUNA_SYSTEM} USER: <image>\nIs it red? ASSISTANT:"
    mistral = make(next_path, "strategy=none,conv_template=mistral_instruct")
    assert mistral.build_prompt("Is it red?", [IMG]) == "[INST] <image>\nIs it red? [/INST]"
    chatml = make(next_path, "strategy=none,conv_template=chatml_direct")
    assert chatml.build_prompt("Q?", [IMG]).startswith("<|im_start|>system\n") and "user\n<image>\nQ?<|im_end|>" in (
        chatml.build_prompt("Q?", [IMG])
    )
    config = LlavaNextConfig(text_config=MistralConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32))
    assert default_conv_template(config, lm.tokenizer) == "mistral_instruct"
