"""The processor without torchvision: loaded from a saved checkpoint with one notice line; its video path
lays pixels out as the stock image processor does (frame pairs in the temporal slots), samples file frames
and writes the per-group timestamps the way the stock Qwen3-VL video processor does."""

import numpy as np
import pytest
import torch
from PIL import Image
from qwen3vl_testlib import chat

from visual_token_pruning import load_processor
from visual_token_pruning.video_io import VideoError, write_test_video


def test_load_processor_falls_back_with_one_line(tiny_path, capsys):
    processor = load_processor(tiny_path)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("visual_token_pruning:")]
    assert len(lines) == 1 and "torchvision" in lines[0] and "visual_token_pruning" not in out, "one line, on stderr"
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert processor.video_processor.patch_size == 4 and processor.image_processor.patch_size == 4
    assert processor.chat_template


def _frames(seed, size=32):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_video_pixels_match_the_image_processor_per_temporal_slot(processor):
    """A frame pair (sizes already on the 8 px grid: no resampling) gives the patches the PIL image processor
    gives each frame alone, frame 0 in temporal slot 0 and frame 1 in slot 1."""
    first, second = _frames(0), _frames(1)
    video = processor.video_processor(
        videos=[np.stack([first, second])], do_sample_frames=False, return_tensors="pt"
    )  # fmt: skip
    images = [processor.image_processor(images=f, return_tensors="pt") for f in (first, second)]
    assert video["video_grid_thw"].tolist() == [[1, 8, 8]] == [images[0]["image_grid_thw"].tolist()[0]]
    patches = video["pixel_values_videos"].view(64, 3, 2, 4, 4)
    for slot, image in enumerate(images):
        want = image["pixel_values"].view(64, 3, 2, 4, 4)[:, :, 0]
        torch.testing.assert_close(patches[:, :, slot], want, atol=1e-6, rtol=0)


def test_a_video_file_is_sampled_and_timestamped_like_the_stock_processor(processor, tmp_path):
    # 16 frames at 8 fps = 2 s; the stock sampler takes fps=2 -> 4 frames at linspace(0, 15, 4).round() =
    # 0, 5, 10, 15; one timestamp per frame pair: (0 + 5) / 2 / 8 = 0.3 s and (10 + 15) / 2 / 8 = 1.6 s.
    path = write_test_video(tmp_path / "clip.mp4", num_frames=16, size=(64, 48), fps=8)
    inputs = processor(videos=[str(path)], text=chat(processor, "What moves?", images=0, videos=1), return_tensors="pt")
    text = processor.tokenizer.decode(inputs["input_ids"][0])
    assert "<0.3 seconds>" in text and "<1.6 seconds>" in text and text.count(" seconds>") == 2
    t, h, w = inputs["video_grid_thw"][0].tolist()
    assert t == 2 and h * w * t == inputs["pixel_values_videos"].shape[0]
    assert text.count("<|video_pad|>") == t * h * w // 4


def test_a_missing_video_file_is_a_clear_error(processor, tmp_path):
    with pytest.raises(VideoError, match="nothere.mp4"):
        processor(videos=[str(tmp_path / "nothere.mp4")], text=chat(processor, images=0, videos=1))


def test_one_pixel_bound_keeps_the_checkpoints_other_bound(tiny_path):
    """max_pixels alone changes only the image's upper bound: the lower one and the video budget stay the
    checkpoint's (not the Qwen2-VL class defaults)."""
    base = load_processor(tiny_path)
    low, high = base.image_processor.size["shortest_edge"], base.image_processor.size["longest_edge"]
    video = dict(base.video_processor.size)
    only_max = load_processor(tiny_path, max_pixels=high // 2)
    assert dict(only_max.image_processor.size) == {"shortest_edge": low, "longest_edge": high // 2}
    assert dict(only_max.video_processor.size) == video
    only_min = load_processor(tiny_path, min_pixels=low * 2)
    assert dict(only_min.image_processor.size) == {"shortest_edge": low * 2, "longest_edge": high}
    big = Image.new("RGB", (512, 512))
    grid = only_max.image_processor(images=big, return_tensors="pt")["image_grid_thw"]
    patch = base.image_processor.patch_size
    assert (
        int(grid.prod()) * patch * patch
        <= high // 2
        < int(base.image_processor(images=big)["image_grid_thw"].prod()) * patch * patch
    )
    with pytest.raises(ValueError, match="min_pixels"):
        load_processor(tiny_path, min_pixels=high * 2)
