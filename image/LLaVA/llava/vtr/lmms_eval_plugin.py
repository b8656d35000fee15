"""lmms-eval model `llava_vtr`: any VTR strategy on LLaVA from the command line.

Registered through lmms-eval's `lmms_eval.models` entry-point group (image/LLaVA/pyproject.toml), so
after `make install` it needs no file copied into lmms-eval:

    python -m lmms_eval --model llava_vtr \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,strategy=fastv,keep_tokens=64,prune_layer=2 \\
        --tasks mme --batch_size 1 --output_path ./results/fastv

`--model_args` takes every `VTRConfig` field by name (typed from the dataclass; lists `[3,7,16]` or
`3;7;16`) and the loading keys in `LOAD_ARGS`; anything else is an error listing the valid keys.
See docs/lmms-eval.md.
"""

from __future__ import annotations

from .api import load_model, load_processor
from .config import VTRConfig
from .convert import convert_original_llava, is_original_llava
from .lmms_eval_base import VTRLmms, as_image, install_compat

IMAGE_TOKEN = "<image>"
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
CHATML_SYSTEM = "Answer the questions."
#: Prompt formats: `auto` picks the checkpoint's own (see `default_conv_template`).
CONV_TEMPLATES = ("auto", "vicuna_v1", "mistral_instruct", "chatml_direct", "plain", "hf")


def default_conv_template(config, tokenizer) -> str:
    """The conversation a checkpoint was trained with: LLaVA-1.5 and 1.6-vicuna `vicuna_v1`, 1.6-mistral
    `mistral_instruct` (`[INST] ... [/INST]`), 1.6-34b (Nous-Hermes-2-Yi, ChatML) `chatml_direct`."""
    if config.get_text_config().model_type == "mistral":
        return "mistral_instruct"
    if "<|im_start|>" in tokenizer.get_vocab():
        return "chatml_direct"
    return "vicuna_v1"


class LlavaVTR(VTRLmms):
    """LLaVA-1.5 (llava-hf or original release checkpoints) and LLaVA-1.6 (llava-hf `llava-v1.6-*`, anyres)
    with visual token reduction."""

    name = "llava_vtr"
    default_pretrained = "llava-hf/llava-1.5-7b-hf"
    EXTRA_LOAD_ARGS = {"conv_template": str, "vision_tower": str | None}

    @classmethod
    def check_load_args(cls, load: dict) -> None:
        if load.get("conv_template", "auto") not in CONV_TEMPLATES:
            raise ValueError(f"conv_template={load['conv_template']!r}: choose one of {list(CONV_TEMPLATES)}")

    def load_backbone(self, load: dict, **kwargs):
        pretrained = self.pretrained
        if is_original_llava(pretrained):
            dtype = kwargs.get("dtype")
            return convert_original_llava(
                pretrained, vision_tower=load.get("vision_tower"), dtype=None if dtype == "auto" else dtype
            )
        model = load_model(pretrained, VTRConfig(enabled=False), **kwargs)
        processor = load_processor(pretrained, **({"revision": load["revision"]} if "revision" in load else {}))
        return model, processor

    def configure(self, load: dict) -> None:
        self.conv_template = load.get("conv_template", "auto")
        if self.conv_template == "auto":
            self.conv_template = default_conv_template(self._model.config, self.tokenizer)

    def visual_token_ids(self) -> list[int]:
        return [self._model.config.image_token_id]

    def prepare_visuals(self, visuals: list) -> list:
        images = [as_image(v) for v in visuals]
        for v, image in zip(visuals, images):
            if image is None:
                raise ValueError(
                    f"llava_vtr takes images (PIL, or an image file path); got {type(v).__name__} {v!r:.80}"
                )
        return images

    def build_prompt(self, context: str, visuals: list) -> str:
        if IMAGE_TOKEN not in context and visuals:
            context = "\n".join([IMAGE_TOKEN] * len(visuals)) + "\n" + context
        if self.conv_template == "plain":
            return context
        if self.conv_template == "hf":
            return self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "text", "text": context}]}], add_generation_prompt=True
            )
        if self.conv_template == "mistral_instruct":
            return f"[INST] {context} [/INST]"
        if self.conv_template == "chatml_direct":
            return (
                f"<|im_start|>system\n{CHATML_SYSTEM}<|im_end|><|im_start|>user\n{context}<|im_end|>"
                "<|im_start|>assistant\n"
            )
        return f"{VICUNA_SYSTEM} USER: {context} ASSISTANT:"

    def encode(self, prompts: list[str], visuals: list[list]):
        images = [image for sample in visuals for image in sample]
        inputs = self.processor(images=images or None, text=prompts, return_tensors="pt", padding=True).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        return inputs


#: Every loading key llava_vtr accepts (the shared ones and LLaVA's own), with its type.
LOAD_ARGS = LlavaVTR.load_args()

install_compat(LlavaVTR)
