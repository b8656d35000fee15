"""The vision-side baselines (FasterVLM, VisionZip, HiPrune) and the pool baseline against independent
re-computations: their rules on hand-built inputs, and on the tiny LLaVA the kept set (and merged tokens) rebuilt
from the stock model's own vision-tower outputs (`output_attentions` / `output_hidden_states`), the pruned prefill
then equal to the stock language model run on that literal shortened prompt."""

import pytest
import torch

from llava.vtr import VTRConfig, load_model
from llava.vtr.strategy.hiprune import hiprune_view
from llava.vtr.strategy.pool import pool_cells, pooled_shape
from llava.vtr.strategy.visionzip import VisionZip, merge_contextual

# ------------------------------------------------------------------ the rules on hand-built inputs


def test_pool_cuts_each_grid_into_the_finest_cells_that_fit_the_budget():
    assert pooled_shape(24, 24, 64) == (8, 8)
    assert pooled_shape(24, 24, 144) == (12, 12)
    assert pooled_shape(24, 24, 192) == (12, 16)  # 192 cells exactly; 12 x 16 beats 16 x 12 (fewer rows)
    assert pooled_shape(24, 24, 128) == (8, 16)  # 11 x 11 = 121 would waste 7 tokens
    assert pooled_shape(2, 6, 3) == (1, 3)  # the aspect closest to 1:3
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    grid = torch.stack([torch.zeros(16, dtype=torch.long), rows.reshape(-1), cols.reshape(-1)], 1)
    cell, centre = pool_cells(grid, 4)
    # 2 x 2 cells of 2 x 2 tokens, raster order; the centre of an even cell is its top-left token (first of the ties)
    assert cell.tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]
    assert centre.tolist() == [0, 2, 8, 10]
    two = torch.cat([grid, torch.tensor([[-1, -1, -1]]), grid + torch.tensor([1, 0, 0])])
    cell, centre = pool_cells(two, 5)  # shares 3 and 2 (the tied remainder to the first); the newline pooled away
    assert cell[16] == -1 and centre.numel() == 3 + 2  # cuts 1 x 3 and 1 x 2 (ties: fewer rows)
    # columns [floor(j 4 / 3), floor((j + 1) 4 / 3)): [0], [1], [2, 3]; and [0, 1], [2, 3]
    assert cell[:16].reshape(4, 4)[0].tolist() == [0, 1, 2, 2] and cell[17:].reshape(4, 4)[3].tolist() == [3, 3, 4, 4]
    row = torch.stack([torch.zeros(24, dtype=torch.long), torch.zeros(24, dtype=torch.long), torch.arange(24)], 1)
    cell, centre = pool_cells(row, 10)  # 1 x 24 in 10 cells: [0, 1], [2, 3], [4, 5, 6], ... (floor(24 j / 10))
    assert cell[:7].tolist() == [0, 0, 1, 1, 2, 2, 2] and centre[:3].tolist() == [0, 2, 5]


def test_visionzip_contextual_tokens_are_their_target_plus_the_mean_of_the_tokens_that_joined_it():
    features = torch.arange(10.0).reshape(5, 2)
    # keys: tokens 1, 2 point like target 0; token 4 like target 3 (targets at 0 and 5 // 2 = 2? no: step 2 -> 0, 2)
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.9, 0.1], [0.1, 1.0]])
    merged, targets, _ = merge_contextual(features, keys, 2)
    assert targets.tolist() == [0, 2]  # step = 5 // 2 = 2: entries 0 and 2
    # 1 and 3 join target 0, 4 joins target 2
    assert torch.equal(merged[0], features[0] + (features[1] + features[3]) / 2)
    assert torch.equal(merged[1], features[2] + features[4])
    merged, targets, _ = merge_contextual(features, keys, 1)
    assert targets.tolist() == [0] and torch.equal(merged[0], features[0] + features[1:].mean(0))
    ties = torch.ones(4, 2)  # every key alike: the first target takes everyone
    merged, targets, _ = merge_contextual(torch.eye(4), ties, 2)
    assert torch.equal(
        merged, torch.stack([torch.eye(4)[0] + (torch.eye(4)[1] + torch.eye(4)[3]) / 2, torch.eye(4)[2]])
    )


def test_hiprune_keeps_anchors_their_flat_neighbours_then_registers():
    row, col = (t.reshape(-1) for t in torch.meshgrid(torch.arange(4), torch.arange(6), indexing="ij"))
    shallow = torch.zeros(24)
    shallow[6] = 1.0  # the anchor: row 1, col 0
    deep = torch.linspace(1, 0, 24)  # registers prefer early tokens
    keep = hiprune_view(shallow, deep, row, col, budget=10, alpha=0.5)  # round(10 * 0.5 / 5) = 1 anchor
    # anchor 6 and its flat neighbours 5 (row 0's last token: the official code does not check rows), 7, 0, 12;
    # then the 5 best remaining registers: 1, 2, 3, 4, 8
    assert keep.nonzero().reshape(-1).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 12]
    shallow[:] = 0
    shallow[23] = 1.0  # a corner anchor: p + 1 and p + 6 clamp onto the last token itself
    keep = hiprune_view(shallow, deep, row, col, budget=5, alpha=1.0)
    assert keep.nonzero().reshape(-1).tolist() == [0, 1, 17, 22, 23]
    # Python's round: 25 x 0.1 / 5 = 0.5 -> 0 anchors, registers only
    keep = hiprune_view(shallow, deep, row, col, budget=2, alpha=1.25)
    assert keep.nonzero().reshape(-1).tolist() == [0, 1]


# ------------------------------------------------------------------ end to end on the tiny LLaVA


@pytest.fixture(scope="module")
def tower(stock_models, single_inputs):
    """The stock vision tower's own outputs on the single prompt's image (eager: attention probabilities)."""
    stock = stock_models["eager"]
    with torch.no_grad():
        out = stock.model.vision_tower(single_inputs["pixel_values"], output_hidden_states=True, output_attentions=True)
    return out


def literal_logits(stock, inputs, visual_embeds):
    """The stock language model on the prompt whose image placeholders are replaced by `visual_embeds` [n, hidden]
    (contiguous positions: the image shortened before the LLM)."""
    ids = inputs["input_ids"][0]
    image = (ids == stock.config.image_token_id).nonzero().reshape(-1)
    embed = stock.get_input_embeddings()
    with torch.no_grad():
        seq = torch.cat([embed(ids[: image[0]]), visual_embeds, embed(ids[image[-1] + 1 :])])[None]
        return stock(inputs_embeds=seq).logits[0], int(image[0]), visual_embeds.shape[0]


def pruned(path, inputs, **cfg):
    model = load_model(path, VTRConfig(**cfg), attn_implementation="eager")
    with torch.no_grad():
        return model(**inputs).logits[0], model


def test_fastervlm_keeps_the_top_cls_attention_of_the_projectors_layer(tiny_path, stock_models, single_inputs, tower):
    stock = stock_models["eager"]
    cls = tower.attentions[stock.config.vision_feature_layer][0, :, 0, 1:].mean(0)  # layer -2, CLS row, patches
    kept = torch.topk(cls, 20).indices.sort().values
    logits, model = pruned(tiny_path, single_inputs, strategy="fastervlm", keep_tokens=20)
    image = (single_inputs["input_ids"][0] == stock.config.image_token_id).nonzero().reshape(-1)
    assert model.vtr_last.stages[0].layer == 0
    assert torch.equal(model.vtr_last.stages[0].kept_positions[0], image[kept])
    with torch.no_grad():
        features = stock.model.get_image_features(pixel_values=single_inputs["pixel_values"]).pooler_output[0]
    want, _, _ = literal_logits(stock, single_inputs, features[kept])
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("budget,contextual", [(20, 3), (12, None)])
def test_visionzip_is_the_official_dominant_and_contextual_tokens(
    tiny_path, stock_models, single_inputs, tower, budget, contextual
):
    stock = stock_models["eager"]
    layer_idx = stock.config.vision_feature_layer  # -2: the layer LLaVA reads
    tower_model = stock.model.vision_tower
    layer = getattr(tower_model, "vision_model", tower_model).encoder.layers[layer_idx]
    x = tower.hidden_states[layer_idx][0]  # that layer's output, CLS first
    heads = layer.self_attn.num_heads
    with torch.no_grad():
        keys = layer.self_attn.k_proj(layer.layer_norm1(tower.hidden_states[layer_idx - 1][0]))
    keys = keys.view(x.shape[0], heads, -1).mean(1)
    c = contextual if contextual is not None else round(budget * 10 / 64)
    d = budget - c
    score = tower.attentions[layer_idx][0, :, 0, 1:].sum(0)
    dominant = torch.topk(score, d - 1).indices.sort().values + 1  # patch rows of x (CLS is row 0)
    rest = torch.tensor([i for i in range(1, x.shape[0]) if i not in dominant.tolist()])
    step = max(1, rest.numel() // c)
    targets = torch.arange(0, rest.numel(), step)[:c]
    others = torch.tensor([i for i in range(rest.numel()) if i not in targets.tolist()])
    k = torch.nn.functional.normalize(keys[rest], dim=-1)
    join = (k[others] @ k[targets].T).argmax(1)
    ctx_tokens = []
    for t in range(c):
        members = rest[others[join == t]]
        extra = x[members].mean(0) if members.numel() else torch.zeros_like(x[0])
        ctx_tokens.append(x[rest[targets[t]]] + extra)
    sequence = torch.cat([x[:1], x[dominant], torch.stack(ctx_tokens)])  # [CLS, dominant, contextual]
    with torch.no_grad():
        visual = stock.model.multi_modal_projector(sequence)
    want, _, _ = literal_logits(stock, single_inputs, visual)
    logits, model = pruned(
        tiny_path, single_inputs, strategy="visionzip", keep_tokens=budget, contextual_tokens=contextual
    )
    stage = model.vtr_last.stages[0]
    assert stage.image_tokens_kept == [d - 1] and stage.merged == [c + 1]
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=0)


def test_hiprune_reads_received_attention_of_its_two_layers(tiny_path, stock_models, single_inputs, tower):
    stock = stock_models["eager"]
    shallow = tower.attentions[0][0].mean(0).mean(0)[1:]  # round(9 x 2 / 24) - 1 = layer 0 of the 2-layer tower
    deep = tower.attentions[stock.config.vision_feature_layer][0].mean(0).mean(0)[1:]
    budget, side = 20, 8
    anchors = torch.topk(shallow, round(budget * 0.5 / 5)).indices
    around = torch.cat([anchors, anchors - 1, anchors + 1, anchors - side, anchors + side]).clamp(0, 63).unique()
    rest = torch.tensor([i for i in range(64) if i not in around.tolist()])
    registers = rest[torch.topk(deep[rest], budget - around.numel()).indices]
    kept = torch.cat([around, registers]).sort().values
    _, model = pruned(tiny_path, single_inputs, strategy="hiprune", keep_tokens=budget, hiprune_alpha=0.5)
    image = (single_inputs["input_ids"][0] == stock.config.image_token_id).nonzero().reshape(-1)
    assert torch.equal(model.vtr_last.stages[0].kept_positions[0], image[kept])


def test_pool_merges_each_cell_into_its_mean_at_its_centre(tiny_path, stock_models, single_inputs):
    stock = stock_models["eager"]
    with torch.no_grad():
        features = stock.model.get_image_features(pixel_values=single_inputs["pixel_values"]).pooler_output[0]
    grid = features.view(8, 8, -1)
    cells = grid.view(4, 2, 4, 2, -1).mean((1, 3)).reshape(16, -1)  # 16 cells of 2 x 2: 4 x 4 fits 16
    logits, model = pruned(tiny_path, single_inputs, strategy="pool", keep_tokens=16, positions="compact")
    assert model.vtr_last.stages[0].merged == [16] and model.vtr_last.stages[0].image_tokens_kept == [0]
    want, _, _ = literal_logits(stock, single_inputs, cells)
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["fastervlm", "hiprune", "visionzip", "pool"])
def test_a_batch_gives_each_sample_what_it_gets_alone(tiny_path, batch_inputs, method):
    model = load_model(tiny_path, VTRConfig(strategy=method, keep_tokens=12), attn_implementation="eager")
    with torch.no_grad():
        model(**batch_inputs)
    together = [p.tolist() for p in model.vtr_last.stages[0].kept_positions]
    merged = model.vtr_last.stages[0].merged
    for b in range(2):
        alone = {k: v[b : b + 1] for k, v in batch_inputs.items()}
        pad = int((~alone["attention_mask"][0].bool()).sum())
        alone = {k: (v[:, pad:] if v.ndim == 2 and k != "pixel_values" else v) for k, v in alone.items()}
        with torch.no_grad():
            model(**alone)
        assert [p + pad for p in model.vtr_last.stages[0].kept_positions[0].tolist()] == together[b]
        if merged:
            assert model.vtr_last.stages[0].merged == [merged[b]]


@pytest.mark.parametrize("method", ["fastervlm", "hiprune", "visionzip", "pool"])
def test_a_score_threshold_is_refused_with_the_reason(tiny_path, single_inputs, method):
    model = load_model(tiny_path, VTRConfig(strategy=method, score_threshold=0.1))
    with pytest.raises(ValueError, match="keeps a fixed number of tokens"):
        model(**single_inputs)


@pytest.mark.parametrize("method", ["fastervlm", "hiprune", "visionzip"])
@pytest.mark.parametrize("backbone", ["llava-1.5", "llava-1.6"])
def test_beam_search_copies_read_their_own_samples_vision_facts(
    backbone, method, tiny_path, batch_inputs, next_path, two_shapes
):
    """generate() repeats each sample per beam; each copy keeps (and merges) what its sample does in a forward."""
    path, inputs = (tiny_path, batch_inputs) if backbone == "llava-1.5" else (next_path, two_shapes)
    model = load_model(path, VTRConfig(strategy=method, keep_tokens=12))
    with torch.no_grad():
        model(**inputs)
    stage = model.vtr_last.stages[0]
    single, merged = [p.tolist() for p in stage.kept_positions], stage.merged
    assert single[0] != single[1], "the two samples keep different tokens"
    out = model.generate(**inputs, max_new_tokens=2, num_beams=2, num_return_sequences=2, do_sample=False)
    stage = model.vtr_last.stages[0]
    assert out.shape[0] == 4 and [p.tolist() for p in stage.kept_positions] == [single[i // 2] for i in range(4)]
    assert stage.merged == [merged[i // 2] for i in range(4)] if merged else not stage.merged


def test_a_forwards_own_feature_layer_is_the_one_the_facts_read(tiny_path, stock_models, single_inputs, monkeypatch):
    """forward(vision_feature_layer=-1) (not the config's -2): the model runs as the stock one does with it, and
    the vision facts (here FasterVLM's CLS attention) come from that layer."""
    stock = stock_models["eager"]
    model = load_model(
        tiny_path, VTRConfig(strategy="random", keep_ratio=1.0, prune_layer=0), attn_implementation="eager"
    )
    with torch.no_grad():
        want = stock(**single_inputs, vision_feature_layer=-1).logits
        torch.testing.assert_close(model(**single_inputs, vision_feature_layer=-1).logits, want, atol=1e-5, rtol=0)
        tower = stock.model.vision_tower(single_inputs["pixel_values"], output_attentions=True)
    cls = tower.attentions[-1][0, :, 0, 1:].mean(0)
    model.set_vtr_config(VTRConfig(strategy="fastervlm", keep_tokens=20))
    with torch.no_grad():
        model(**single_inputs, vision_feature_layer=-1)
    image = (single_inputs["input_ids"][0] == stock.config.image_token_id).nonzero().reshape(-1)
    assert torch.equal(model.vtr_last.stages[0].kept_positions[0], image[torch.topk(cls, 20).indices.sort().values])


@pytest.fixture(scope="module")
def deep_tower(tmp_path_factory):
    """A tiny LLaVA with a 4-layer vision tower: HiPrune's default anchor layer (round(9 x 4 / 24) - 1 = 1) is
    then neither the projector's layer (2) nor its input."""
    from transformers import LlavaForConditionalGeneration

    from llava.vtr.tiny import build_tiny_llava

    path = str(build_tiny_llava(tmp_path_factory.mktemp("deep-tower"), vision_layers=4))
    return path, LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()


def test_hiprune_takes_anchors_from_its_middle_layer_and_registers_from_the_projectors(deep_tower, single_inputs):
    path, stock = deep_tower
    with torch.no_grad():
        tower = stock.model.vision_tower(single_inputs["pixel_values"], output_attentions=True)
    shallow = tower.attentions[1][0].mean(0).mean(0)[1:]  # the default anchor layer
    deep = tower.attentions[stock.config.vision_feature_layer][0].mean(0).mean(0)[1:]
    budget, side = 20, 8
    anchors = torch.topk(shallow, round(budget * 0.5 / 5)).indices  # 2 anchors
    around = torch.cat([anchors, anchors - 1, anchors + 1, anchors - side, anchors + side]).clamp(0, 63).unique()
    rest = torch.tensor([i for i in range(64) if i not in around.tolist()])
    kept = torch.cat([around, rest[torch.topk(deep[rest], budget - around.numel()).indices]]).sort().values
    assert not torch.equal(torch.topk(shallow, 2).indices.sort().values, torch.topk(deep, 2).indices.sort().values)
    _, model = pruned(path, single_inputs, strategy="hiprune", keep_tokens=budget, hiprune_alpha=0.5)
    image = (single_inputs["input_ids"][0] == stock.config.image_token_id).nonzero().reshape(-1)
    assert torch.equal(model.vtr_last.stages[0].kept_positions[0], image[kept])


def test_several_feature_layers_are_joined_as_the_stock_projector_reads_them(tmp_path, single_inputs):
    """vision_feature_layer=[-3, -2]: `vision_features` holds both layers side by side, so VisionZip's merged
    features go through the stock projector (as the patches do in the stock model)."""
    from transformers import LlavaForConditionalGeneration

    from llava.vtr.tiny import build_tiny_llava

    path = str(build_tiny_llava(tmp_path / "two-layers", vision_feature_layer=[-3, -2]))
    stock = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    seen = []
    merge = VisionZip.merge_tokens

    def recording(self, dropped_hidden, dropped_scores, config, **ctx):
        seen.append(ctx["vtr_ctx"])
        return merge(self, dropped_hidden, dropped_scores, config, **ctx)

    VisionZip.merge_tokens = recording
    try:
        _, model = pruned(path, single_inputs, strategy="visionzip", keep_tokens=12)
    finally:
        VisionZip.merge_tokens = merge
    with torch.no_grad():
        want = stock.model.get_image_features(pixel_values=single_inputs["pixel_values"]).pooler_output[0]
        got = seen[0]["project"](seen[0]["vision_features"]())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert model.vtr_last.stages[0].image_tokens_kept == [9] and model.vtr_last.stages[0].merged == [3]


def test_settings_a_vision_side_method_cannot_honour_are_refused_when_set(tiny_path, single_inputs):
    with pytest.raises(ValueError, match="visionzip works in the vision tower, before the LLM: prune_layer must be 0"):
        load_model(tiny_path, VTRConfig(strategy="visionzip", prune_layer=3, keep_tokens=8))
    with pytest.raises(ValueError, match=r"pool runs at one prune layer; got prune_layer=\[0, 2\]"):
        load_model(tiny_path, VTRConfig(strategy="pool", prune_layer=[0, 2], keep_tokens=[16, 8]))
    # VisionZip without merging (an ablation): the whole share on dominant patches, no CLS, no contextual tokens
    _, model = pruned(tiny_path, single_inputs, strategy="visionzip", keep_tokens=16, token_merge=False)
    assert model.vtr_last.stages[0].image_tokens_kept == [16] and not any(model.vtr_last.stages[0].merged)
