"""Original LLaVA-format checkpoints (LLaVA-1.5; LLaVA-OneVision / LLaVA-Video) are converted on load into the HF
models, exactly."""

import copy
import json
import shutil

import pytest
import torch

from llava.vtr import VTRConfig, wrap
from llava.vtr.convert import (
    convert_original_llava,
    convert_original_onevision,
    is_original_llava,
    is_original_onevision,
)
from llava.vtr.tiny import build_tiny_original_llava, build_tiny_original_llava_video, demo_image, demo_video


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    return build_tiny_original_llava(tmp_path_factory.mktemp("orig") / "llava-v1.5-tiny")


def test_detects_the_format(original, tiny_path):
    path, _ = original
    assert is_original_llava(str(path))
    assert not is_original_llava(tiny_path)


def test_converted_model_equals_the_reference_and_prunes(original):
    path, reference = original
    model, processor = convert_original_llava(str(path))
    assert "<image>" in processor.tokenizer.get_vocab()
    inputs = processor(images=demo_image(64), text="USER: <image>\nWhat is shown? ASSISTANT:", return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 64
    assert_equals_reference_and_prunes(model, reference, inputs, path)


def assert_equals_reference_and_prunes(model, reference, inputs, path):
    """The converted model's logits are the reference's over the release's own vocabulary (the rows the conversion
    appends are its own), and it prunes: FastV keeps 4 visual tokens from layer 2."""
    base_vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    with torch.no_grad():
        got = model(**inputs).logits[..., :base_vocab]
        expected = reference(**inputs).logits[..., :base_vocab]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    model.set_vtr_config(VTRConfig(strategy="fastv", keep_tokens=4, prune_layer=2))
    model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert model.vtr_last.stages[0].image_tokens_kept == [4]


def test_unsupported_projector_is_a_clear_error(original, tmp_path):
    path, _ = original
    copy = edited_copy(path, tmp_path, mm_projector_type="linear")
    with pytest.raises(ValueError, match="mm_projector_type='linear' is not supported"):
        convert_original_llava(str(copy))


@pytest.fixture(scope="module")
def original_video(tmp_path_factory):
    """A tiny LLaVA-Video release (mm_newline_position "grid"): 2 SigLIP layers in the checkpoint, 3 in its tower."""
    return build_tiny_original_llava_video(tmp_path_factory.mktemp("orig") / "llava-video-tiny")


def edited_copy(path, tmp_path, weights=None, **config):
    """A copy of an original checkpoint with config.json keys changed and weights added."""
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(cfg | config))
    if weights:
        save_file(load_file(str(copy / "model.safetensors")) | weights, str(copy / "model.safetensors"))
    return copy


def test_tells_the_original_formats_apart(original, original_video, tiny_path, ov_path):
    llava, video = str(original[0]), str(original_video[0])
    assert is_original_llava(llava) and not is_original_onevision(llava)
    assert is_original_onevision(video) and not is_original_llava(video)
    for hf in (tiny_path, ov_path):
        assert not is_original_llava(hf) and not is_original_onevision(hf)
    with pytest.raises(ValueError, match="use convert_original_onevision"):
        convert_original_llava(video)


def test_converted_llava_video_equals_the_reference_and_prunes(original_video):
    """The weights and config convert exactly (the reference: the same stock weights, given LLaVA-Video's layout keys;
    that layout itself is tested against a literal embedding in test_llava_onevision.py)."""
    path, stock = original_video
    stock = copy.deepcopy(stock)
    model, processor = convert_original_onevision(str(path))
    assert (model.config.mm_newline_position, getattr(model.config, "mm_spatial_pool_mode", "bilinear")) == (
        "grid",
        "bilinear",
    )
    stock.config.mm_newline_position = "grid"
    reference = wrap(stock)
    assert model.config.vision_config.num_hidden_layers == 2  # the tower folder says 3: the last one was deleted
    assert model.config.vision_feature_layer == -1 and model.config.vision_feature_select_strategy == "full"
    vocab = processor.tokenizer.get_vocab()
    assert vocab["<video>"] == model.config.video_token_id == reference.config.video_token_id
    assert vocab["<image>"] == model.config.image_token_id == reference.config.image_token_id
    assert list(processor.image_processor.image_mean) == [0.5] * 3  # SigLIP's, from the tower folder

    content = [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "What is shown?"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    assert prompt == "<|im_start|>user\n<image>\n<video>\nWhat is shown?<|im_end|>\n<|im_start|>assistant\n"
    inputs = processor(text=prompt, images=demo_image(64), videos=[demo_video(4, 64)], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 16 + 5 * 6  # base view + 5 x 5 tiles
    assert int((inputs["input_ids"] == model.config.video_token_id).sum()) == 4 * 2 * (2 + 1)  # newline per row
    assert_equals_reference_and_prunes(model, reference, inputs, path)


def test_onevision_layout_is_the_stock_one_and_the_tower_copy_is_read(original_video, tmp_path):
    path, _ = original_video
    copy = edited_copy(path, tmp_path, mm_newline_position="one_token", mm_spatial_pool_mode="bilinear")
    tower = tmp_path / "tower"
    shutil.copytree(path / "siglip-tower", tower)
    saved = json.loads((tower / "preprocessor_config.json").read_text())
    (tower / "preprocessor_config.json").write_text(json.dumps(saved | {"image_mean": [0.25] * 3}))
    model, processor = convert_original_onevision(str(copy), vision_tower=str(tower))
    assert not hasattr(model.config, "mm_newline_position")  # as a llava-hf OneVision config
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}], add_generation_prompt=True)
    inputs = processor(text=text, videos=[demo_video(4, 64)], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.video_token_id).sum()) == 4 * 2 * 2 + 1
    assert list(processor.image_processor.image_mean) == [0.25] * 3
    assert list(processor.video_processor.image_mean) == [0.25] * 3
    assert list(processor.image_processor.image_std) == [0.5] * 3


@pytest.mark.parametrize(
    "config, message",
    [
        ({"mm_projector_type": "linear"}, "mm_projector_type='linear' is not supported"),
        ({"mm_patch_merge_type": "flat"}, "mm_patch_merge_type='flat' is not supported"),
        ({"add_faster_video": True}, "add_faster_video=true is not supported"),
        ({"image_aspect_ratio": "pad"}, "image_aspect_ratio='pad' is not supported"),
    ],
)
def test_what_the_stock_onevision_class_cannot_hold_is_refused(original_video, tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        convert_original_onevision(str(edited_copy(original_video[0], tmp_path, **config)))


def test_an_unexpected_weight_or_tower_is_refused_by_name(original_video, original, tmp_path):
    path, _ = original_video
    head = "model.vision_tower.vision_tower.vision_model.head.probe"
    copy = edited_copy(path, tmp_path, weights={head: torch.zeros(1, 1, 32)})
    with pytest.raises(ValueError, match=f"unexpected weight '{head}'"):
        convert_original_onevision(str(copy))
    clip = original[0] / "clip-tower"
    with pytest.raises(ValueError, match="'clip_vision_model' model; only SigLIP towers"):
        convert_original_onevision(str(path), vision_tower=str(clip))


def test_load_model_names_the_converter_for_an_original_release(original, original_video):
    """Not a default-size model of random weights (its config has no text_config), but the function to use."""
    from llava.vtr import load_model, load_processor

    for (path, _), convert in ((original, "convert_original_llava"), (original_video, "convert_original_onevision")):
        for load in (load_model, load_processor):
            with pytest.raises(
                ValueError, match=f"original .* checkpoint: convert it with llava.vtr.convert.{convert}"
            ):
                load(str(path))


def test_conversion_takes_dtype_auto_the_attention_kernel_and_the_device_as_from_pretrained(original_video, tmp_path):
    """dtype="auto" is the release's torch_dtype (not float32), attn_implementation is applied, device_map places it."""
    path, _ = original_video
    copy = edited_copy(path, tmp_path, torch_dtype="bfloat16")
    model, _ = convert_original_onevision(str(copy), dtype="auto", attn_implementation="eager", device_map="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert (
        model.config._attn_implementation == "eager" and model.config.get_text_config()._attn_implementation == "eager"
    )
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_lmms_eval_passes_the_loading_keys_to_the_conversion_and_refuses_a_stray_tower(original_video, ov_path):
    from llava.vtr.lmms_eval_plugin import LlavaOnevisionVTR

    path, _ = original_video
    lm = LlavaOnevisionVTR.create_from_arg_string(
        f"pretrained={path},attn_implementation=eager,dtype=bfloat16", {"batch_size": None, "device": None}
    )
    assert lm.model.config._attn_implementation == "eager" and lm.model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="vision_tower: .* holds its own vision tower"):
        LlavaOnevisionVTR.create_from_arg_string(f"pretrained={ov_path},vision_tower=x", {"batch_size": None})
