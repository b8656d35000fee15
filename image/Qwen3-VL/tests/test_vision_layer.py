"""The vision-tower facts of the Qwen-VL families: `vision_tower` ({depth, cls: False}) and `vision_layer(i)` (per
merged visual token in prompt order: the attention each patch receives in vision block i and its keys after the
vision RoPE, mean over heads and over the 2 x 2 merge; no CLS) against the stock tower's own eager attention, on
an image batch and an image + video batch, for Qwen3-VL, Qwen2.5-VL (window-ordered patches; a windowed block
and full-attention ones) and Qwen2-VL; the blocks a strategy names are kept when encoding, beams repeat each
sample's facts, clear errors; HiPrune and VisionZip end to end."""

import pytest
import torch
import transformers
from qwen3vl_testlib import chat, image_video_batch, visual_ids, vtr_model

from visual_token_pruning import PruningStrategy, load_processor, modeling, register_strategy
from visual_token_pruning.tiny import FAMILIES, demo_image

#: the blocks the capturing strategy names in `vision_layers`, and the indices it asks `vision_layer` for
NAMED, ASKED = [], []
SEEN = []


@register_strategy("test_vision_layer_facts")
class LayerCapture(PruningStrategy):
    needs_attention = False

    def vision_layers(self, config, tower):
        return tuple(NAMED)

    def compute_scores(self, attention, image_token_range, config, **ctx):
        layers = {i: ctx["vision_layer"](i) for i in ASKED}
        SEEN.append((ctx["vision_tower"], layers, ctx["vision_importance"](), ctx["image_token_indices"].numel()))
        start, end = image_token_range
        return torch.zeros(end - start)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, family_paths):
    """(model_type, tiny checkpoint, its processor): a 3-block vision tower (Qwen2.5-VL: blocks 0 and 2 full
    attention, block 1 windows of 2 x 2 merged tokens)."""
    path = family_paths(request.param)
    return request.param, path, load_processor(path)


def image_batch(processor):
    """Two left-padded prompts with different images (64 x 64 and 48 x 64: 64 and 48 visual tokens)."""
    texts = [chat(processor), chat(processor, "Describe the picture in detail. Is there a cat, a dog or a car?")]
    images = [demo_image(64), demo_image(64, height=48).transpose(0)]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


@pytest.fixture(autouse=True)
def _reset():
    NAMED[:], ASKED[:] = [], []
    SEEN.clear()
    yield


def run(path, inputs, named, asked, impl="eager", **cfg):
    NAMED[:], ASKED[:] = named, asked
    SEEN.clear()
    model = vtr_model(path, impl, strategy="test_vision_layer_facts", prune_layer=1, keep_tokens=4, **cfg)
    with torch.no_grad():
        model(**inputs)
    return model


def stock_facts(model, inputs, block):
    """Per sample, {received, keys} of vision block `block` per visual token in prompt order, from the stock tower
    run eagerly on the inputs: its attention weights (mean over heads and query rows of each attention span it
    runs: image, frame group or window) and the keys it attends with, averaged over each 2 x 2 merge, in the
    merger's output order, scattered into the placeholders of each modality as the stock model does."""
    visual = model.model.visual
    module = __import__(type(visual).__module__, fromlist=["eager_attention_forward"])
    target, stock_fn, calls = visual.blocks[block].attn, module.eager_attention_forward, []

    def recording(attn, query, key, *args, **kwargs):
        out, weights = stock_fn(attn, query, key, *args, **kwargs)
        if attn is target:  # one attention span: weights [1, heads, len, len], key [1, heads, len, head_dim]
            calls[-1].append((weights[0].float().mean(dim=(0, 1)), key[0].float().mean(0)))
        return out, weights

    config, ids = model.config, inputs["input_ids"]
    tables = {
        "received": torch.zeros(ids.shape, dtype=torch.float32),
        "keys": torch.zeros(*ids.shape, visual.blocks[block].attn.head_dim, dtype=torch.float32),
    }
    for fn, pixels, grid, token in (
        (model.model.get_image_features, "pixel_values", "image_grid_thw", config.image_token_id),
        (model.model.get_video_features, "pixel_values_videos", "video_grid_thw", config.video_token_id),
    ):
        if inputs.get(pixels) is None:
            continue
        calls.append([])
        with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
            patch.setattr(module, "eager_attention_forward", recording)
            fn(inputs[pixels], inputs[grid])
        received = torch.cat([r for r, _ in calls[-1]]).reshape(-1, 4).mean(-1)  # tower order, per merged token
        keys = torch.cat([k for _, k in calls[-1]])
        keys = keys.reshape(-1, 4, keys.shape[-1]).mean(1)
        if hasattr(visual, "window_size"):  # Qwen2.5-VL: the merger's output is put back in raster order
            from transformers.vision_utils import get_vision_window_index

            window_index, _ = get_vision_window_index(
                inputs[grid], spatial_merge_size=2, window_size=visual.window_size, patch_size=visual.patch_size
            )
            assert not torch.equal(window_index, torch.arange(window_index.numel())), "windows reorder the patches"
            received, keys = received[torch.argsort(window_index)], keys[torch.argsort(window_index)]
        mask = ids == token
        tables["received"][mask], tables["keys"][mask] = received, keys
    placeholders = torch.isin(ids, torch.tensor(visual_ids(config)))
    return [{name: table[b, placeholders[b]] for name, table in tables.items()} for b in range(ids.shape[0])]


@pytest.mark.parametrize("batch", ["images", "image_video"])
def test_vision_layer_is_the_stock_towers_attention_and_keys(family, batch, monkeypatch):
    """Every block (a middle one named by the strategy, by index and from the end, and the last block: None) on
    two samples with different visuals; the recompute in query chunks of 7 rows."""
    kind, path, processor = family
    inputs = image_batch(processor) if batch == "images" else image_video_batch(processor)
    monkeypatch.setattr(modeling, "QUERY_CHUNK", 7)
    model = run(path, inputs, named=[0, 1], asked=[None, 0, 1, -2, -1])
    assert model.vtr_adapter.vision_layers() == [0, 1, 2]
    assert len(SEEN) == 2
    for tower, layers, importance, count in SEEN:
        assert tower == {"depth": 3, "cls": False}
        assert set(layers) == {None, 0, 1, -2, -1}
        for got in layers.values():
            assert got["cls"] is None
            assert got["received"].shape == (count,) and got["keys"].shape == (count, 16)
            assert got["received"].dtype == got["keys"].dtype == torch.float32
        for name in ("received", "keys"):  # the same block, however it is named
            assert torch.equal(layers[None][name], layers[-1][name]) and torch.equal(layers[1][name], layers[-2][name])
        assert torch.equal(importance, layers[None]["received"])
    for block, asked in ((0, 0), (1, 1), (2, None)):
        expected = stock_facts(model, inputs, block)
        for b, (_, layers, _, _) in enumerate(SEEN):
            for name in ("received", "keys"):
                torch.testing.assert_close(layers[asked][name], expected[b][name], atol=1e-6, rtol=1e-5)
    if kind == "qwen2_5_vl":  # block 1 attends within windows, blocks 0 and 2 within the whole image or frame group
        assert model.model.visual.fullatt_block_indexes == [0, 2]


def test_the_blocks_a_strategy_names_are_kept_and_others_are_a_clear_error(family):
    """The inputs of the last block and of the strategy's `vision_layers` are kept when encoding, nothing more; a
    block it did not name cannot be recomputed (one line naming it), nor one the tower does not have."""
    _, path, processor = family
    inputs = image_batch(processor)
    model = run(path, inputs, named=[1], asked=[1])
    states = model.vtr_adapter.encode_inputs(inputs)["image"].hidden_states
    assert [i for i, h in enumerate(states) if h is not None] == [1, 2]
    assert model.vtr_adapter.vision_layers() == [1, 2]
    with pytest.raises(ValueError, match=r"^vision_layer\(0\) needs the input of vision block 0, which") as err:
        run(path, inputs, named=[1], asked=[0])
    assert "\n" not in str(err.value)
    for named, asked, layer in (([], [3], 3), ([], [-4], -4), ([5], [], 5), ([-4], [], -4)):
        with pytest.raises(ValueError, match=rf"^vision layer {layer} does not exist: the vision tower has 3 layers$"):
            run(path, inputs, named=named, asked=asked)
    model = run(path, inputs, named=[], asked=[])  # nothing named: the last block's input only (vision_importance)
    assert model.vtr_adapter.vision_layers() == [2]


def test_pre_encoded_features_without_the_blocks_input_are_named(family):
    kind, path, processor = family
    inputs = image_batch(processor)
    stock = getattr(transformers, FAMILIES[kind][0]).from_pretrained(path).eval()
    with torch.no_grad():
        encoded = {"image": stock.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])}
    encoded["image"].vtr_grid_thw = inputs["image_grid_thw"]
    pre_encoded = {k: v for k, v in inputs.items() if k != "pixel_values"}
    NAMED[:], ASKED[:] = [1], [1]
    model = vtr_model(path, "sdpa", strategy="test_vision_layer_facts", prune_layer=1, keep_tokens=4)
    with pytest.raises(ValueError, match=r"^vision_layer\(1\) needs the input of vision block 1, which these encoded"):
        with torch.no_grad():
            model(**pre_encoded, mm_encoder_outputs=encoded)


def test_beam_search_repeats_each_samples_vision_layer(family):
    """generate(num_beams=2) repeats each sample of a padded image + video batch; every beam row gets its
    sample's facts of a named middle block and the last block."""
    _, path, processor = family
    inputs = image_video_batch(processor)
    model = run(path, inputs, named=[1], asked=[1, None], impl="sdpa")
    single = [layers for _, layers, _, _ in SEEN]
    SEEN.clear()
    model.generate(**inputs, max_new_tokens=2, num_beams=2, do_sample=False)
    beams = [layers for _, layers, _, _ in SEEN]
    assert len(beams) == 4
    for row, layers in enumerate(beams):
        for i in (1, None):
            for name in ("received", "keys"):
                torch.testing.assert_close(layers[i][name], single[row // 2][i][name], atol=1e-6, rtol=0)
    assert not torch.equal(single[0][1]["received"][:10], single[1][1]["received"][:10]), "the samples differ"


@pytest.mark.parametrize("method", ["hiprune", "visionzip"])
def test_hiprune_and_visionzip_run_end_to_end(family, method):
    """On an image + video batch: a forward keeps the budget per sample (VisionZip: kept + merged), and generate
    keeps the same tokens. HiPrune's anchor block is the tower's middle one (1 of 3), kept when encoding."""
    _, path, processor = family
    inputs = image_video_batch(processor)
    model = vtr_model(path, "sdpa", strategy=method, keep_tokens=14)
    if method == "hiprune":
        assert model.vtr_adapter.vision_layers() == [1, 2]
    with torch.no_grad():
        model(**inputs)
    stage = model.vtr_last.stages[0]
    merged = stage.merged or [0] * len(stage.image_tokens_kept)  # (empty when nothing was merged)
    totals = [k + m for k, m in zip(stage.image_tokens_kept, merged)]
    if method == "hiprune":
        assert totals == [14, 14]
    else:  # VisionZip's dominant and contextual tokens: at most the budget
        assert all(0 < t <= 14 for t in totals), totals
    kept = [p.tolist() for p in stage.kept_positions]
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert [p.tolist() for p in model.vtr_last.stages[0].kept_positions] == kept
