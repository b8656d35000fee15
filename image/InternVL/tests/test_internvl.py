"""What is InternVL's own: PriorTR's anchor (the newline after `</img>`), the per-tile facts strategies read,
the no-torchvision processor (images, tiles, video files), and clear errors."""

import pytest
import torch
from internvl_testlib import chat, clip, vtr_model

from internvl_vtr import PruningStrategy, VTRConfig, load_model, register_strategy, wrap
from internvl_vtr.processing import InternVLVideoProcessorPil, load_processor
from internvl_vtr.tiny import demo_image
from internvl_vtr.video_io import VideoError, load_video, write_test_video

CAPTURED = []


@register_strategy("test_internvl_anchor")
class AnchorCapture(PruningStrategy):
    def compute_scores(self, attention, image_token_range, config, **ctx):
        start, end = image_token_range
        anchor = ctx["anchor_index"]
        CAPTURED.append(
            dict(
                original=ctx["original_index"][anchor - 1 : anchor + 1].tolist(),
                prior=attention[:, :, anchor, start:end].clone(),
                last=attention[:, :, -1, start:end].clone(),
            )
        )
        return self._aggregate_attention(attention, image_token_range, config)


def _token(processor, text):
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1
    return ids[0]


def test_anchor_is_the_newline_after_the_last_img_close_and_question_free(tiny_path, processor, image):
    newline, close = _token(processor, "\n"), _token(processor, "</img>")
    runs = []
    for question in ("What is shown in the image?", "Is there a car? Answer yes or no."):
        inputs = processor(images=image, text=chat(processor, question), return_tensors="pt")
        CAPTURED.clear()
        with torch.no_grad():
            vtr_model(tiny_path, "eager", strategy="test_internvl_anchor", prune_layer=[1, 3], keep_tokens=[20, 5])(
                **inputs
            )
        ids = inputs["input_ids"][0]
        assert len(CAPTURED) == 2
        for stage in CAPTURED:  # both stages (the second on the shortened sequence) find the same two tokens
            before, anchor = stage["original"]
            assert (int(ids[before]), int(ids[anchor])) == (close, newline)
            assert (ids[anchor + 1 :] == processor.image_token_id).sum() == 0, "after the last visual token"
        runs.append(CAPTURED[0])
    torch.testing.assert_close(runs[0]["prior"], runs[1]["prior"], atol=1e-6, rtol=0)
    assert not torch.allclose(runs[0]["last"], runs[1]["last"], atol=1e-4), "the question rows differ"


def test_priortr_prior_comes_from_the_newline_row(tiny_path, stock_models, single_inputs, processor):
    """PriorTR's kept tokens = Top-K of P log(P/Q) computed here from the stock model's eager attentions, with
    Q = the attention of the newline after `</img>` (P: the last row; heads averaged)."""
    model = vtr_model(tiny_path, "eager", strategy="priortr", prune_layer=2, keep_tokens=10)
    with torch.no_grad():
        model(**single_inputs)
        attention = stock_models["eager"](**single_inputs, output_attentions=True).attentions[1][0]
    ids = single_inputs["input_ids"][0]
    visual = ids == processor.image_token_id
    row = int((ids == _token(processor, "</img>")).nonzero()[-1]) + 1
    assert int(ids[row]) == _token(processor, "\n")
    eps = VTRConfig().priortr_eps
    p, q = attention[:, -1, visual].mean(0), attention[:, row, visual].mean(0)
    p, q = p / p.sum(), q / q.sum()
    scores = p * (torch.log(p + eps) - torch.log(q + eps))
    want = visual.nonzero().reshape(-1)[torch.topk(scores, 10).indices].sort().values
    assert torch.equal(model.vtr_last.stages[0].kept_positions[0], want)


FACTS = []


@register_strategy("test_internvl_facts")
class FactsCapture(PruningStrategy):
    needs_attention = False
    needs_vision_attention = True

    def compute_scores(self, attention, image_token_range, config, **ctx):
        FACTS.append((ctx["patch_grid"], ctx["visual_grid"](), ctx["vision_importance"]()))
        return torch.zeros(image_token_range[1] - image_token_range[0])


def test_tile_grids_and_vision_importance(tiny_path, stock_models, batch_inputs):
    """One 4 x 4 grid per tile (group = tile), row-major; importance = the last vision layer's CLS attention
    (eager output_attentions of the stock tower, heads averaged) summed over each 2 x 2 patch block."""
    FACTS.clear()
    with torch.no_grad():
        vtr_model(tiny_path, strategy="test_internvl_facts", prune_layer=0, keep_tokens=8)(**batch_inputs)
        tower = stock_models["eager"].model.vision_tower
        cls = tower(batch_inputs["pixel_values"], output_attentions=True).attentions[-1][:, :, 0, 1:].mean(1)
    pooled = cls.reshape(-1, 4, 2, 4, 2).sum((2, 4)).reshape(-1, 16)  # [tiles, 16]: 8 x 8 patches -> 4 x 4
    tiles = [5, 3]  # 2 x 2 + thumbnail, 2 x 1 + thumbnail
    assert len(FACTS) == 2
    first = 0
    for (grid_size, grid, importance), n in zip(FACTS, tiles):
        assert grid_size == (4, 4)
        want = [[t, r, c] for t in range(n) for r in range(4) for c in range(4)]
        assert grid.tolist() == want
        torch.testing.assert_close(importance, pooled[first : first + n].reshape(-1), atol=1e-6, rtol=0)
        first += n


def test_vision_attention_methods_run_under_beam_search(tiny_path, batch_inputs):
    """generate() repeats each sample per beam; every copy reads its own sample's vision attention (5 and 3
    tiles), so it keeps what that sample keeps in a plain forward."""
    model = vtr_model(tiny_path, strategy="vispruner", prune_layer=0, keep_tokens=6)
    with torch.no_grad():
        model(**batch_inputs)
    single = [p.tolist() for p in model.vtr_last.stages[0].kept_positions]
    assert single[0] != single[1], "the two samples keep different tokens"
    out = model.generate(**batch_inputs, max_new_tokens=2, num_beams=2, num_return_sequences=2, do_sample=False)
    beams = [p.tolist() for p in model.vtr_last.stages[0].kept_positions]
    assert out.shape[0] == 4 and beams == [single[0], single[0], single[1], single[1]]


# ------------------------------------------------------------------------------------------ video frames

FRAMES = []


@register_strategy("test_internvl_frames")
class FramesCapture(PruningStrategy):
    needs_attention = False

    def compute_scores(self, attention, image_token_range, config, **ctx):
        FRAMES.append((ctx["batch_index"], ctx["frames"]()))
        return torch.zeros(image_token_range[1] - image_token_range[0])


def _frames(tiny_path, inputs, **generate) -> list[list]:
    """frames() of each prompt row (each beam copy under generate), as lists."""
    FRAMES.clear()
    model = vtr_model(tiny_path, strategy="test_internvl_frames", prune_layer=0, keep_tokens=8)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False, **generate) if generate else model(**inputs)
    assert all(f.dtype == torch.long for _, f in FRAMES)
    return [f.tolist() for _, f in sorted(FRAMES, key=lambda item: item[0])]


def image_rows(tiles: int) -> list:
    return [[-1, -1]] * (16 * tiles)


def video_rows(video: int, frames: int) -> list:
    return [[video, frame] for frame in range(frames) for _ in range(16)]


@pytest.fixture(scope="session")
def mixed_inputs(processor, image):
    """Two prompts, left-padded: an image (2 x 2 tiles + thumbnail) then a 4-frame video; a video, a one-tile
    image (a block like a frame's but for the `FrameN: ` before it) and another video."""

    def turn(kinds, question):
        content = [{"type": kind} for kind in kinds] + [{"type": "text", "text": question}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    texts = [turn(["image", "video"], "Describe both in detail."), turn(["video", "image", "video"], "Why?")]
    video = clip(4)
    inputs = processor(
        images=[image, demo_image(32, 32)], videos=[video, video[::-1].copy(), video[:, ::-1].copy()],
        text=texts, return_tensors="pt", padding=True,
    )  # fmt: skip
    inputs["frame_index"] = torch.tensor([-1, 0, 1, 2, 3] + [0, 1, 2, 3, -1, 0, 1, 2, 3])
    return inputs


MIXED = [image_rows(5) + video_rows(0, 4), video_rows(0, 4) + image_rows(1) + video_rows(1, 4)]


def test_frames_of_a_video_batch(tiny_path, video_batch):
    """Every block of a video prompt is one frame (one 16-token tile), numbered in time order; one video a prompt."""
    assert _frames(tiny_path, video_batch) == [video_rows(0, 4)] * 2


def test_frames_of_mixed_prompts_leave_images_out(tiny_path, mixed_inputs, processor):
    """Image tiles (a one-tile image too) are (-1, -1) and do not count as videos; a video after an image is the
    prompt's video 0, the one after it video 1."""
    ids = mixed_inputs["input_ids"]
    assert (ids == processor.image_token_id).sum(1).tolist() == [80 + 64, 64 + 16 + 64]
    assert _frames(tiny_path, mixed_inputs) == MIXED


def test_frames_follow_each_beam_copys_sample(tiny_path, mixed_inputs):
    """generate(num_beams=2) repeats each prompt; each copy reads its own sample's frames."""
    got = _frames(tiny_path, mixed_inputs, num_beams=2, num_return_sequences=2)
    assert got == [MIXED[0], MIXED[0], MIXED[1], MIXED[1]]


def test_frames_without_or_with_a_wrong_frame_index(tiny_path, batch_inputs, mixed_inputs):
    """Without `frame_index`, prompts of multi-tile images have no video; a one-tile block (image or frame?) asks for
    it. An index that does not fit the blocks is refused, naming it."""
    assert _frames(tiny_path, batch_inputs) == [image_rows(5), image_rows(3)]
    unmarked = {k: v for k, v in mixed_inputs.items() if k != "frame_index"}
    with pytest.raises(ValueError, match="one-tile <img> block.*pass frame_index"):
        _frames(tiny_path, unmarked)
    index = mixed_inputs["frame_index"]
    for wrong, why in (
        (index[:-1], r"13 entries, but the prompts hold \[5, 9\] <img> blocks"),
        (torch.cat([torch.tensor([0]), index[1:]]), "a frame is one tile"),  # the 5-tile image as a frame
        (torch.cat([index[:2], index[3:4], index[2:3], index[4:]]), "numbered 0, 1, ... in order"),
    ):
        with pytest.raises(ValueError, match=why):
            _frames(tiny_path, {**unmarked, "frame_index": wrong})


# ------------------------------------------------------------------------------------------ processor


def test_processor_falls_back_without_torchvision_in_one_line(tiny_path, capsys, image):
    processor = load_processor(tiny_path)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "torchvision" in lines[0]
    assert type(processor.image_processor).__name__ == "GotOcr2ImageProcessorPil"
    assert isinstance(processor.video_processor, InternVLVideoProcessorPil)
    inputs = processor(images=image, text=chat(processor), return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    start = ids.index(_token(processor, "<img>"))
    assert ids[start + 1 : start + 81] == [processor.image_token_id] * 80 and ids[start + 81] == _token(
        processor, "</img>"
    )
    assert inputs["pixel_values"].shape == (5, 3, 32, 32)
    one_tile = load_processor(tiny_path, max_patches=1)(images=image, text=chat(processor), return_tensors="pt")
    assert one_tile["pixel_values"].shape[0] == 1 and (one_tile["input_ids"] == processor.image_token_id).sum() == 16


def test_video_file_is_decoded_without_torchvision_one_tile_per_frame(tmp_path, processor):
    path = write_test_video(tmp_path / "clip.mp4", num_frames=12, size=(40, 24))
    text = chat(processor, "What moves?", images=0, videos=1)
    inputs = processor(videos=[str(path)], text=text, num_frames=4, return_tensors="pt")
    decoded = processor.tokenizer.decode(inputs["input_ids"][0])
    assert [f"Frame{i}: <img>" in decoded for i in range(1, 6)] == [True] * 4 + [False]
    assert (inputs["input_ids"] == processor.image_token_id).sum() == 4 * 16
    frames = load_video(path, num_frames=4).frames
    want = processor.image_processor(list(frames), crop_to_patches=False, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(inputs["pixel_values"], want)


# ------------------------------------------------------------------------------------------ errors


def test_clear_errors(tmp_path, tiny_path, processor, frames):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    other = tmp_path / "qwen2"
    Qwen2ForCausalLM(
        Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    ).save_pretrained(other)
    with pytest.raises(ValueError, match="'qwen2' checkpoint.*InternVL"):
        load_model(str(other))
    with pytest.raises(TypeError, match="InternVLForConditionalGeneration"):
        wrap(torch.nn.Linear(2, 2))
    text = [chat(processor, images=0, videos=1)] * 2
    with pytest.raises(ValueError, match="same number of frames"):
        processor(videos=[frames, frames[:2]], text=text, return_tensors="pt", padding=True)
    with pytest.raises(VideoError, match="missing.mp4"):
        processor(videos=[str(tmp_path / "missing.mp4")], text=text[:1], return_tensors="pt")
    with pytest.raises(ValueError, match="prune_layer"):
        load_model(tiny_path, VTRConfig(prune_layer=9))
    single = processor(images=demo_image(64, 64), text=chat(processor), return_tensors="pt")
    with pytest.raises(ValueError, match="output_attentions"):
        vtr_model(tiny_path, prune_layer=2, keep_tokens=4)(**single, output_attentions=True)


# ------------------------------------------------------------------------------------------ demo


def test_demo_runs_on_an_image_and_a_video(tiny_path, tmp_path, capsys):
    from internvl_vtr.demo import main

    common = ["--model", tiny_path, "--strategies", "fastv", "--budgets", "20", "--repeats", "1"]
    assert main([*common, "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "112 of them visual (7 tiles x 16)" in out  # 896 x 672: 3 x 2 tiles + thumbnail
    assert "fastv" in out and "K=2 keep=20 | 20" in out
    clip = write_test_video(tmp_path / "demo.mp4", num_frames=10, size=(40, 32))
    assert main([*common, "--video", str(clip), "--num-frames", "4", "--max-new-tokens", "1"]) == 0
    assert "64 of them visual (4 frames x 16)" in capsys.readouterr().out
