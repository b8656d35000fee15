"""The processor without torchvision, the prompt format and `encode`."""

import json

import numpy as np
import pytest
import torch
from transformers import VideoLlavaImageProcessor

from videollava.vtr import load_processor, processing
from videollava.vtr.prompts import encode, video_prompt
from videollava.vtr.video_io import load_video


def test_video_prompt_puts_a_newline_after_each_placeholder():
    assert video_prompt("What happens?") == "USER: <video>\nWhat happens? ASSISTANT:"
    assert video_prompt(" Why? ", num_videos=1, num_images=2) == "USER: <video>\n<image>\n<image>\nWhy? ASSISTANT:"
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="num_videos"):
            video_prompt("q", num_videos=bad)


def test_frames_go_through_the_checkpoints_image_processor_settings(processor, clips):
    """Each frame is resized, centre-cropped and normalised exactly as an image with the same settings would be."""
    inputs = encode(processor, [video_prompt("What happens?")], videos=clips[:1])
    pixels = inputs["pixel_values_videos"]
    assert tuple(pixels.shape) == (1, 8, 3, 32, 32)
    reference = VideoLlavaImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    want = reference(list(clips[0]), return_tensors="pt", return_legacy_image_output=False)["pixel_values"]
    torch.testing.assert_close(pixels[0], want, atol=0, rtol=0)
    video_id = processor.tokenizer.convert_tokens_to_ids("<video>")
    assert int((inputs["input_ids"] == video_id).sum()) == 8 * (16 + 1), "257-style: CLS kept per frame"


def test_encode_batches_videos_and_images_left_padded(processor, clips, image):
    prompts = [video_prompt("What happens here, in the video and the picture?", 1, 1), video_prompt("Why?")]
    inputs = encode(processor, prompts, videos=clips, images=[image])
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values_videos", "pixel_values"}
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 32, 32)
    mask = inputs["attention_mask"]
    assert mask[0].all() and not mask[1, 0] and mask[1, -1], "left padding"
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (inputs["input_ids"] == image_id).sum(1).tolist() == [16, 0]


def test_encode_takes_a_decoded_clip_and_refuses_mismatches(processor, video_files):
    clip = load_video(video_files[0], num_frames=8)
    assert encode(processor, video_prompt("What?"), videos=[clip])["pixel_values_videos"].shape[1] == 8
    with pytest.raises(ValueError, match="1 <video> placeholder.*2 videos"):
        encode(processor, [video_prompt("What?")], videos=[clip.frames, clip.frames])
    with pytest.raises(ValueError, match="<image>"):
        encode(processor, [video_prompt("What?", 0, 1)])
    with pytest.raises(ValueError, match="same number of frames"):
        encode(processor, [video_prompt("a"), video_prompt("b")], videos=[clip.frames, clip.frames[:4]])
    with pytest.raises(ValueError, match=r"\[t, height, width, 3\]"):
        encode(processor, [video_prompt("a")], videos=[np.zeros((8, 8), np.uint8)])


def test_the_fallback_says_so_once_and_saves_a_stock_loadable_folder(tiny_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(processing, "_WARNED", False)
    first, _ = load_processor(tiny_path), load_processor(tiny_path)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("videollava.vtr: torchvision")]
    assert len(lines) == 1
    first.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == "VideoLlavaProcessor"
    assert saved["video_processor"]["video_processor_type"] == "VideoLlavaVideoProcessor"
    assert saved["video_processor"]["crop_size"] == {"height": 32, "width": 32}
    again = load_processor(str(tmp_path))
    assert again.video_processor.settings["size"] == {"shortest_edge": 32} and again.patch_size == 8


def test_older_checkpoint_layout_with_separate_preprocessor_files(tiny_path, tmp_path):
    """Checkpoints saved before processor_config.json held the sub-processors keep them in their own files."""
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(f"{tiny_path}/{name}", tmp_path / name)
    settings = json.loads(open(f"{tiny_path}/processor_config.json").read())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(settings.pop("image_processor")))
    del settings["video_processor"]
    (tmp_path / "processor_config.json").write_text(json.dumps(settings))
    proc = load_processor(str(tmp_path))
    assert proc.image_processor.crop_size == {"height": 32, "width": 32}
    assert proc.video_processor.settings["crop_size"] == {"height": 32, "width": 32}, (
        "videos fall back to the image settings"
    )
    frames = np.zeros((8, 40, 40, 3), np.uint8)
    assert tuple(encode(proc, video_prompt("q"), videos=[frames])["pixel_values_videos"].shape) == (1, 8, 3, 32, 32)


def test_with_torchvision_the_stock_auto_processor_is_used(tiny_path, monkeypatch, capsys):
    import transformers

    calls = []
    monkeypatch.setattr(processing, "_stock_available", lambda: True)
    monkeypatch.setattr(processing, "_WARNED", False)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", lambda path, **kw: calls.append(path) or "stock")
    assert load_processor(tiny_path) == "stock" and calls == [tiny_path]
    assert "videollava.vtr: torchvision" not in capsys.readouterr().err
