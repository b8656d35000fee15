"""The Qwen-VL families' facts for strategies (grid groups, also under Qwen2.5-VL's absolute-time rows; vision
importance, also through Qwen2.5-VL's window-ordered tower), every method on video, beam search (Qwen3-VL,
Qwen2.5-VL, Qwen2-VL), and Qwen2.5-VL / Qwen2-VL's processors without torchvision, loading and wrapping. The shared contract (stock when nothing is pruned, the oracle when pruned) is
test_contract.py's, run on these families by conftest.py's `backbone` fixture."""

import json
import sys
import types
from pathlib import Path

import pytest
import torch
import transformers
from qwen3vl_testlib import chat, image_video_batch, rope_index, visual_ids, vtr_model

from visual_token_pruning import (
    PruningStrategy,
    VTRQwen2_5_VLForConditionalGeneration,
    VTRQwen2VLForConditionalGeneration,
    available_strategies,
    get_strategy,
    load_model,
    load_processor,
    modeling,
    register_strategy,
    wrap,
)
from visual_token_pruning.tiny import FAMILIES, demo_image, demo_video

FACTS = []
VTR_CLASS = {"qwen2_5_vl": VTRQwen2_5_VLForConditionalGeneration, "qwen2_vl": VTRQwen2VLForConditionalGeneration}


@register_strategy("test_qwen2_facts")
class FactCapture(PruningStrategy):
    needs_attention = False

    def compute_scores(self, attention, image_token_range, config, **ctx):
        FACTS.append((ctx["patch_grid"], ctx["visual_grid"](), ctx["vision_importance"]()))
        start, end = image_token_range
        return torch.zeros(end - start)


def _case(kind, family_paths):
    """(model_type, tiny checkpoint, its processor, one prompt with an image and an 8-frame video at 4 fps)."""
    path = family_paths(kind)
    processor = load_processor(path)
    inputs = processor(
        images=demo_image(48),
        videos=[demo_video(8, 32)],
        text=chat(processor, "What happens in the video?", images=1, videos=1),
        return_tensors="pt",
        video_metadata=[{"total_num_frames": 8, "fps": 4.0, "frames_indices": list(range(8))}],
    )
    return kind, path, processor, inputs


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen2_5_vl", "qwen2_vl"])
def family(request, family_paths):
    return _case(request.param, family_paths)


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl"])
def qwen2_family(request, family_paths):
    return _case(request.param, family_paths)


def _stock(kind, path, impl="eager"):
    return getattr(transformers, FAMILIES[kind][0]).from_pretrained(path, attn_implementation=impl).eval()


def test_visual_grid_has_one_group_per_image_and_frame_group(family):
    """Qwen2.5-VL's temporal row is absolute time: the frame groups of this 4 fps video sit 2 positions apart,
    so a group's rows and columns cannot be read off its temporal row (they would come out negative)."""
    kind, path, _, inputs = family
    FACTS.clear()
    model = vtr_model(path, "sdpa", strategy="test_qwen2_facts", prune_layer=1, keep_tokens=4)
    with torch.no_grad():
        model(**inputs)
    patch_grid, grid, _ = FACTS[0]
    image_t, image_h, image_w = inputs["image_grid_thw"][0].tolist()
    video_t, video_h, video_w = inputs["video_grid_thw"][0].tolist()
    groups = [(image_h // 2, image_w // 2)] * image_t + [(video_h // 2, video_w // 2)] * video_t
    expected = [[g, r, c] for g, (rows, cols) in enumerate(groups) for r in range(rows) for c in range(cols)]
    assert grid.tolist() == expected
    assert patch_grid == (image_h // 2, image_w // 2)
    positions = rope_index(model.model, inputs)
    video = inputs["input_ids"][0] == model.config.video_token_id
    steps = positions[0, 0, video].unique().diff().tolist()
    if kind != "qwen3_vl":  # (Qwen3-VL puts a timestamp before each frame group)
        assert steps == ([2] * (video_t - 1) if kind == "qwen2_5_vl" else [1] * (video_t - 1))


def test_vision_importance_is_the_last_vision_blocks_received_attention(family, monkeypatch):
    """Equals the eager attention weights the stock vision tower computes in its last block (mean over heads
    and query patches of each image / frame group, then over each 2 x 2 merge), in prompt order: Qwen2.5-VL's
    tower runs on window-ordered patches, which the merger's output order undoes."""
    kind, path, _, inputs = family
    module = __import__(type(_stock(kind, path).model.visual).__module__, fromlist=["eager_attention_forward"])
    FACTS.clear()
    model = vtr_model(path, "eager", strategy="test_qwen2_facts", prune_layer=1, keep_tokens=4)
    last = model.model.visual.blocks[-1].attn
    recorded, stock_fn = [], module.eager_attention_forward

    def recording(attn, *args, **kwargs):
        out, weights = stock_fn(attn, *args, **kwargs)
        if attn is last:
            recorded.append(weights[0].float().mean(dim=(0, 1)))  # [keys] of one image / frame group
        return out, weights

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    monkeypatch.setattr(modeling, "QUERY_CHUNK", 7)  # the recompute's query rows in chunks of 7
    with torch.no_grad():
        model(**inputs)
    expected = []
    for name, grid in (("image", inputs["image_grid_thw"]), ("video", inputs["video_grid_thw"])):
        per_patch = torch.cat(recorded[: int(grid[:, 0].sum())]) if name == "image" else torch.cat(recorded)
        recorded = recorded[int(grid[:, 0].sum()) :] if name == "image" else []
        merged = per_patch.reshape(-1, 4).mean(-1)  # in the tower's order
        if kind == "qwen2_5_vl":
            from transformers.vision_utils import get_vision_window_index

            visual = model.model.visual
            window_index, _ = get_vision_window_index(
                grid, spatial_merge_size=2, window_size=visual.window_size, patch_size=visual.patch_size, kwargs={}
            )
            assert not torch.equal(window_index, torch.arange(window_index.numel())), "windows reorder the patches"
            merged = merged[torch.argsort(window_index)]
        expected.append(merged)
    importance = FACTS[0][2]
    ids = torch.tensor(visual_ids(model.config))
    assert importance.shape == (int(torch.isin(inputs["input_ids"], ids).sum()),)
    torch.testing.assert_close(importance, torch.cat(expected), atol=1e-6, rtol=0)


def test_every_method_runs_on_a_video_prompt_with_generate(family):
    _, path, _, inputs = family
    for method in sorted(m for m in available_strategies() if not m.startswith(("test_", "contract_"))):
        strategy = get_strategy(method)
        stock = vtr_model(path, "sdpa")
        if strategy.missing_facts(stock.vtr_adapter):
            continue  # refused on this family ("not supported on"), tested in test_contract.py
        video = "frames" in strategy.requires  # a video method: its own schedule
        schedule = {} if video else dict(prune_layer=0 if not strategy.needs_attention else 2)
        model = vtr_model(path, "sdpa", strategy=method, keep_tokens=9, **schedule)
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        stage = model.vtr_last.stages[0]
        total = stage.image_tokens_kept[0] + (stage.merged[0] if strategy.merge_is_method else 0)
        if video:  # its own share of the video tokens (images kept)
            assert 0 < total < stage.image_tokens_before[0], method
        elif method == "dart":  # its 4 image pivots on top of 8 x (9 // 8) picks, as the official code keeps
            assert total == 12
        elif strategy.merge_is_method:  # pooled cells: at most the budget
            assert 0 < total <= 9, method
        else:
            assert total == 9, method


def test_beam_search_repeats_each_samples_facts(family):
    """generate(num_beams=2) repeats each sample of a padded image + video batch; vision importance
    (VisPruner) follows, so every copy keeps what the sample keeps in a plain forward."""
    _, path, processor, _ = family
    inputs = image_video_batch(processor)
    model = vtr_model(path, "sdpa", strategy="vispruner", prune_layer=2, keep_tokens=8)
    with torch.no_grad():
        model(**inputs)
    single = [p.tolist() for p in model.vtr_last.stages[0].kept_positions]
    model.generate(**inputs, max_new_tokens=2, num_beams=2, do_sample=False)
    beams = [p.tolist() for p in model.vtr_last.stages[0].kept_positions]
    assert beams == [single[0], single[0], single[1], single[1]]


def _torchvision_loads() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(_torchvision_loads(), reason="torchvision loads here: load_processor returns the stock processor")
def test_the_processor_is_the_stock_class_without_torchvision(qwen2_family, tmp_path):
    """The stock processor class of the family (Qwen2.5-VL's computes second_per_grid_ts = temporal patch /
    fps) around a torch-only video processor; what it saves names the stock classes, as a hub checkpoint
    does, and loads back."""
    kind, path, processor, inputs = qwen2_family
    stock_name = FAMILIES[kind][1]
    assert isinstance(processor, getattr(transformers, stock_name))
    assert type(processor.video_processor).__name__ == "Qwen2VLVideoProcessorNoTV"
    if kind == "qwen2_5_vl":
        assert inputs["second_per_grid_ts"].tolist() == [2 / 4.0]
    else:
        assert "second_per_grid_ts" not in inputs
    for folder in (Path(path), tmp_path):  # the tiny checkpoint, and the loaded processor saved again
        saved = json.loads((folder / "processor_config.json").read_text())
        assert saved["processor_class"] == stock_name
        assert saved["image_processor"]["image_processor_type"] == "Qwen2VLImageProcessor"
        assert saved["video_processor"]["video_processor_type"] == "Qwen2VLVideoProcessor"
        processor.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "config.json"):
        (tmp_path / name).write_bytes((Path(path) / name).read_bytes())
    assert type(load_processor(str(tmp_path))) is type(processor)
    assert "torchvision" not in sys.modules, "the import placeholder is gone again"


def test_the_torchvision_placeholder_leaves_sys_modules_as_it_was(monkeypatch):
    """Inside: importable placeholders; after (also after an error): exactly the entries of before, a
    partly loaded torchvision included."""
    from visual_token_pruning.notv import torchvision_placeholder

    partial = types.ModuleType("torchvision")
    monkeypatch.setitem(sys.modules, "torchvision", partial)
    monkeypatch.delitem(sys.modules, "torchvision.transforms", raising=False)
    before = dict(sys.modules)
    with pytest.raises(RuntimeError), torchvision_placeholder():
        import torchvision.transforms.v2.functional  # noqa: F401

        assert sys.modules["torchvision"] is not partial
        raise RuntimeError("an import failing inside")
    assert sys.modules["torchvision"] is partial and "torchvision.transforms" not in sys.modules
    assert {k: v for k, v in sys.modules.items() if k.startswith("torchvision")} == {
        k: v for k, v in before.items() if k.startswith("torchvision")
    }


def test_load_and_wrap_give_the_familys_class(qwen2_family):
    kind, path, _, inputs = qwen2_family
    assert type(load_model(path)) is VTR_CLASS[kind]
    stock = _stock(kind, path, "sdpa")
    with torch.no_grad():
        want = stock(**inputs).logits
    wrapped = wrap(stock)
    assert type(wrapped) is VTR_CLASS[kind]
    with torch.no_grad():
        torch.testing.assert_close(wrapped(**inputs).logits, want, atol=0, rtol=0)


def test_the_checkpoint_saved_by_the_vtr_class_loads_in_the_stock_class(qwen2_family, tmp_path):
    """Save and load keep the stock key layout (the stock class-name key mapping is registered for ours)."""
    kind, path, _, inputs = qwen2_family
    load_model(path).save_pretrained(tmp_path)
    reloaded = getattr(transformers, FAMILIES[kind][0]).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, _stock(kind, path, "sdpa")(**inputs).logits)


def test_frame_groups_that_share_a_temporal_row_are_still_told_apart(family_paths):
    """At 16 fps Qwen2.5-VL's frame groups are 0.5 positions apart in time, so pairs of them share a temporal
    row; each is still its own group (the raster order restarts)."""
    path = family_paths("qwen2_5_vl")
    processor = load_processor(path)
    inputs = processor(
        videos=[demo_video(8, 32)],
        text=chat(processor, "What happens?", images=0, videos=1),
        return_tensors="pt",
        video_metadata=[{"total_num_frames": 8, "fps": 16.0, "frames_indices": list(range(8))}],
    )
    FACTS.clear()
    model = vtr_model(path, "sdpa", strategy="test_qwen2_facts", prune_layer=1, keep_tokens=4)
    with torch.no_grad():
        model(**inputs)
    _, grid, _ = FACTS[0]
    video_t, video_h, video_w = inputs["video_grid_thw"][0].tolist()
    rows, cols = video_h // 2, video_w // 2
    assert grid.tolist() == [[g, r, c] for g in range(video_t) for r in range(rows) for c in range(cols)]
    positions = rope_index(model.model, inputs)
    video = inputs["input_ids"][0] == model.config.video_token_id
    temporal = positions[0, 0, video][:: rows * cols].tolist()  # each group's temporal row
    assert len(set(temporal)) < video_t, temporal


def test_pre_encoded_outputs_bring_their_grids(qwen2_family):
    """`mm_encoder_outputs` from encode_inputs, given without pixels or grids: the grids come from the outputs
    (the same logits); a prompt whose visual tokens have no grid anywhere is a clear error."""
    _, path, _, inputs = qwen2_family
    model = vtr_model(path, "sdpa", strategy="fastv", prune_layer=2, keep_tokens=8)
    bare = {k: v for k, v in inputs.items() if k not in ("pixel_values", "pixel_values_videos", "image_grid_thw")}
    bare.pop("video_grid_thw")
    with torch.no_grad():
        want = model(**inputs).logits
        got = model(**bare, mm_encoder_outputs=model.vtr_adapter.encode_inputs(inputs)).logits
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        encoded = model.vtr_adapter.encode_inputs(inputs)
        del encoded["image"].vtr_grid_thw
        with pytest.raises(ValueError, match="image tokens need image_grid_thw"):
            model(**bare, mm_encoder_outputs=encoded)


def test_methods_ported_to_qwen_keep_their_ports_positions(family):
    """VisionZip's and HiPrune's Qwen-VL ports gather the kept tokens' M-RoPE ids (original positions); CDPruner's
    (OpenVINO) renumbers the text after each image as `compact`; methods without a port keep their LLaVA
    convention; an explicit field or convention="common" still wins."""
    _, path, _, inputs = family
    for method, positions in (("visionzip", "original"), ("hiprune", "original"), ("cdpruner", "compact"),
                              ("divprune", "compact"), ("fastervlm", "compact")):  # fmt: skip
        model = vtr_model(path, "sdpa", strategy=method, keep_tokens=9)
        assert model.vtr_conventions().positions == positions, method
        assert model.vtr_config.conventions().positions == "compact", "LLaVA's, without the backbone"
    model = vtr_model(path, "sdpa", strategy="visionzip", keep_tokens=9, positions="compact")
    assert model.vtr_conventions().positions == "compact"
    model = vtr_model(path, "sdpa", strategy="visionzip", keep_tokens=9, convention="common")
    assert model.vtr_conventions().positions == "original"
    with torch.no_grad():
        model(**inputs)
    kept = model.vtr_last.kept_index[0]
    assert (kept[1:] > kept[:-1]).all(), "each contextual token in its target's place: prompt order"
