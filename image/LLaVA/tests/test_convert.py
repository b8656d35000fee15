"""Original LLaVA-format checkpoints are converted on load into the HF model, exactly."""

import json

import pytest
import torch

from llava.vtr import VTRConfig
from llava.vtr.convert import convert_original_llava, is_original_llava
from llava.vtr.tiny import build_tiny_original_llava, demo_image


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
    base_vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    with torch.no_grad():
        got = model(**inputs).logits[..., :base_vocab]
        expected = reference(**inputs).logits[..., :base_vocab]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    model.set_vtr_config(VTRConfig(strategy="fastv", keep_tokens=4, prune_layer=2))
    model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert model.vtr_last.stages[0].image_tokens_kept == [4]


def test_unsupported_projector_is_a_clear_error(original, tmp_path):
    import shutil

    path, _ = original
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["mm_projector_type"] = "linear"
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="mm_projector_type='linear' is not supported"):
        convert_original_llava(str(copy))
