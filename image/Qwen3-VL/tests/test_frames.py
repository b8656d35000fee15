"""The `frames` fact on the Qwen-VL families (Qwen3-VL dense and MoE, Qwen2.5-VL, Qwen2-VL): (video, frame) of
every visual token, a frame being one temporal group of `video_grid_thw` (two input frames), checked against the
layouts written out by hand on a padded batch of videos, on mixed image + video prompts, and on beam copies."""

import pytest
import torch
from qwen3vl_testlib import video_batch, vtr_model

from visual_token_pruning import PruningStrategy, load_processor, register_strategy

SEEN = {}
NO_FRAME = [[-1, -1]]


@register_strategy("test_frames")
class FramesCapture(PruningStrategy):
    """Keeps every token; records each sample's frames(), visual_grid() and visual token positions."""

    needs_attention = False
    requires = ("frames",)

    def compute_scores(self, attention, image_token_range, config, **ctx):
        SEEN[ctx["batch_index"]] = (ctx["frames"](), ctx["visual_grid"](), ctx["image_token_indices"])
        start, end = image_token_range
        return torch.zeros(end - start)


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen3_vl_moe", "qwen2_5_vl", "qwen2_vl"])
def family(request, family_paths, moe_path):
    """(model_type, tiny checkpoint, its processor)."""
    path = moe_path if request.param == "qwen3_vl_moe" else family_paths(request.param)
    return request.param, path, load_processor(path)


def video(index, frames, tokens):
    """The hand layout of one video: `frames` frames of `tokens` tokens each, all (index, frame)."""
    return [[index, f] for f in range(frames) for _ in range(tokens)]


def captured(path, inputs, **generate):
    """frames(), visual_grid() and positions per batch row of a keep-all prefill (generate() when given)."""
    SEEN.clear()
    model = vtr_model(path, "sdpa", strategy="test_frames", prune_layer=0, keep_ratio=1.0)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False, **generate) if generate else model(**inputs)
    return [SEEN[b] for b in sorted(SEEN)]


def test_frames_of_a_padded_video_batch_are_its_temporal_groups(family):
    """8 frames of 32 px: 4 frame groups of 4 x 4 tokens; 10 frames of 40 px: 5 groups of 5 x 5. Each frame's
    tokens are one visual_grid group in the same raster order as the video's other frames; Qwen3-VL's timestamp
    text sits between frame groups, the other families' groups follow one another."""
    kind, path, processor = family
    inputs = video_batch(processor)
    assert inputs["video_grid_thw"].tolist() == [[4, 8, 8], [5, 10, 10]]
    assert inputs["attention_mask"][0, 0] == 0, "left-padded"
    samples = captured(path, inputs)
    for (frames, grid, positions), want in zip(samples, (video(0, 4, 16), video(0, 5, 25))):
        assert frames.dtype == torch.long and frames.device == positions.device
        assert frames.tolist() == want
        starts = torch.ones(len(frames), dtype=torch.bool)
        starts[1:] = (frames[1:] != frames[:-1]).any(-1)
        assert torch.equal(starts[1:], grid[1:, 0] != grid[:-1, 0]), "a new frame is a new visual_grid group"
        per_frame = grid[:, 1:].reshape(frames[-1, 1] + 1, -1, 2)
        assert (per_frame == per_frame[:1]).all(), "the j-th token of every frame is at the same (row, col)"
        per_frame = positions.reshape(frames[-1, 1] + 1, -1)
        assert (per_frame.diff() == 1).all(), "a frame's tokens are contiguous"
        between = per_frame[1:, 0] - per_frame[:-1, -1] - 1  # text tokens between consecutive frames
        assert (between > 2).all() if kind.startswith("qwen3") else (between == 0).all(), between


def test_frames_of_mixed_image_and_video_prompts_number_videos_per_sample(family):
    """An image (6 x 6 tokens) then one video, and an image then two videos: image rows are (-1, -1) and the
    second prompt's videos are its 0 and 1 (2 and 3 in the batch)."""
    _, path, processor = family
    inputs = video_batch(processor, videos=(((8, 32),), ((8, 32), (10, 40))), images=(1, 1))
    assert inputs["image_grid_thw"].tolist() == [[1, 12, 12]] * 2
    first, second = captured(path, inputs)
    assert first[0].tolist() == NO_FRAME * 36 + video(0, 4, 16)
    assert second[0].tolist() == NO_FRAME * 36 + video(0, 4, 16) + video(1, 5, 25)


def test_each_beam_copy_reads_its_samples_frames(family):
    """generate(num_beams=2) repeats each sample of the mixed batch; every copy gets its own sample's layout."""
    _, path, processor = family
    inputs = video_batch(processor, videos=(((10, 40),), ((8, 32), (8, 32))), images=(1, 0))
    samples = captured(path, inputs, num_beams=2)
    first = NO_FRAME * 36 + video(0, 5, 25)
    second = video(0, 4, 16) + video(1, 4, 16)
    assert [frames.tolist() for frames, _, _ in samples] == [first, first, second, second]


def test_frames_without_the_video_grid_is_a_clear_error(family):
    """Pre-encoded videos that lost their grid (`vtr_grid_thw`) cannot give frames (a strategy calling it)."""
    _, path, processor = family
    inputs = video_batch(processor)
    model = vtr_model(path, "sdpa", strategy="test_frames", prune_layer=0, keep_ratio=1.0)
    encoded = model.vtr_adapter.encode_inputs(inputs)
    del encoded["video"].vtr_grid_thw
    bare = {k: v for k, v in inputs.items() if k != "pixel_values_videos"}
    with torch.no_grad(), pytest.raises(ValueError, match="frames needs the videos' video_grid_thw"):
        model(**bare, mm_encoder_outputs=encoded)
