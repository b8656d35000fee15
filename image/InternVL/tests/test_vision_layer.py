"""The vision-tower facts of the InternVL adapter (`vision_layer(i)`, `vision_tower`), each against the stock
tower's own eager outputs, and the methods that read them (HiPrune, VisionZip) run on images and videos."""

import pytest
import torch
from internvl_testlib import vtr_model

from internvl_vtr import PruningStrategy, get_strategy, register_strategy
from internvl_vtr.modeling import InternVLAdapter
from internvl_vtr.tiny import build_tiny_internvl

DEPTH = 4  # a deeper tower than conftest's (2 layers), so that a middle layer is neither kept nor the last
SEEN = []


@register_strategy("test_vision_layer")
class VisionLayer(PruningStrategy):
    needs_attention = False
    needs_vision_attention = True
    requires = ("vision_layer", "vision_tower")
    layers = (1,)  # a middle layer: the adapter keeps only its input besides the projector's layer's

    def vision_layers(self, config, tower):
        return self.layers

    def compute_scores(self, attention, image_token_range, config, **ctx):
        layer = ctx["vision_layer"]
        SEEN.append(
            dict(
                count=ctx["image_token_indices"].numel(),
                tower=ctx["vision_tower"],
                default=layer(),
                layers={i: layer(i) for i in (1, 3, -1, -3)},
            )
        )
        start, end = image_token_range
        return torch.zeros(end - start)


@pytest.fixture(scope="module")
def deep_path(tmp_path_factory):
    return str(build_tiny_internvl(tmp_path_factory.mktemp("tiny-internvl-deep"), vision_layers=DEPTH))


@pytest.fixture(scope="module")
def deep_stock(deep_path):
    from transformers import InternVLForConditionalGeneration

    return InternVLForConditionalGeneration.from_pretrained(deep_path, attn_implementation="eager").eval()


def _run(model, inputs):
    SEEN.clear()
    with torch.no_grad():
        model(**inputs)
    return list(SEEN)


def _pooled(per_patch: torch.Tensor) -> torch.Tensor:
    """[tiles, 64, ...] on each tile's 8 x 8 patch grid -> [tiles, 16, ...]: the mean over each 2 x 2 block (the
    patches one visual token stands for), tokens row-major on the 4 x 4 grid."""
    tiles, rest = per_patch.shape[0], per_patch.shape[2:]
    blocks = per_patch.reshape(tiles, 4, 2, 4, 2, *rest).mean((2, 4))
    return blocks.reshape(tiles, 16, *rest)


def _stock_layers(stock, pixel_values) -> dict:
    """layer -> {cls, received, keys} [tiles * 16, ...] in tile order, from the stock tower's own eager run:
    `output_attentions` (the CLS row, and the attention each patch receives, mean over heads and every query
    row of its tile) and the keys its attention uses (captured after `k_norm`), mean over heads."""
    tower = stock.model.vision_tower
    heads = stock.config.vision_config.num_attention_heads
    keys = {}
    hooks = [
        layer.attention.k_norm.register_forward_hook(lambda m, args, out, i=i: keys.__setitem__(i, out))
        for i, layer in enumerate(tower.encoder.layer)
    ]
    try:
        with torch.no_grad():
            attentions = tower(pixel_values, output_attentions=True).attentions
    finally:
        for hook in hooks:
            hook.remove()
    facts = {}
    for i, attn in enumerate(attentions):  # [tiles, heads, 65, 65]
        tiles, length = attn.shape[0], attn.shape[-1]
        per_head_keys = keys[i].reshape(tiles, length, heads, -1)
        facts[i] = {
            "cls": _pooled(attn[:, :, 0, 1:].mean(1)),
            "received": _pooled(attn.mean(1).mean(1)[:, 1:]),
            "keys": _pooled(per_head_keys.mean(2)[:, 1:]),
        }
        facts[i] = {name: value.reshape(tiles * 16, *value.shape[2:]) for name, value in facts[i].items()}
    return facts


def _close(got, want):
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("prompts,tiles", [("batch_inputs", [5, 3]), ("video_inputs", [3, 3])])
def test_each_vision_layer_fact_is_the_stock_towers_own_value(request, deep_path, deep_stock, prompts, tiles):
    """A batch of two different images (5 and 3 tiles) and of two videos (3 frames each): per visual token in
    prompt order, every layer the strategy reads (the middle layer 1 it names, the projector's layer 3 as None,
    -1 and 3, and -3 = 1) equals the stock tower's own attention and keys, pooled over the merged patches."""
    inputs = request.getfixturevalue(prompts)
    seen = _run(vtr_model(deep_path, "sdpa", strategy="test_vision_layer", prune_layer=0, keep_tokens=14), inputs)
    expected = _stock_layers(deep_stock, inputs["pixel_values"])
    assert len(seen) == 2
    first = 0
    for facts, n in zip(seen, tiles):
        rows = slice(first, first + n * 16)
        assert facts["count"] == n * 16
        assert facts["tower"] == {"depth": DEPTH, "cls": True}
        assert facts["default"]["keys"].shape == (n * 16, 16)  # 32 wide, 2 heads
        for got, layer in [(facts["default"], 3), *((facts["layers"][i], i % DEPTH) for i in (1, 3, -1, -3))]:
            for name in ("cls", "received", "keys"):
                assert got[name].dtype == torch.float32
                _close(got[name], expected[layer][name][rows])
        first += n * 16


def test_the_facts_line_up_with_the_beams_of_generate(deep_path, batch_inputs):
    model = vtr_model(deep_path, "sdpa", strategy="test_vision_layer", prune_layer=0, keep_tokens=14)
    direct = _run(model, batch_inputs)
    SEEN.clear()
    model.generate(**batch_inputs, max_new_tokens=2, do_sample=False, num_beams=2)
    assert len(SEEN) == 4, "each sample twice (two beams)"
    for b, facts in enumerate(SEEN):
        want = direct[b // 2]
        for got, expect in [(facts["default"], want["default"]), (facts["layers"][1], want["layers"][1])]:
            for name in ("cls", "received", "keys"):
                _close(got[name], expect[name])


def test_a_layer_the_tower_lacks_or_the_encoding_did_not_keep_is_refused(deep_path, batch_inputs, monkeypatch):
    model = vtr_model(deep_path, "sdpa", strategy="test_vision_layer", prune_layer=0, keep_tokens=14)
    monkeypatch.setattr(VisionLayer, "layers", (2,))  # layer 1 (read in compute_scores) is then not kept
    with pytest.raises(ValueError, match=r"^vision_layer\(1\) needs the vision tower's hidden states entering"):
        _run(model, batch_inputs)
    monkeypatch.setattr(VisionLayer, "layers", (DEPTH,))
    with pytest.raises(ValueError, match=f"^vision layer {DEPTH} does not exist: the vision tower has {DEPTH} layers$"):
        _run(model, batch_inputs)
    hiprune = vtr_model(deep_path, "sdpa", strategy="hiprune", hiprune_layer=-5, keep_tokens=14)
    with pytest.raises(ValueError, match=f"^vision layer -5 does not exist: the vision tower has {DEPTH} layers$"):
        _run(hiprune, batch_inputs)


def test_hiprune_reads_its_middle_layer_on_internvit(deep_path, deep_stock, batch_inputs):
    """The official anchor layer (the 9th of 24, here round(4 x 9/24) - 1 = layer 1) is kept when encoding and
    read: a tile's kept tokens are HiPrune's picks from the stock tower's received attention of layers 1 and 3."""
    from internvl_vtr.strategy.hiprune import hiprune_view

    model = vtr_model(deep_path, "sdpa", strategy="hiprune", keep_tokens=16)  # 16 of 80 / 48 tokens: 4 / 6 per tile
    assert get_strategy("hiprune")().vision_layers(model.vtr_config, model.vtr_adapter.vision_tower()) == (1,)
    with torch.no_grad():
        model(**batch_inputs)
    expected = _stock_layers(deep_stock, batch_inputs["pixel_values"])
    visual = batch_inputs["input_ids"] == model.config.image_token_id
    grid = torch.arange(16)
    first = 0
    for b, (tiles, share) in enumerate([(5, 16 // 5), (3, 16 // 3)]):
        keep = []
        for t in range(tiles):
            rows = slice(first + 16 * t, first + 16 * (t + 1))
            shallow, deep = expected[1]["received"][rows], expected[3]["received"][rows]
            keep.append(hiprune_view(shallow, deep, grid // 4, grid % 4, share + (t < 16 % tiles), 0.1))
        first += tiles * 16
        want = visual[b].nonzero().reshape(-1)[torch.cat(keep)]
        assert torch.equal(model.vtr_last.stages[0].kept_positions[b], want)


def test_visionzip_keeps_each_tiles_top_cls_attention(deep_path, deep_stock, batch_inputs):
    """VisionZip's dominant tokens of a tile are those the CLS query of the projector's layer attends to most in
    the stock tower (its share of the budget split over the tiles, less one contextual token)."""
    from internvl_vtr.strategy.grouping import split_budget

    model = vtr_model(deep_path, "sdpa", strategy="visionzip", keep_tokens=14)
    with torch.no_grad():
        model(**batch_inputs)
    cls = _stock_layers(deep_stock, batch_inputs["pixel_values"])[3]["cls"]
    visual = batch_inputs["input_ids"] == model.config.image_token_id
    first = 0
    for b, tiles in enumerate([5, 3]):
        keep = torch.zeros(tiles * 16, dtype=torch.bool)
        for t, share in enumerate(split_budget([16] * tiles, 14)):
            order = torch.sort(cls[first + 16 * t : first + 16 * (t + 1)], descending=True, stable=True).indices
            keep[16 * t + order[: share - max(1, share // 14)]] = True
        first += tiles * 16
        want = visual[b].nonzero().reshape(-1)[keep]
        assert torch.equal(model.vtr_last.stages[0].kept_positions[b], want)
    assert model.vtr_last.stages[0].merged == [5, 3], "one contextual token per tile"


@pytest.mark.parametrize("prompts", ["batch_inputs", "video_inputs"])
@pytest.mark.parametrize("method", ["hiprune", "visionzip"])
def test_the_vision_layer_methods_run_on_images_and_videos(request, deep_path, method, prompts):
    """keep_tokens=14 before the LLM: forward and generate keep the same visual tokens, the budget filled."""
    assert set(get_strategy(method).requires) <= set(InternVLAdapter.facts)
    inputs = request.getfixturevalue(prompts)
    model = vtr_model(deep_path, "sdpa", strategy=method, keep_tokens=14)
    with torch.no_grad():
        logits = model(**inputs).logits
    (stage,) = model.vtr_last.stages
    assert stage.layer == 0 and torch.isfinite(logits).all()
    visual = inputs["input_ids"] == model.config.image_token_id
    for b, positions in enumerate(stage.kept_positions):
        assert visual[b, positions].all()
    assert [k + m for k, m in zip(stage.image_tokens_kept, stage.merged or [0, 0])] == [14, 14]
    first = [p.clone() for p in stage.kept_positions]
    out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert all(torch.equal(a, b) for a, b in zip(model.vtr_last.stages[0].kept_positions, first))


def test_a_forwards_own_feature_layer_is_the_one_the_facts_read(tiny_path, stock_models, single_inputs):
    """forward(vision_feature_layer=-2) on a 2-layer tower whose config reads -1: the model runs as the stock one
    does with it (no missing hidden state), and `vision_layer()` is the layer that produced it (layer 0)."""
    stock = stock_models["eager"]
    assert stock.config.vision_feature_layer == -1 and stock.config.vision_config.num_hidden_layers == 2
    model = vtr_model(tiny_path, "eager", strategy="random", keep_ratio=1.0, prune_layer=0)
    with torch.no_grad():
        want = stock(**single_inputs, vision_feature_layer=-2).logits
        torch.testing.assert_close(model(**single_inputs, vision_feature_layer=-2).logits, want, atol=1e-5, rtol=0)
    seen = []

    @register_strategy("test_feature_layer")
    class FeatureLayer(PruningStrategy):
        needs_attention = False
        requires = ("vision_layer",)

        def compute_scores(self, attention, image_token_range, config, **ctx):
            seen.append((ctx["vision_layer"](), ctx["vision_layer"](0), ctx["vision_layer"](1)))
            return torch.zeros(image_token_range[1] - image_token_range[0])

    model = vtr_model(tiny_path, "eager", strategy="test_feature_layer", keep_ratio=1.0, prune_layer=0)
    with torch.no_grad():
        model(**single_inputs, vision_feature_layer=-2)
    default, first, second = seen[-1]
    assert torch.equal(default["received"], first["received"]) and not torch.equal(
        first["received"], second["received"]
    )
