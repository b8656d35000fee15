"""LLaVA-OneVision's processor without torchvision: the stock `LlavaOnevisionProcessor` around the PIL image
processor and a torch/decord video processor. Its video pixels against an independent PIL reference, the
`<video>` and `<image>` expansions by the published formulas, a saved processor loaded back, videos given as
files, arrays and PIL frames, and the clear errors."""

import json
import math

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import LlavaOnevisionConfig

from llava.vtr import load_processor
from llava.vtr.processing import onevision_processor, save_processor
from llava.vtr.tiny import build_tokenizer
from llava.vtr.video_io import VideoError, load_video, write_test_video

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])
TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{% elif item['type'] == 'video' %}<video>"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
)


def _torchvision_loads() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


without_torchvision = pytest.mark.skipif(_torchvision_loads(), reason="torchvision loads: the stock classes are used")


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_tokenizer()
    tok.add_tokens(["<video>"], special_tokens=True)
    return tok


@pytest.fixture(scope="module")
def small(tokenizer):
    """40 px views of 8 px patches: 5 x 5 = 25 tokens a view, ceil(5 / 2) ** 2 = 9 a pooled video frame."""
    return onevision_processor(tokenizer, image_size=40, patch_size=8, chat_template=TEMPLATE)


def _count(inputs, processor, token):
    return int((inputs["input_ids"][0] == processor.tokenizer.convert_tokens_to_ids(token)).sum())


def _frames(seed, t, h, w):
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


@without_torchvision
def test_the_processor_is_the_stock_class_around_the_pil_and_torch_processors(small):
    assert isinstance(small, transformers.LlavaOnevisionProcessor)
    assert type(small.image_processor).__name__ == "LlavaOnevisionImageProcessorPil"
    assert type(small.video_processor).__name__ == "LlavaOnevisionVideoProcessorNoTV"
    assert small.num_image_tokens == 25 and small.vision_feature_select_strategy == "full"
    assert dict(small.image_processor.size)["height"] == dict(small.video_processor.size)["width"] == 40
    # the stock 1..6 x 1..6 layouts, scaled from 384 px to 40 px views
    pinpoints = small.image_processor.image_grid_pinpoints
    assert len(pinpoints) == 36 and pinpoints[0] == [40, 40] and pinpoints[-1] == [240, 240]


def test_video_pixels_are_the_pil_bicubic_resize_rescaled_and_clip_normalised(tokenizer):
    """The reference resizes each frame alone with PIL (bicubic, 384 x 384), then / 255 and CLIP's mean/std.
    Both resizers work on uint8 in fixed point, PIL and torch at different precision, so a value may round to
    a neighbouring level: at most 2 levels of 255 (noise frames are the worst case), in under 1% of values;
    everything else is equal. Frames shrunk in one side and enlarged in the other, and enlarged in both."""
    video = onevision_processor(tokenizer).video_processor
    for frames in (_frames(0, 3, 200, 600), _frames(1, 2, 100, 80)):
        got = video(videos=[frames], return_tensors="pt")["pixel_values_videos"][0]
        assert got.shape == (len(frames), 3, 384, 384)
        reference = np.stack([np.asarray(Image.fromarray(f).resize((384, 384), Image.BICUBIC)) for f in frames])
        want = (reference / 255.0 - CLIP_MEAN) / CLIP_STD
        levels = (got.permute(0, 2, 3, 1).double().numpy() - want) * CLIP_STD * 255
        assert np.abs(levels).max() < 2 + 1e-3
        assert (np.abs(levels) > 1e-3).mean() < 0.01


def test_video_and_image_tokens_expand_as_the_stock_formulas_say(small):
    # a video: frames * ceil(5 / 2) ** 2 pooled tokens + 1 newline
    inputs = small(text="user: <video>", videos=[_frames(0, 3, 50, 70)], return_tensors="pt")
    assert inputs["pixel_values_videos"].shape == (1, 3, 3, 40, 40)
    assert _count(inputs, small, "<video>") == 3 * math.ceil(5 / 2) ** 2 + 1 == 28
    # one 60 x 40 (w x h) image: the best layout is 1 x 2 views (40 x 80 px, 5 x 10 features); unpadding the
    # 3:2 picture keeps round(60 * 5 / 40) = 7 columns, so 10 - 2 * 1 = 8: 5 * 8 + 5 row newlines + 25 base
    wide = Image.new("RGB", (60, 40), (200, 30, 30))
    inputs = small(text="user: <image>", images=[wide], return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 3, 40, 40)  # the base view and 2 tiles
    assert _count(inputs, small, "<image>") == 5 * 8 + 5 + 25
    # anyres_max_1: sqrt(40 / 25) > 1.1 shrinks the grid by that ratio: 3 x 6 features + 3 newlines + base
    capped = onevision_processor(small.tokenizer, image_size=40, patch_size=8, vision_aspect_ratio="anyres_max_1")
    assert _count(capped(text="<image>", images=[wide], return_tensors="pt"), capped, "<image>") == 3 * 6 + 3 + 25
    # several images in one sample: each is its base view and one newline
    inputs = small(text="<image> <image>", images=[[wide, wide]], return_tensors="pt")
    assert _count(inputs, small, "<image>") == 2 * (25 + 1)


def test_a_saved_processor_loads_back_with_one_notice_and_names_the_stock_classes(small, tmp_path, capsys):
    save_processor(small, tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == "LlavaOnevisionProcessor"
    assert saved["image_processor"]["image_processor_type"] == "LlavaOnevisionImageProcessor"
    assert saved["video_processor"]["video_processor_type"] == "LlavaOnevisionVideoProcessor"
    # processor files only: processor_config.json's class tells; then a model config's model_type tells
    assert isinstance(load_processor(str(tmp_path)), transformers.LlavaOnevisionProcessor)
    LlavaOnevisionConfig().save_pretrained(tmp_path)
    capsys.readouterr()
    loaded = load_processor(str(tmp_path))
    out, err = capsys.readouterr()
    if not _torchvision_loads():
        lines = [line for line in err.splitlines() if line.startswith("llava.vtr:")]
        assert len(lines) == 1 and "torchvision" in lines[0] and "llava.vtr" not in out, "one line, on stderr"
        assert type(loaded.video_processor) is type(small.video_processor)
    assert isinstance(loaded, transformers.LlavaOnevisionProcessor)
    assert loaded.chat_template == TEMPLATE and loaded.vision_aspect_ratio == "anyres_max_9"
    assert loaded.image_processor.image_grid_pinpoints == small.image_processor.image_grid_pinpoints
    text = loaded.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "What?"}]}]
    )
    assert text.strip() == "user: <image><video>What?"
    kwargs = {"text": text, "images": [Image.new("RGB", (60, 40))], "videos": [_frames(2, 2, 30, 50)]}
    want, got = small(**kwargs, return_tensors="pt"), loaded(**kwargs, return_tensors="pt")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=0, rtol=0)


def test_a_video_file_loads_by_path_and_frames_are_sampled_as_the_stock_sampler_does(small, tmp_path):
    path = write_test_video(tmp_path / "clip.mp4", num_frames=16, size=(64, 48), fps=8)
    decoded = load_video(path, num_frames=16).frames
    every = small(text="<video>", videos=[str(path)], return_tensors="pt")
    assert every["pixel_values_videos"].shape == (1, 16, 3, 40, 40)  # do_sample_frames is False by default
    # num_frames=4 of 16: the stock uniform sampler takes frames arange(4) * 16 // 4 = 0, 4, 8, 12
    sampled = small(text="<video>", videos=[str(path)], do_sample_frames=True, num_frames=4, return_tensors="pt")
    assert _count(sampled, small, "<video>") == 4 * 9 + 1
    from_array = small(text="<video>", videos=[decoded[[0, 4, 8, 12]]], return_tensors="pt")
    torch.testing.assert_close(sampled["pixel_values_videos"], from_array["pixel_values_videos"], atol=0, rtol=0)
    torch.testing.assert_close(sampled["pixel_values_videos"][0], every["pixel_values_videos"][0, ::4])
    # the same frames as a list of PIL images, and an array sampled by the processor itself
    pil = small(text="<video>", videos=[[Image.fromarray(f) for f in decoded[[0, 4, 8, 12]]]], return_tensors="pt")
    torch.testing.assert_close(pil["pixel_values_videos"], from_array["pixel_values_videos"], atol=0, rtol=0)
    array = small(text="<video>", videos=[decoded], do_sample_frames=True, num_frames=4, return_tensors="pt")
    torch.testing.assert_close(array["pixel_values_videos"], from_array["pixel_values_videos"], atol=0, rtol=0)


def test_a_missing_folder_or_video_file_is_a_clear_error(small, tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model.*does not exist"):
        load_processor(str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError, match="holds no "):
        load_processor(str(tmp_path))
    with pytest.raises(VideoError, match="nothere.mp4"):
        small(text="<video>", videos=[str(tmp_path / "nothere.mp4")])


def test_a_tokenizer_without_the_video_token_is_refused():
    with pytest.raises(ValueError, match="'<video>' token"):
        onevision_processor(build_tokenizer(), image_size=40, patch_size=8)


def test_llava_checkpoints_load_with_the_stock_auto_processor(tiny_path, capsys):
    processor = load_processor(tiny_path)
    assert type(processor) is transformers.LlavaProcessor
    assert "torchvision is unavailable" not in capsys.readouterr().err
