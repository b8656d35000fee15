"""The vision-side facts of the Video-LLaVA adapter (vision_features, vision_cls, vision_layer, vision_tower,
project), each against the stock model's own outputs, and the methods that read them run on images and videos."""

import pytest
import torch
from videollava_testlib import vtr_model

from videollava.vtr import PruningStrategy, get_strategy, register_strategy

SEEN = []


@register_strategy("test_vision_facts")
class VisionFacts(PruningStrategy):
    needs_attention = False
    needs_vision_attention = True
    requires = ("vision_features", "vision_cls", "vision_layer", "vision_tower", "project")

    def vision_layers(self, config, tower):
        return (0, -1)  # the tiny model's towers have 2 layers; layer 0 produces the projector's input (-2)

    def compute_scores(self, attention, image_token_range, config, **ctx):
        features = ctx["vision_features"]()
        SEEN.append(
            dict(
                indices=ctx["image_token_indices"],
                features=features,
                cls=ctx["vision_cls"](),
                layer=ctx["vision_layer"](),
                layers={i: ctx["vision_layer"](i) for i in (0, 1, -1)},
                depth=ctx["vision_tower"]["depth"],
                projected=ctx["project"](features),
            )
        )
        start, end = image_token_range
        return torch.zeros(end - start)


def _run(model, inputs):
    SEEN.clear()
    with torch.no_grad():
        model(**inputs)
    return list(SEEN)


def _stock_views(stock, modality, pixels, feature_layer=None):
    """Per view (an image, a frame), from the stock tower's own eager run and the stock feature call: the
    feature layer's states (the config's unless given), its CLS row on every row, the projector's output, and per tower layer the CLS
    row of the attention (mean over heads), the attention received (mean over heads and queries) and the
    keys (the layer's `k_proj` output, mean over heads). Every value is [views, rows the LLM gets, ...]."""
    model, config = stock.model, stock.config
    feature_layer = config.vision_feature_layer if feature_layer is None else feature_layer
    tower = model.image_tower if modality == "image" else model.video_tower
    layers = getattr(tower, "vision_model", tower).encoder.layers  # CLIPVisionModel, older or newer layout
    heads = config.vision_config.num_attention_heads
    keys = {}
    hooks = [
        layer.self_attn.k_proj.register_forward_hook(lambda m, args, out, i=i: keys.__setitem__(i, out))
        for i, layer in enumerate(layers)
    ]
    with torch.no_grad():
        try:
            out = tower(pixels.flatten(0, -4), output_hidden_states=True, output_attentions=True, return_dict=True)
        finally:
            for hook in hooks:
                hook.remove()
        if modality == "image":
            projected = model.get_image_features(pixel_values=pixels, vision_feature_layer=feature_layer)
        else:
            projected = model.get_video_features(pixel_values_videos=pixels, vision_feature_layer=feature_layer)
    features = out.hidden_states[feature_layer]
    views, length, _ = features.shape
    facts = {"features": features, "cls": features[:, :1].expand_as(features)}
    for i, attn in enumerate(out.attentions):
        facts[f"cls{i}"] = attn[:, :, 0].mean(1)
        facts[f"received{i}"] = attn.mean(1).mean(1)
        facts[f"keys{i}"] = keys[i].view(views, length, heads, -1).mean(2)
    rows = slice(1, None) if modality == "image" else slice(None)  # the image's CLS row is dropped
    facts = {name: value[:, rows] for name, value in facts.items()}
    facts["projected"] = projected.pooler_output
    return facts


def _expected(stock, inputs, feature_layer=None):
    """name -> per sample [visual tokens, ...]: the stock per-view values placed as the stock model places the
    features (every image's rows into the `<image>` placeholders, every frame's rows, CLS first, into the
    `<video>` placeholders, in batch order), read back at each sample's visual positions."""
    ids = inputs["input_ids"]
    tables = {}
    for modality, key, token in (
        ("image", "pixel_values", stock.config.image_token_id),
        ("video", "pixel_values_videos", stock.config.video_token_id),
    ):
        if inputs.get(key) is None:
            continue
        for name, value in _stock_views(stock, modality, inputs[key], feature_layer).items():
            value = value.reshape(-1, *value.shape[2:])
            table = tables.setdefault(name, value.new_zeros(*ids.shape, *value.shape[1:]))
            table[ids == token] = value
    visual = (ids == stock.config.image_token_id) | (ids == stock.config.video_token_id)
    return [{name: table[b][visual[b]] for name, table in tables.items()} for b in range(ids.shape[0])]


def _close(got, want):
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("feature_layer", [None, -1])
@pytest.mark.parametrize("prompts", ["image_batch", "video_batch", "mixed_batch"])
def test_each_vision_fact_is_the_stock_towers_own_value(request, tiny_path, stock_models, prompts, feature_layer):
    """With the config's feature layer (-2, the output of layer 0) and with -1 given to forward (layer 1's
    output: the strategy's layer 0 is then a layer of its own to keep)."""
    inputs = request.getfixturevalue(prompts)
    model = vtr_model(tiny_path, "eager", strategy="test_vision_facts", prune_layer=0, keep_tokens=14)
    seen = _run(model, inputs if feature_layer is None else {**inputs, "vision_feature_layer": feature_layer})
    expected = _expected(stock_models["eager"], inputs, feature_layer)
    projector_layer = 0 if feature_layer is None else 1
    assert len(seen) == len(expected) == 2
    for facts, want in zip(seen, expected):
        count = facts["indices"].numel()
        assert facts["features"].shape == (count, 32) and facts["layer"]["keys"].shape == (count, 16)
        assert facts["depth"] == 2
        _close(facts["features"], want["features"])
        _close(facts["cls"], want["cls"])
        _close(facts["projected"], want["projected"])  # project(vision_features()): the stock projector's output
        for i, layer in [(None, projector_layer), (0, 0), (1, 1), (-1, 1)]:  # None: the projector's input's
            got = facts["layer"] if i is None else facts["layers"][i]
            for name in ("cls", "received", "keys"):
                _close(got[name], want[f"{name}{layer}"])


def test_the_facts_line_up_with_the_beams_of_generate(tiny_path, mixed_batch):
    model = vtr_model(tiny_path, "sdpa", strategy="test_vision_facts", prune_layer=0, keep_tokens=14)
    direct = _run(model, mixed_batch)
    SEEN.clear()
    model.generate(**mixed_batch, max_new_tokens=2, do_sample=False, num_beams=2)
    assert len(SEEN) == 4, "each sample twice (two beams)"
    for b, facts in enumerate(SEEN):
        want = direct[b // 2]
        for name in ("features", "cls", "projected"):
            _close(facts[name], want[name])
        for name in ("cls", "received", "keys"):
            _close(facts["layers"][-1][name], want["layers"][-1][name])


def test_a_vision_layer_the_towers_lack_or_the_encoding_did_not_keep_is_refused(
    tiny_path, stock_models, video_single, monkeypatch
):
    model = vtr_model(tiny_path, "sdpa", strategy="test_vision_facts", prune_layer=0, keep_tokens=14)
    # features encoded by a plain stock call keep only the projector's input (state 1), not layer 0's input
    encoded = stock_models["eager"].model.get_video_features(pixel_values_videos=video_single["pixel_values_videos"])
    text = {k: v for k, v in video_single.items() if k != "pixel_values_videos"}
    with pytest.raises(ValueError, match=r"vision_layer\(0\) needs the vision tower's hidden states \(state 0\)"):
        _run(model, {**text, "mm_encoder_outputs": {"video": encoded}})
    monkeypatch.setattr(VisionFacts, "vision_layers", lambda self, config, tower: (5,))
    with pytest.raises(ValueError, match="vision layer 5 does not exist: the vision tower has 2 layers"):
        _run(model, video_single)


METHODS = ["visionzip", "hiprune", "fastervlm", "pool"]


@pytest.mark.parametrize("prompts", ["image_batch", "video_batch"])
@pytest.mark.parametrize("method", METHODS)
def test_the_vision_tower_methods_run_on_images_and_videos(
    request, tiny_path, stock_models, method, prompts, monkeypatch
):
    """keep_tokens=14 of an image's 16 patches or a video's 8 x 17 rows: forward and generate keep the same
    tokens, within the budget; VisionZip feeds each view's CLS features through the stock projector."""
    inputs = request.getfixturevalue(prompts)
    merged_calls = []  # VisionZip's merged tokens per sample
    merge = get_strategy("visionzip").merge_tokens

    def recording(self, dropped_hidden, dropped_scores, config, **ctx):
        out = merge(self, dropped_hidden, dropped_scores, config, **ctx)
        merged_calls.append(out[0])
        return out

    monkeypatch.setattr(get_strategy("visionzip"), "merge_tokens", recording)
    model = vtr_model(tiny_path, "sdpa", strategy=method, keep_tokens=14)
    with torch.no_grad():
        logits = model(**inputs).logits
    record = model.vtr_last
    (stage,) = record.stages
    assert stage.layer == 0 and torch.isfinite(logits).all()
    visual = (inputs["input_ids"] == model.config.image_token_id) | (inputs["input_ids"] == model.config.video_token_id)
    for b, positions in enumerate(stage.kept_positions):
        assert visual[b, positions].all()
    totals = [k + m for k, m in zip(stage.image_tokens_kept, stage.merged or [0, 0])]
    if method == "pool":  # 4 x 4 grids: one image's 14 become 3 x 4 cells; 8 frames' shares (2 or 1) fill them
        assert stage.image_tokens_kept == [0, 0] and totals == ([12, 12] if prompts == "image_batch" else [14, 14])
    else:
        assert totals == [14, 14]
    if method == "visionzip":  # each view's CLS token, projected, is among its merged tokens
        key, modality = ("pixel_values", "image") if prompts == "image_batch" else ("pixel_values_videos", "video")
        views = _stock_views(stock_models["eager"], modality, inputs[key])
        with torch.no_grad():
            cls = stock_models["eager"].model.multi_modal_projector(views["cls"][:, 0])  # [views, hidden]
        per_sample = cls.shape[0] // 2
        for b, merged in enumerate(merged_calls[:2]):
            for view in cls[b * per_sample : (b + 1) * per_sample]:
                assert (merged - view).abs().amax(-1).min() < 1e-5, "a view's CLS token is missing"
    first = [p.clone() for p in stage.kept_positions]
    model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert all(torch.equal(a, b) for a, b in zip(model.vtr_last.stages[0].kept_positions, first))
