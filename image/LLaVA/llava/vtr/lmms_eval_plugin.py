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

import json
import math
import sys
import time
from datetime import datetime
from pathlib import Path

import lmms_eval.evaluator
import torch
from accelerate import Accelerator
from lmms_eval import utils
from lmms_eval.api.instance import unwrap_generation_output
from lmms_eval.api.model import lmms
from loguru import logger
from PIL import Image
from tqdm import tqdm

from .api import load_model, load_processor
from .config import VTRConfig
from .convert import convert_original_llava, is_original_llava
from .cost import equivalent_tokens, ideal_speedup, text_config_dims, tokens_per_layer
from .model_args import describe, parse_model_args, split_args

IMAGE_TOKEN = "<image>"
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
CONV_TEMPLATES = ("vicuna_v1", "plain", "hf")

#: Loading / run keys accepted in --model_args besides the VTRConfig fields, with their types.
LOAD_ARGS: dict[str, object] = {
    "pretrained": str,
    "revision": str,
    "device": str,
    "dtype": str,
    "device_map": str,
    "attn_implementation": str | None,
    "conv_template": str,
    "batch_size": int,
    "max_batch_size": int | None,
    "trust_remote_code": bool,
    "use_cache": bool,
    "vision_tower": str | None,
    "stats_path": str | None,
    "max_new_tokens": int,
}


def _keep_loglikelihood_tuples() -> bool:
    """Work around lmms-eval 0.7.x turning every model output into a string before scoring.

    Its evaluator passes each response through `unwrap_generation_output`, which returns `str(output)`
    for a loglikelihood result `(logprob, is_greedy)`; `multiple_choice` / `loglikelihood` tasks then fail
    for every model ("too many values to unpack"). This wraps the evaluator's reference so that such
    pairs (tuples, or lists when served from the response cache) pass through unchanged. It installs
    itself only when the installed lmms-eval shows the bug, so a fixed release is left alone.
    """
    if unwrap_generation_output((0.0, True))[0] != "(0.0, True)":
        return False
    original = lmms_eval.evaluator.unwrap_generation_output
    if getattr(original, "_vtr_keeps_loglikelihood", False):
        return True

    def unwrap(output):
        if isinstance(output, (tuple, list)) and len(output) == 2 and isinstance(output[1], bool):
            if isinstance(output[0], (int, float)) and not isinstance(output[0], bool):
                return (float(output[0]), output[1]), None
        return original(output)

    unwrap._vtr_keeps_loglikelihood = True
    lmms_eval.evaluator.unwrap_generation_output = unwrap
    return True


def _name_outputs_after_settings() -> None:
    """Make lmms-eval's results folder name carry the VTR settings.

    lmms-eval names the folder after `pretrained=` only, so a pruned and an unpruned run of one
    checkpoint would land side by side, told apart by timestamps. For `llava_vtr` runs the folder becomes
    `<pretrained>__vtr-<tag>` (tag as in `describe`, e.g. `fastv_K2_keep64`); other model_args keep the
    stock name."""
    from lmms_eval.loggers.evaluation_tracker import GeneralConfigTracker

    original = GeneralConfigTracker._get_model_name
    if getattr(original, "_vtr_names_outputs", False):
        return

    def model_name(model_args) -> str:
        base = original(model_args)
        try:
            _, config = parse_model_args(split_args(model_args), LOAD_ARGS)
        except Exception:  # not llava_vtr's arguments: leave lmms-eval's name alone
            return base
        return output_name(base, config)

    model_name._vtr_names_outputs = True
    GeneralConfigTracker._get_model_name = staticmethod(model_name)


def output_name(pretrained: str, config: VTRConfig) -> str:
    return f"{pretrained}__vtr-{describe(config)}"


_keep_loglikelihood_tuples()
_name_outputs_after_settings()


class LlavaVTR(lmms):
    """LLaVA-1.5 (llava-hf or original release checkpoints) with visual token reduction."""

    is_simple = True

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        raw = split_args(arg_string)
        for key, value in (additional_config or {}).items():
            if value is not None and key not in raw:
                raw[key] = value
        return cls(**raw)

    def __init__(self, **model_args) -> None:
        super().__init__()
        load, vtr_config = parse_model_args(model_args, LOAD_ARGS)
        pretrained = load.get("pretrained", "llava-hf/llava-1.5-7b-hf")
        self.conv_template = load.get("conv_template", "vicuna_v1")
        if self.conv_template not in CONV_TEMPLATES:
            raise ValueError(f"conv_template={self.conv_template!r}: choose one of {list(CONV_TEMPLATES)}")
        self.batch_size_per_gpu = load.get("batch_size", 1)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size={self.batch_size_per_gpu}: must be >= 1")
        self.use_cache = load.get("use_cache", True)
        self.default_max_new_tokens = load.get("max_new_tokens", 128)
        self.stats_path = load.get("stats_path")

        accelerator = Accelerator()
        cuda = torch.cuda.is_available()
        device = load.get("device") or ("cuda" if cuda else "cpu")
        device_map = load.get("device_map", "")
        if accelerator.num_processes > 1:
            device = f"cuda:{accelerator.local_process_index}" if cuda else "cpu"
            device_map = device if cuda else ""
        dtype_name = load.get("dtype", "auto" if cuda else "float32")
        dtype = dtype_name if dtype_name == "auto" else getattr(torch, dtype_name, None)
        if dtype is None:
            raise ValueError(f"dtype={dtype_name!r} is not a torch dtype (float16, bfloat16, float32 or auto)")

        if is_original_llava(pretrained):
            model, processor = convert_original_llava(
                pretrained, vision_tower=load.get("vision_tower"), dtype=None if dtype == "auto" else dtype
            )
        else:
            kwargs = dict(dtype=dtype, trust_remote_code=load.get("trust_remote_code", False))
            for key in ("revision", "attn_implementation"):
                if load.get(key) is not None:
                    kwargs[key] = load[key]
            if device_map:
                kwargs["device_map"] = device_map
            model = load_model(pretrained, VTRConfig(enabled=False), **kwargs)
            processor = load_processor(pretrained, **({"revision": load["revision"]} if "revision" in load else {}))
        model.set_vtr_config(vtr_config)
        if not device_map:
            model.to(device)
        processor.tokenizer.padding_side = "left"
        self._model, self.processor, self.tokenizer = model, processor, processor.tokenizer
        self._device = torch.device(device)
        self.pretrained, self.vtr_config, self.vtr_tag = pretrained, vtr_config, describe(vtr_config)
        self.accelerator = accelerator
        self._rank, self._world_size = accelerator.local_process_index, accelerator.num_processes
        self._stats = _RunStats(model.config.text_config)
        model.register_forward_pre_hook(self._stats.before_forward, with_kwargs=True)
        model.register_forward_hook(self._stats.after_forward, with_kwargs=True)
        logger.info(f"llava_vtr: {pretrained} with {vtr_config} (tag {self.vtr_tag}) on {device}")

    @property
    def model(self):
        return self._model

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    # ------------------------------------------------------------------ prompts

    def build_prompt(self, context: str, num_images: int) -> str:
        if IMAGE_TOKEN not in context and num_images:
            context = "\n".join([IMAGE_TOKEN] * num_images) + "\n" + context
        if self.conv_template == "plain":
            return context
        if self.conv_template == "hf":
            return self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "text", "text": context}]}], add_generation_prompt=True
            )
        return f"{VICUNA_SYSTEM} USER: {context} ASSISTANT:"

    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        flat = []
        for v in visuals or []:
            flat.extend(v if isinstance(v, (list, tuple)) else [v])
        for v in flat:
            if not isinstance(v, Image.Image):
                raise ValueError(f"llava_vtr handles images only; task {task!r} gave a {type(v).__name__}")
        return [v.convert("RGB") for v in flat]

    def _encode(self, prompts: list[str], images: list):
        inputs = self.processor(images=images or None, text=prompts, return_tensors="pt", padding=True).to(self._device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        return inputs

    # ------------------------------------------------------------------ requests

    def generate_until(self, requests) -> list[str]:
        results = []

        def order(args):
            return -len(self.tokenizer.encode(args[0])), args[0]

        collator = utils.Collator([r.args for r in requests], order, grouping=True)
        batches = collator.get_batched(n=self.batch_size, batch_fn=None)
        total = math.ceil(len(requests) / self.batch_size)
        bar = tqdm(total=total, disable=self.rank != 0, desc="llava_vtr generate")
        for batch in batches:
            contexts, all_gen_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*batch)
            gen_kwargs = dict(all_gen_kwargs[0])
            until = gen_kwargs.pop("until", None) or [self.tokenizer.decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            prompts, images = [], []
            for context, visual_fn, doc_id, task, split in zip(contexts, doc_to_visual, doc_ids, tasks, splits):
                visuals = self._visuals(visual_fn, doc_id, task, split)
                images.extend(visuals)
                prompts.append(self.build_prompt(context, len(visuals)))
            inputs = self._encode(prompts, images)
            temperature = float(gen_kwargs.get("temperature", 0) or 0)
            do_sample = bool(gen_kwargs.get("do_sample", False)) or temperature > 0
            generate_kwargs = dict(
                max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.default_max_new_tokens)),
                do_sample=do_sample,
                num_beams=int(gen_kwargs.get("num_beams", 1) or 1),
                use_cache=self.use_cache,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.eot_token_id,
            )
            if do_sample:
                generate_kwargs["temperature"] = temperature or 1.0
                if gen_kwargs.get("top_p") is not None:
                    generate_kwargs["top_p"] = float(gen_kwargs["top_p"])
            with torch.inference_mode():
                output = self._model.generate(**inputs, **generate_kwargs)
            texts = self.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for context, text in zip(contexts, texts):
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                text = text.strip()
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_gen_kwargs[0]), text)
            bar.update(1)
        bar.close()
        return collator.get_original(results)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """Log-probability of each continuation, computed **with pruning applied** to the context."""
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc="llava_vtr loglikelihood"):
            context, continuation, visual_fn, doc_id, task, split = request.args
            if not isinstance(continuation, str):
                continuation = continuation(self.task_dict[task][split][doc_id])
            visuals = self._visuals(visual_fn, doc_id, task, split)
            inputs = self._encode([self.build_prompt(context, len(visuals))], visuals)
            target = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
            target = target.to(self._device)
            context_len = inputs["input_ids"].shape[1]
            inputs["input_ids"] = torch.cat([inputs["input_ids"], target], dim=1)
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
            with torch.inference_mode():
                logits = self._model(**inputs, use_cache=False).logits[0].float()
            record = self._model.vtr_last
            kept = record.kept_index[0] if record is not None else torch.arange(logits.shape[0], device=logits.device)
            # the row that predicts original position p is the one holding position p-1 (text: never pruned)
            row_of = torch.full((inputs["input_ids"].shape[1],), -1, dtype=torch.long, device=logits.device)
            row_of[kept[kept >= 0]] = torch.arange(kept.numel(), device=logits.device)[kept >= 0]
            rows = row_of[context_len - 1 : context_len - 1 + target.shape[1]]
            if bool((rows < 0).any()):
                raise RuntimeError("a continuation's predicting row was pruned; this cannot happen for text tokens")
            logprobs = torch.log_softmax(logits[rows], dim=-1)
            tokens = target[0]
            score = float(logprobs.gather(1, tokens[:, None]).sum())
            greedy = bool((logprobs.argmax(-1) == tokens).all())
            results.append((score, greedy))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), (score, greedy))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("llava_vtr does not implement multi-round generation")

    # ------------------------------------------------------------------ efficiency stats

    def stats_summary(self) -> dict:
        return dict(
            model="llava_vtr",
            pretrained=self.pretrained,
            vtr_tag=self.vtr_tag,
            vtr_config={k: getattr(self.vtr_config, k) for k in VTRConfig.field_names()},
            rank=self.rank,
            world_size=self.world_size,
            **self._stats.summary(),
        )

    def _stats_file(self) -> Path | None:
        if self.stats_path:
            path = Path(self.stats_path)
            return path / f"vtr_stats_{self.vtr_tag}.json" if path.suffix != ".json" else path
        argv = sys.argv
        for i, arg in enumerate(argv):
            if arg.startswith("--output_path"):
                out = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else None)
                if out:
                    folder = Path(out) / utils.sanitize_model_name(output_name(self.pretrained, self.vtr_config))
                    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
                    suffix = f"_rank{self.rank}" if self.world_size > 1 else ""
                    return folder / f"vtr_stats_{self.vtr_tag}_{stamp}{suffix}.json"
        return None

    def clean(self):
        summary = self.stats_summary()
        logger.info(f"llava_vtr efficiency: {json.dumps({k: v for k, v in summary.items() if k != 'vtr_config'})}")
        path = self._stats_file()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(summary, indent=2, default=str))
            logger.info(f"llava_vtr: wrote efficiency stats to {path}")
        super().clean()


class _RunStats:
    """Per-prefill efficiency figures, accumulated over a run (forward hooks on the model)."""

    def __init__(self, text_config):
        self.d, self.m, self.d_kv = text_config_dims(text_config)
        self.num_layers = text_config.num_hidden_layers
        self.image_token_id = None
        self.samples: list[dict] = []
        self._start = None

    @staticmethod
    def _is_image_prefill(kwargs) -> bool:
        # generate() in transformers 5 encodes the images first and passes `mm_encoder_outputs`
        encoded = kwargs.get("mm_encoder_outputs") or {}
        return kwargs.get("pixel_values") is not None or encoded.get("image") is not None

    def before_forward(self, module, args, kwargs):
        if self._is_image_prefill(kwargs):
            self.image_token_id = module.config.image_token_id
            if kwargs["input_ids"].is_cuda:
                torch.cuda.synchronize()
            self._start = time.perf_counter()

    def after_forward(self, module, args, kwargs, output):
        if self._start is None:
            return
        if kwargs["input_ids"].is_cuda:
            torch.cuda.synchronize()
        elapsed = (time.perf_counter() - self._start) * 1000
        self._start = None
        input_ids = kwargs["input_ids"]
        valid = kwargs.get("attention_mask")
        record = module.vtr_last
        for b in range(input_ids.shape[0]):
            seq_len = int(valid[b].sum()) if valid is not None else input_ids.shape[1]
            image = int((input_ids[b] == self.image_token_id).sum())
            stages, schedule = [], []
            for stage in record.stages if record is not None else []:
                before, kept = stage.image_tokens_before[b], stage.image_tokens_kept[b]
                stages.append(dict(layer=stage.layer, image_in=before, image_kept=kept))
                schedule.append((stage.layer, before - kept))
            lengths = tokens_per_layer(seq_len, self.num_layers, schedule)
            self.samples.append(
                dict(
                    seq_len=seq_len,
                    image_tokens=image,
                    stages=stages,
                    equivalent_tokens=equivalent_tokens(lengths),
                    flops_ratio=1 / ideal_speedup(seq_len, lengths, self.d, self.m, self.d_kv),
                    prefill_ms=elapsed / input_ids.shape[0],
                )
            )

    def summary(self) -> dict:
        n = len(self.samples)

        def mean(values):
            values = list(values)
            return sum(values) / len(values) if values else None

        by_layer: dict[int, list[dict]] = {}
        for s in self.samples:
            for stage in s["stages"]:
                by_layer.setdefault(stage["layer"], []).append(stage)
        return dict(
            prefills=n,
            mean_seq_len=mean(s["seq_len"] for s in self.samples),
            mean_image_tokens=mean(s["image_tokens"] for s in self.samples),
            per_prune_layer=[
                dict(
                    layer=layer,
                    mean_image_tokens_in=mean(x["image_in"] for x in items),
                    mean_image_tokens_kept=mean(x["image_kept"] for x in items),
                )
                for layer, items in sorted(by_layer.items())
            ],
            mean_equivalent_tokens=mean(s["equivalent_tokens"] for s in self.samples),
            prefill_flops_ratio=mean(s["flops_ratio"] for s in self.samples),
            mean_prefill_ms=mean(s["prefill_ms"] for s in self.samples),
        )
