"""DART: the kept set against the official selection restated literally, by hand and on the tiny models."""

import math

import pytest
import torch
from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
from vtr_oracle import oracle_forward, oracle_greedy, stage_drops

from llava.vtr import VTRConfig, get_strategy, load_model
from llava.vtr.attention import ScoringAttention


def official(keys, states, start, length, topk, pivot_image=4, pivot_text=4, order=None):
    """`get_retained_image_token` of the official code, restated from the facts: keys [1, heads, N, d] (post-RoPE),
    states [1, N, D] (final-normed). Returns (kept image indices, sorted; the pivots as visited). `order` replaces
    the visiting order of the pivot set (to show that it matters)."""
    any_states = keys.permute(0, 2, 1, 3).reshape(1, keys.shape[2], -1)
    image_norms = torch.norm(any_states[0][start : start + length], p=1, dim=-1)
    text_norms = torch.norm(any_states[0][start + length :], p=1, dim=-1)
    image_indices = (image_norms.topk(pivot_image).indices + start).tolist()
    query_indices = (text_norms.topk(pivot_text).indices + start + length).tolist()
    indices_set = set(image_indices + query_indices)
    valid = set(range(start, start + length)) - set(image_indices)
    valid_list = list(valid)
    visited = list(indices_set) if order is None else order(indices_set)
    for item in visited:
        cos_sim = -torch.nn.functional.cosine_similarity(states[0][item, :], states[0][valid_list, :], dim=-1)
        real = [valid_list[i] for i in cos_sim.topk(topk).indices]
        indices_set.update(real)
        valid.difference_update(real)
        valid_list = list(valid)
    indices_set.difference_update(query_indices)
    return sorted(indices_set), visited


def dart_kept(keys, states, image_rows, cfg, pad=0, num_heads=None):
    """What the strategy keeps (sorted rows) for one sample: keys [1, kv_heads, N, d], states [1, N, D] (the final
    norm is the identity here), `image_rows` the visual rows; the first `pad` rows are left padding."""
    n = keys.shape[2]
    valid = torch.arange(n)[None] >= pad
    heads = num_heads or keys.shape[1]
    attention = ScoringAttention(lambda rows: None, keys, valid, num_heads=heads, scaling=1.0)
    rows = torch.as_tensor(image_rows)
    start, end = int(rows.min()), int(rows.max()) + 1
    ctx = dict(
        stage=0,
        layer_idx=1,
        hidden_states=states,
        image_token_indices=rows,
        original_index=torch.arange(n),
        valid=valid[0],
        final_norm=torch.nn.Identity(),
        vtr_ctx={},
    )
    scores = get_strategy("dart")().compute_scores(attention, (start, end), cfg, **ctx)
    chosen = get_strategy("dart")().select_tokens(scores, end - start, cfg)
    return sorted((chosen + start).tolist())


def random_prompt(seed, prefix, length, suffix, heads=2, head_dim=4, width=6):
    torch.manual_seed(seed)
    n = prefix + length + suffix
    return torch.randn(1, heads, n, head_dim), torch.randn(1, n, width)


# ----------------------------------------------------------------------------------------- the math


@pytest.mark.parametrize("budget", [8, 16, 40, 64])
def test_keeps_the_official_set_the_image_pivots_on_top(budget):
    keys, states = random_prompt(budget, prefix=35, length=96, suffix=11)
    want, _ = official(keys, states, 35, 96, math.ceil(budget // 8))
    got = dart_kept(keys, states, range(35, 131), VTRConfig(strategy="dart", keep_tokens=budget))
    assert got == want and len(got) == 4 + budget


def test_pivots_go_in_cpython_set_order_and_the_order_matters():
    assert list(set([400, 37, 610, 288, 620, 640, 615, 612])) == [288, 640, 610, 612, 37, 615, 620, 400]  # the facts
    keys, states = random_prompt(3, prefix=35, length=576, suffix=30, width=3)  # few dimensions: contested picks
    want, visited = official(keys, states, 35, 576, 24)
    ascending, _ = official(keys, states, 35, 576, 24, order=sorted)
    assert visited != sorted(visited) and ascending != want, "this case must depend on the visiting order"
    assert dart_kept(keys, states, range(35, 611), VTRConfig(strategy="dart", keep_tokens=192)) == want


def test_left_padding_does_not_change_the_visiting_order():
    """The set is built on the indices of the unpadded prompt, so a padded sample keeps what it keeps alone."""
    keys, states = random_prompt(3, prefix=35, length=576, suffix=30, width=3)
    pad = 7
    padded_keys = torch.cat([torch.randn(1, 2, pad, 4), keys], 2)
    padded_states = torch.cat([torch.randn(1, pad, 3), states], 1)
    cfg = VTRConfig(strategy="dart", keep_tokens=192)
    alone = dart_kept(keys, states, range(35, 611), cfg)
    padded = dart_kept(padded_keys, padded_states, range(35 + pad, 611 + pad), cfg, pad=pad)
    assert padded == [i + pad for i in alone]
    shifted, _ = official(padded_keys, padded_states, 35 + pad, 576, 24)
    assert shifted != padded, "the padded indices would visit the pivots in another order here"


def test_duplication_is_the_signed_cosine_and_ties_go_to_the_earlier_token():
    # image rows 0..5, text row 6: the one pivot (pivot_image_tokens=0), k = 1
    keys = torch.ones(1, 1, 7, 1)
    pivot = [1.0, 0.0]
    states = torch.tensor([pivot, pivot, pivot, pivot, [0.0, 1.0], [-1.0, 0.0], pivot])[None]
    cfg = VTRConfig(strategy="dart", keep_tokens=1, pivot_image_tokens=0, pivot_text_tokens=1)
    # the opposite token (cosine -1), not the orthogonal one (|cosine| 0 would be the least duplicated)
    assert dart_kept(keys, states, range(6), cfg) == [5] == official(keys, states, 0, 6, 1, 0, 1)[0]
    states[0, 4] = states[0, 5]  # two equally dissimilar tokens: the earlier one
    assert dart_kept(keys, states, range(6), cfg) == [4]


def test_a_pivot_takes_what_is_left_and_a_prompt_ending_with_the_image_has_no_text_pivots():
    keys, states = random_prompt(5, prefix=3, length=32, suffix=6)
    every = list(range(3, 35))
    # keep_ratio 1: k = int(32 / 8) = 4 per pivot, 32 picks from a pool of 28: the last pivots take what is left
    assert dart_kept(keys, states, every, VTRConfig(strategy="dart", keep_ratio=1.0)) == every
    # keep_tokens above the pool: LLaVA-1.6's cap, k = min(b, 32 - 4) // 8 = 3 -> 28
    assert len(dart_kept(keys, states, every, VTRConfig(strategy="dart", keep_tokens=500))) == 28
    # no text after the image: the 4 image pivots share the budget, k = 16 // 4
    cut_keys, cut_states = keys[:, :, :35], states[:, :35]
    got = dart_kept(cut_keys, cut_states, every, VTRConfig(strategy="dart", keep_tokens=16))
    assert got == official(cut_keys, cut_states, 3, 32, 4, pivot_text=0)[0] and len(got) == 20


@pytest.mark.parametrize(
    "n,cfg,kept",
    [
        (576, dict(keep_tokens=64), 68),
        (576, dict(keep_tokens=128), 132),
        (576, dict(keep_tokens=192), 196),
        (2000, dict(keep_tokens=320), 324),  # LLaVA-1.6's default
        (576, dict(keep_ratio=1 - 0.778), 4 + 8 * 15),  # the Qwen formula int(L (1 - r) / 8): 15.98 -> 15
        (576, dict(keep_tokens=64, pivot_image_tokens=2, pivot_text_tokens=2), 2 + 64),
    ],
)
def test_official_counts(n, cfg, kept):
    strategy = get_strategy("dart")()
    config = VTRConfig(strategy="dart", **cfg)
    pivots = config.pivot_image_tokens + config.pivot_text_tokens
    k = strategy.per_pivot(config, 0, n, config.pivot_image_tokens, pivots)
    assert config.pivot_image_tokens + pivots * k == kept


def test_a_score_threshold_is_refused():
    keys, states = random_prompt(0, prefix=2, length=10, suffix=5)
    with pytest.raises(ValueError, match="dart keeps a fixed number of tokens: give keep_tokens or keep_ratio"):
        dart_kept(keys, states, range(2, 12), VTRConfig(strategy="dart", score_threshold=0.5))


def test_defaults_prune_layer_2_original_positions_keep_the_earlier_cache(tiny_path):
    config = load_model(tiny_path, VTRConfig(strategy="dart")).vtr_config
    assert config.prune_layers == [2] and config.keep_tokens == 192
    assert tuple(config.conventions())[:3] == ("previous", "original", "keep")
    assert (config.pivot_image_tokens, config.pivot_text_tokens) == (4, 4)
    assert load_model(tiny_path, VTRConfig(strategy="dart", prune_layer=3)).vtr_config.prune_layers == [3]


# ----------------------------------------------------------------------------------------- the tiny models


def official_on_the_model(stock, inputs, budget_topk, layer=1):
    """The official picks from the stock model's own tensors: layer `layer`'s post-RoPE keys (repeated per query
    head, as LLaVA's SDPA path hands them over) and the final norm of its output."""
    with torch.no_grad():
        out = stock(**inputs, output_hidden_states=True, use_cache=True)
    keys = out.past_key_values.layers[layer].keys
    text_config = stock.config.text_config
    keys = keys.repeat_interleave(text_config.num_attention_heads // text_config.num_key_value_heads, dim=1)
    states = stock.model.language_model.norm(out.hidden_states[layer + 1])
    image = (inputs["input_ids"][0] == stock.config.image_token_id).nonzero().reshape(-1)
    start, length = int(image[0]), image.numel()
    assert torch.equal(image, torch.arange(start, start + length))
    return official(keys, states, start, length, budget_topk(length))[0]


@pytest.mark.parametrize("budget", [None, 16])
def test_llava_1_5_keeps_what_the_official_code_keeps(tiny_path, single_inputs, budget):
    given = {} if budget is None else dict(keep_tokens=budget)
    model = load_model(tiny_path, VTRConfig(strategy="dart", **given))
    with torch.no_grad():
        model(**single_inputs)
    (stage,) = model.vtr_last.stages
    b = budget or 192  # the backbone's default: more than the 64 tokens, so LLaVA-1.6's cap applies
    stock = LlavaForConditionalGeneration.from_pretrained(tiny_path, attn_implementation="eager").eval()
    want = official_on_the_model(stock, single_inputs, lambda n: min(b, n - 4) // 8)
    assert stage.layer == 2 and stage.image_tokens_before == [64]
    assert stage.kept_positions[0].tolist() == want and stage.image_tokens_kept == [4 + 8 * (min(b, 60) // 8)]


def test_llava_1_6_keeps_4_plus_8_int_min_320_over_8(next_path, square):
    model = load_model(next_path, VTRConfig(strategy="dart"))
    with torch.no_grad():
        model(**square)
    (stage,) = model.vtr_last.stages
    stock = LlavaNextForConditionalGeneration.from_pretrained(next_path, attn_implementation="eager").eval()
    want = official_on_the_model(stock, square, lambda n: int(min(320, n - 4) // 8))
    assert model.vtr_config.keep_tokens == 320 and stage.image_tokens_before == [88]
    assert stage.kept_positions[0].tolist() == want and len(want) == 4 + 8 * 10


def test_a_padded_batch_keeps_what_each_prompt_keeps_alone(tiny_path, batch_inputs):
    """At the positions generate() gives (the mask's cumulative sum), the same keys, the same set order."""
    model = load_model(tiny_path, VTRConfig(strategy="dart", keep_tokens=16))
    mask = batch_inputs["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        model(**batch_inputs, position_ids=positions)
    batched = model.vtr_last.stages[0].kept_positions
    pads = (mask == 0).sum(1).tolist()
    assert max(pads) > 0
    for b, pad in enumerate(pads):
        alone = {k: v[b : b + 1, pad:] if k != "pixel_values" else v[b : b + 1] for k, v in batch_inputs.items()}
        with torch.no_grad():
            model(**alone)
        assert (model.vtr_last.stages[0].kept_positions[0] + pad).tolist() == batched[b].tolist()
    model.generate(**batch_inputs, max_new_tokens=1, do_sample=False)
    assert [p.tolist() for p in model.vtr_last.stages[0].kept_positions] == [p.tolist() for p in batched]


def test_two_stages_equal_the_oracle_with_the_official_counts(backbone):
    """The contract's setting (prune_layer=[1, 3], keep_tokens=[14, 5]) keeps 4 + 8 x (14 // 8) = 12, then
    4 + 8 x (min(5, 12 - 4) // 8) = 4; prefill and greedy decode equal the masking oracle."""
    model = load_model(backbone.path, VTRConfig(strategy="dart", prune_layer=[1, 3], keep_tokens=[14, 5]))
    inputs, stock = backbone.batch, backbone.stock["eager"]
    with torch.no_grad():
        logits = model(**inputs).logits
    record = model.vtr_last
    assert [s.image_tokens_kept for s in record.stages] == [[12, 12], [4, 4]]
    prompt_len = inputs["input_ids"].shape[1]
    visual = torch.isin(inputs["input_ids"], torch.tensor(backbone.visual_token_id).reshape(-1))  # id or ids
    conventions = model.vtr_conventions()
    drops = stage_drops(record, 2, prompt_len, visual)
    expected = oracle_forward(stock, inputs, drops, prompt_len, backbone.embed, conventions=conventions)
    for b in range(2):
        rows = (record.kept_index[b] >= 0) & inputs["attention_mask"][b].bool()[record.kept_index[b].clamp_min(0)]
        torch.testing.assert_close(logits[b, rows], expected[b, record.kept_index[b, rows]], atol=1e-5, rtol=0)
    out = model.generate(
        **inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    drops = stage_drops(model.vtr_last, 2, prompt_len, visual)
    want_tokens, want_logits = oracle_greedy(stock, inputs, drops, 3, backbone.embed, conventions)
    assert torch.equal(out.sequences[:, prompt_len:], want_tokens)
    torch.testing.assert_close(torch.stack(out.logits, 1), want_logits, atol=1e-5, rtol=0)
