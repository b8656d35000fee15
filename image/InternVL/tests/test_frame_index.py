"""`frame_index` from the processor (`VTRInternVLProcessor`): which `<img>` blocks of a call are video frames, so the
video methods run on processor outputs as they come (the model's forward reads it: internvl_vtr.modeling)."""

import pytest
import torch
import torch.nn.functional as F
from internvl_testlib import clip, vtr_model

import internvl_vtr.processing as processing
from internvl_vtr import VTRConfig, load_model, load_processor
from internvl_vtr.tiny import demo_image


def turn(processor, *kinds, question="Why?"):
    """One user turn with the visuals in the given order ("image" / "video"), then the question."""
    content = [{"type": kind} for kind in kinds] + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def blocks_kept(model, inputs, b: int) -> list[int]:
    """Prompt row b's kept visual tokens per `<img>` block (an image: all its tiles; a frame: its tile)."""
    visual = inputs["input_ids"][b] == model.config.image_token_id
    block = (visual & ~F.pad(visual[:-1], (1, 0))).cumsum(0) - 1
    kept = torch.zeros_like(visual)
    kept[model.vtr_last.stages[0].kept_positions[b]] = True
    return torch.bincount(block[visual & kept], minlength=int(block.max()) + 1).tolist()


SQUARE, ONE_TILE = (64, 64), (32, 32)  # 2 x 2 tiles + thumbnail: one 5-tile block; one tile: a block like a frame's

CASES = {
    "one video": ([["video"]], [0, 1, 2]),
    "two video prompts": ([["video"], ["video"]], [0, 1, 2, 0, 1, 2]),
    "image then video": ([["image", "video"]], [-1, 0, 1, 2]),
    "mixed prompts": ([["video", "image"], ["image", "video", "video"]], [0, 1, 2, -1, -1, 0, 1, 2, 0, 1, 2]),
}


@pytest.mark.parametrize("case", CASES)
def test_frame_index_per_block_in_batch_and_prompt_order(processor, case):
    """Every `<img>` block of the call, in batch and prompt order: -1 for an image (one block of all its tiles,
    a one-tile image too), its frame's index for a video frame; a long tensor."""
    kinds, want = CASES[case]
    images = [demo_image(*(SQUARE, ONE_TILE)[i % 2]) for i in range(sum(k.count("image") for k in kinds))]
    videos = [clip(3)[::step].copy() for step in (1, -1, 1)][: sum(k.count("video") for k in kinds)]
    texts = [turn(processor, *k) for k in kinds]
    inputs = processor(images=images or None, videos=videos, text=texts, return_tensors="pt", padding=True)
    assert inputs["frame_index"].dtype == torch.long and inputs["frame_index"].tolist() == want
    assert int((inputs["input_ids"] == processor.start_image_token_id).sum()) == len(want)


def test_frame_index_is_a_list_without_return_tensors(processor):
    """As the other fields (the stock processor merges image and video pixels as tensors only: videos here)."""
    texts = [turn(processor, "video", "video"), turn(processor, "video")]
    inputs = processor(videos=[clip(2)] * 3, text=texts, padding=True)
    assert inputs["frame_index"] == [0, 1, 0, 1, 0, 1]


def test_no_frame_index_without_videos(processor):
    """Image-only calls return the stock fields: without a video, blocks of several tiles have no frame, and a stock
    model's generate() takes these outputs."""
    images = [demo_image(*SQUARE), demo_image(*ONE_TILE)]
    inputs = processor(images=images, text=turn(processor, "image", "image"), return_tensors="pt")
    assert sorted(inputs) == ["attention_mask", "input_ids", "pixel_values"]


def test_a_video_method_runs_on_processor_outputs(tiny_path, processor):
    """EVS (keep_ratio 0.5) on an image + video prompt and a video prompt, left-padded, straight from the processor:
    each video keeps its first frame whole and half its tokens (4 frames x 16 -> 32); the image (-1 blocks) is kept
    whole. Without the processor's frame_index the frames are unknown and the call is refused."""
    video = clip(4)
    texts = [turn(processor, "image", "video", question="Describe both in detail."), turn(processor, "video")]
    inputs = processor(
        images=[demo_image(*SQUARE)], videos=[video, video[::-1].copy()], text=texts, return_tensors="pt", padding=True
    )
    model = vtr_model(tiny_path, strategy="evs", keep_ratio=0.5)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert model.vtr_last.stages[0].image_tokens_before == [80 + 64, 64]
    assert model.vtr_last.stages[0].image_tokens_kept == [80 + 32, 32]
    image_then_video, video_only = blocks_kept(model, inputs, 0), blocks_kept(model, inputs, 1)
    assert image_then_video[:2] == [80, 16] and sum(image_then_video[1:]) == 32
    assert video_only[0] == 16 and sum(video_only) == 32
    unmarked = {key: value for key, value in inputs.items() if key != "frame_index"}
    with pytest.raises(ValueError, match="pass frame_index"), torch.no_grad():
        model.generate(**unmarked, max_new_tokens=1, do_sample=False)


def test_the_stock_model_ignores_frame_index_and_our_stock_path_never_gets_it(tiny_path, stock_models, video_inputs):
    """The stock forward ignores the field; the stock generate() refuses it (the processor's docstring says drop it
    there); the VTR model with VTR off runs the stock path without it and generates what the stock model does."""
    stock = stock_models["eager"]
    unmarked = {key: value for key, value in video_inputs.items() if key != "frame_index"}
    with torch.no_grad():
        torch.testing.assert_close(stock(**video_inputs).logits, stock(**unmarked).logits, atol=0, rtol=0)
        with pytest.raises(ValueError, match="frame_index"):
            stock.generate(**video_inputs, max_new_tokens=1)
        want = stock.generate(**unmarked, max_new_tokens=3, do_sample=False)
        off = load_model(tiny_path, VTRConfig(enabled=False), attn_implementation="eager")
        assert torch.equal(off.generate(**video_inputs, max_new_tokens=3, do_sample=False), want)


def test_where_torchvision_imports_the_stock_subprocessors_load_into_the_vtr_processor(tiny_path, monkeypatch):
    """The stock path loads `VTRInternVLProcessor` (the stock processor, plus frame_index) with the caller's keys;
    num_frames makes its video processor sample frames."""
    from types import SimpleNamespace

    calls, loaded = [], SimpleNamespace(video_processor=SimpleNamespace(num_frames=None, do_sample_frames=False))
    monkeypatch.setattr(processing, "torchvision_imports", lambda: True)
    monkeypatch.setattr(
        processing.VTRInternVLProcessor, "from_pretrained", lambda *a, **k: calls.append((a, k)) or loaded
    )
    assert load_processor(tiny_path, max_patches=6, num_frames=5) is loaded
    assert calls == [((tiny_path,), {"max_patches": 6})]
    assert (loaded.video_processor.num_frames, loaded.video_processor.do_sample_frames) == (5, True)
    assert issubclass(processing.InternVLProcessorPil, processing.VTRInternVLProcessor)
