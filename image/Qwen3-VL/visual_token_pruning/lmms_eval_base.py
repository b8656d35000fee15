# Copied from image/LLaVA/llava/vtr/lmms_eval_base.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""The lmms-eval model every fork's plugin subclasses: arguments, loading, requests, efficiency record.

    python -m lmms_eval --model <fork>_vtr \\
        --model_args pretrained=...,strategy=fastv,keep_tokens=64,prune_layer=2 --tasks ... --batch_size 4

What the base does (identical in every fork):
- `--model_args`: every `VTRConfig` field by name (typed from the dataclass) plus the loading keys
  (`LOAD_ARGS` + the subclass's `EXTRA_LOAD_ARGS`); an unknown key or a bad value stops the process with
  status 2 and a one-line reason (lmms-eval's CLI would otherwise log it and exit 0). The CLI checks them
  before it indexes its tasks (lmms_eval_compat.check_cli_before_tasks); `validate_model_args` below is that
  check for a caller that starts lmms-eval itself (scripts/vtr_run). A checkpoint on disk with a hybrid decoder
  (linear-attention layers) also has the schedule checked against its layer kinds there.
- a doc's visuals: `as_image` turns a PIL image or an image file path into an RGB image, in every fork;
- device, dtype and data parallel (one model per `accelerate`/`torch.distributed` process);
- `generate_until` in batches (left padding, longest prompts first, a progress bar), `loglikelihood` with the
  context pruned on its own and the continuation scored against that pruned cache, which is put back after each
  (the value is a loss, as lmms-eval's own models return it: its multiple-choice scoring picks the smallest);
- the efficiency record: per prefill the kept visual tokens per stage, the analytic FLOPs ratio (cost.py)
  and the measured prefill time, merged over processes into one record that process 0 writes beside
  lmms-eval's results (or to `stats_path=`).

What a fork's subclass writes (its `lmms_eval_plugin.py`, ~100 lines):

    class MyVTR(VTRLmms):
        name = "my_vtr"                       # the --model id (also the entry point's name)
        default_pretrained = "org/checkpoint"
        EXTRA_LOAD_ARGS = {"num_frames": int}  # loading keys of this backbone
        def load_backbone(self, load, **from_pretrained) -> (model, processor)
        def prepare_visuals(self, visuals) -> list       # a doc's visuals, checked and converted (as_image)
        def build_prompt(self, context, visuals) -> str  # the chat prompt with the visual placeholders
        def encode(self, prompts, visuals) -> BatchFeature  # processor call; visuals: one list per prompt

    install_compat(MyVTR)   # at import: lmms-eval workarounds, results folders named after the settings
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from lmms_eval import utils
from lmms_eval.api.model import lmms
from loguru import logger
from PIL import Image
from tqdm import tqdm

from . import lmms_eval_compat as compat
from .config import VTRConfig
from .cost import equivalent_tokens, ideal_speedup_of, layer_costs, tokens_per_layer
from .engine import RECURRENT_LAYER_TYPES, check_layer_kinds, snap_schedule
from .model_args import describe, parse_model_args, split_args
from .strategy import get_strategy
from .timing import spread

#: Loading / run keys every fork accepts in --model_args besides the VTRConfig fields, with their types.
LOAD_ARGS: dict[str, object] = {
    "pretrained": str,
    "revision": str,
    "device": str,
    "dtype": str,
    "device_map": str,
    "attn_implementation": str | None,
    "batch_size": int,
    "max_batch_size": int | None,
    "trust_remote_code": bool,
    "use_cache": bool,
    "stats_path": str | None,
    "max_new_tokens": int,
}


#: a task's generation_kwargs handed to generate() as they are
PASSED_GENERATION_KWARGS = ("repetition_penalty", "length_penalty", "no_repeat_ngram_size", "min_new_tokens")
#: generation_kwargs read above (or by lmms-eval itself) that need no warning when not passed on
HANDLED_GENERATION_KWARGS = {"until", "temperature", "do_sample", "top_p", "top_k", "num_beams", "max_new_tokens"}


#: Suffixes that make a visual given as a file path an image (other paths are videos, in the forks that take them).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")

#: The fork's lmms-eval model class (set by `install_compat` when its plugin module is imported).
PLUGIN = None


def as_image(visual) -> Image.Image | None:
    """A doc's visual as an RGB PIL image when it is one or the path of an image file (by suffix); None for
    anything else (the fork decides: a video path, or an error naming what it takes)."""
    if isinstance(visual, Image.Image):
        return visual.convert("RGB")
    if isinstance(visual, (str, Path)) and Path(visual).suffix.lower() in IMAGE_EXTENSIONS:
        if not Path(visual).is_file():
            raise FileNotFoundError(f"image file not found: {visual}")
        with Image.open(visual) as image:
            return image.convert("RGB")
    return None


def validate_model_args(arg_string: str, additional_config: dict | None = None, model: str | None = None) -> None:
    """Raise ValueError, with the message the CLI prints before exiting 2, for `--model_args` this fork's
    lmms-eval model refuses (an unknown key, a bad value); nothing is loaded. `additional_config` holds the
    CLI's `--batch_size`/`--device`, as lmms-eval hands them over. `model`: which of the fork's lmms-eval models
    (its `--model` name) checks them, where the fork has several; None: the fork's check for any of them."""
    importlib.import_module(f"{__package__}.lmms_eval_plugin")  # sets PLUGIN
    checker = PLUGIN
    models = getattr(PLUGIN, "models", None)  # a fork serving several lmms-eval models with different keys
    if model is not None and models is not None:
        named = {m.name: m for m in models}
        if model not in named:
            raise ValueError(f"--model {model}: this fork's lmms-eval models are {sorted(named)}")
        checker = named[model]
    checker.validate_model_args(arg_string, additional_config)


def schedule_on_layer_kinds(config: VTRConfig, layer_types) -> VTRConfig | None:
    """`config` with the schedule a model whose decoder layers are of the kinds `layer_types` runs, without a model:
    one given as it is; one left unset the method's own (its `schedule_defaults`) moved onto a hybrid decoder's
    attention layers as the model moves it (`snap_schedule`), or None where a stage of it fits nowhere."""
    if not config.prune_layer_defaulted:
        return config
    updates = get_strategy(config.strategy).schedule_defaults(config, len(layer_types))
    config = dataclasses.replace(config, **updates) if updates else config
    layers = snap_schedule(config, layer_types)
    return None if layers is None else dataclasses.replace(config, prune_layer=layers if len(layers) > 1 else layers[0])


def check_layer_kinds_offline(pretrained: str, config: VTRConfig, **hub) -> None:
    """ValueError where `config`'s schedule cannot run on the hybrid decoder (linear-attention layers) of checkpoint
    `pretrained` (`engine.check_layer_kinds`: a scoring layer without attention, trimming or hiding rows of a
    recurrent layer), before anything loads; a schedule left unset is checked as the model moves it
    (`schedule_on_layer_kinds`). Nothing is checked where the checkpoint's config cannot be read without the network,
    its decoder has no recurrent layers, or a default schedule fits nowhere: the model checks its config when it
    loads."""
    from transformers import AutoConfig

    if not config.enabled:
        return
    try:
        text_config = AutoConfig.from_pretrained(pretrained, local_files_only=True, **hub).get_text_config()
    except (OSError, ValueError):
        return
    types = getattr(text_config, "layer_types", None) or []
    moved = schedule_on_layer_kinds(config, types) if set(types) & set(RECURRENT_LAYER_TYPES) else None
    if moved is not None:
        check_layer_kinds(moved, types)


def output_name(pretrained: str, config: VTRConfig) -> str:
    """Results folder / file stem: `<pretrained>__vtr-<settings tag>`. lmms-eval keeps the last two path parts
    for the folder; their leading dots go, so that no results folder is hidden (`.cache/demo-llava` ->
    `cache__demo-llava__vtr-...`, `./ckpt` -> `ckpt__vtr-...`)."""
    kept = [part.lstrip(".") for part in pretrained.split("/")[-2:]]
    return "/".join(part for part in kept if part) + f"__vtr-{describe(config)}"


def install_compat(plugin_class) -> None:
    """Install the lmms-eval workarounds for `plugin_class` (call once, when its module is imported)."""
    global PLUGIN
    PLUGIN = plugin_class
    compat.install(plugin_class.folder_name)


class VTRLmms(lmms):
    """Base lmms-eval model of the VTR forks; see the module docstring for what a subclass provides."""

    is_simple = True
    name = "vtr"
    default_pretrained = ""
    EXTRA_LOAD_ARGS: dict[str, object] = {}
    #: loading keys that change what is evaluated (e.g. the frames read from a video): each one given is named in
    #: the results folder after the settings tag, so runs that differ in it never share a folder
    FOLDER_KEYS: tuple[str, ...] = ()
    #: new tokens at most when neither the task nor `max_new_tokens=` says (a reasoning model needs more)
    MAX_NEW_TOKENS = 128

    # ------------------------------------------------------------------ what a subclass provides

    def load_backbone(self, load: dict, **from_pretrained):
        """(model loaded with `VTRConfig(enabled=False)`, processor). `from_pretrained` holds dtype,
        attn_implementation, revision, trust_remote_code and device_map as given."""
        raise NotImplementedError

    def prepare_visuals(self, visuals: list) -> list:
        """A doc's visuals (flattened) checked and converted for `encode`; raise ValueError for a kind the
        backbone cannot take."""
        return visuals

    def build_prompt(self, context: str, visuals: list) -> str:
        raise NotImplementedError

    def encode(self, prompts: list[str], visuals: list[list]):
        """Processor inputs for a batch (visuals: one list per prompt), on `self.device`, pixels in the model dtype."""
        raise NotImplementedError

    @classmethod
    def check_load_args(cls, load: dict) -> None:
        """Raise ValueError for a bad value of an `EXTRA_LOAD_ARGS` key."""

    def configure(self, load: dict) -> None:
        """After loading: settings that depend on the loaded model (e.g. the prompt format)."""

    def answer_of(self, text: str) -> str:
        """The answer in a generated text, before the task's stop sequences cut it: all of it (a reasoning model
        drops its think block here)."""
        return text

    def visual_token_ids(self) -> list[int]:
        """Placeholder token ids that count as visual tokens in the efficiency record."""
        config = self._model.config
        names = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
        return sorted({getattr(config, n) for n in names if isinstance(getattr(config, n, None), int)})

    # ------------------------------------------------------------------ arguments and loading

    @classmethod
    def load_args(cls) -> dict:
        return {**LOAD_ARGS, **cls.EXTRA_LOAD_ARGS}

    @classmethod
    def folder_name(cls, model_args: str, base: str) -> str | None:
        """Results folder for `--model_args`, or None when they are not this plugin's (lmms-eval's name)."""
        try:
            load, config = parse_model_args(split_args(model_args), cls.load_args())
        except Exception:
            return None
        extra = "".join(f"__{key}-{load[key]}" for key in cls.FOLDER_KEYS if load.get(key) is not None)
        for model in list(compat.LIVE_MODELS):  # the loaded model's settings (backbone default budget filled in)
            if isinstance(model, cls) and config.budget_defaulted:
                return output_name(base, model.vtr_config) + extra
        return output_name(base, config) + extra

    @staticmethod
    def raw_args(arg_string: str, additional_config: dict | None = None) -> dict:
        """`--model_args` as key -> string, with lmms-eval's `additional_config` (the CLI's --batch_size,
        --device, ...) filling keys the string does not set."""
        raw = split_args(arg_string)
        for key, value in (additional_config or {}).items():
            if value is not None and key not in raw:
                raw[key] = value
        return raw

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        return cls(**cls.raw_args(arg_string, additional_config))

    @classmethod
    def validate_model_args(cls, arg_string: str, additional_config: dict | None = None) -> None:
        """Raise ValueError for `--model_args` this model refuses, without loading anything (a checkpoint whose
        config is on disk also has its decoder's layer kinds checked: `check_layer_kinds_offline`)."""
        load, vtr_config = cls.parse_args(cls.raw_args(arg_string, additional_config))
        hub = {k: load[k] for k in ("revision", "trust_remote_code") if k in load}
        check_layer_kinds_offline(load.get("pretrained", cls.default_pretrained), vtr_config, **hub)

    def __init__(self, **model_args) -> None:
        super().__init__()
        self._warned: set = set()
        try:
            load, vtr_config = self.parse_args(model_args)
        except ValueError as error:  # unknown key, bad value: stop the run, not just this task
            compat.exit_on_argument_error(error, self.name)
        self._load(load, vtr_config)
        compat.LIVE_MODELS.add(self)

    @classmethod
    def parse_args(cls, model_args: dict):
        """(loading keys, VTRConfig) of `--model_args` given as key -> value; ValueError names a bad one."""
        load, vtr_config = parse_model_args(model_args, cls.load_args())
        if load.get("batch_size", 1) < 1:
            raise ValueError(f"batch_size={load['batch_size']}: must be >= 1")
        if load.get("max_batch_size") is not None:
            raise ValueError(f"max_batch_size: {cls.name} has no automatic batch size; set batch_size=N")
        dtype_name = load.get("dtype")
        if dtype_name not in (None, "auto") and not isinstance(getattr(torch, dtype_name, None), torch.dtype):
            raise ValueError(f"dtype={dtype_name!r} is not a torch dtype (float16, bfloat16, float32 or auto)")
        cls.check_load_args(load)
        return load, vtr_config

    def _load(self, load: dict, vtr_config: VTRConfig) -> None:
        self.pretrained = load.get("pretrained", self.default_pretrained)
        self.batch_size_per_gpu = load.get("batch_size", 1)
        self.use_cache = load.get("use_cache", True)
        self.default_max_new_tokens = load.get("max_new_tokens", self.MAX_NEW_TOKENS)
        self.stats_path = load.get("stats_path")

        accelerator = Accelerator()
        cuda = torch.cuda.is_available()
        device = load.get("device") or ("cuda" if cuda else "cpu")
        device_map = load.get("device_map", "")
        if accelerator.num_processes > 1:  # data parallel: one whole model per process
            device = f"cuda:{accelerator.local_process_index}" if cuda else "cpu"
            device_map = device if cuda else ""
        dtype_name = load.get("dtype", "auto" if cuda else "float32")
        kwargs = dict(
            dtype=dtype_name if dtype_name == "auto" else getattr(torch, dtype_name),
            trust_remote_code=load.get("trust_remote_code", False),
        )
        for key in ("revision", "attn_implementation"):
            if load.get(key) is not None:
                kwargs[key] = load[key]
        if device_map:
            kwargs["device_map"] = device_map
        try:  # a checkpoint that is not there or not this backbone, a device that does not exist, ...
            model, processor = self.load_backbone(load, **kwargs)
            model.set_vtr_config(vtr_config)  # checks that depend on the model (prune layer vs depth)
            if not device_map:
                model.to(device)
        except (OSError, ValueError, TypeError, RuntimeError, ImportError) as error:
            compat.exit_on_argument_error(error, self.name)
        # with device_map, inputs go where the embeddings are
        self._device = torch.device(device) if not device_map else model.get_input_embeddings().weight.device
        processor.tokenizer.padding_side = "left"
        self._model, self.processor, self.tokenizer = model, processor, processor.tokenizer
        self.configure(load)
        # the model may have filled in its backbone's default budget
        self.vtr_config = model.vtr_config
        self.vtr_tag = describe(self.vtr_config)
        self.accelerator = accelerator
        # the global rank and world size: lmms-eval shards the requests by them (the local rank repeats per node)
        self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        self._stats = RunStats(model.config.get_text_config(), self.visual_token_ids())
        # requests handed to us (counted by lmms_eval_compat when --use_cache is on) vs computed here
        self.requests_seen: dict[str, int] = {}
        self._merged_ranks = 0
        self.requests_computed = {"generate_until": 0, "loglikelihood": 0}
        model.register_forward_pre_hook(self._stats.before_forward, with_kwargs=True)
        model.register_forward_hook(self._stats.after_forward, with_kwargs=True)
        logger.info(f"{self.name}: {self.pretrained} with {self.vtr_config} (tag {self.vtr_tag}) on {self._device}")

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

    # ------------------------------------------------------------------ requests

    def doc_visuals(self, doc_to_visual, doc_id, task, split) -> list:
        """The doc's visuals, flattened, through `prepare_visuals`."""
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        flat = []
        for v in visuals or []:
            flat.extend(v if isinstance(v, (list, tuple)) else [v])
        return self.prepare_visuals(flat)

    def generation_kwargs(self, gen_kwargs: dict) -> dict:
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        do_sample = bool(gen_kwargs.get("do_sample", False)) or temperature > 0
        kwargs = dict(
            max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.default_max_new_tokens)),
            do_sample=do_sample,
            num_beams=int(gen_kwargs.get("num_beams", 1) or 1),
            use_cache=self.use_cache,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.eot_token_id,
        )
        if do_sample:
            kwargs["temperature"] = temperature or 1.0
            if gen_kwargs.get("top_p") is not None:
                kwargs["top_p"] = float(gen_kwargs["top_p"])
            if gen_kwargs.get("top_k") is not None:
                kwargs["top_k"] = int(gen_kwargs["top_k"])
        for key in PASSED_GENERATION_KWARGS:
            if gen_kwargs.get(key) is not None:
                kwargs[key] = gen_kwargs[key]
        ignored = sorted(set(gen_kwargs) - set(kwargs) - HANDLED_GENERATION_KWARGS)
        if ignored and tuple(ignored) not in self._warned:
            self._warned.add(tuple(ignored))
            logger.warning(f"{self.name}: generation_kwargs {ignored} are not used by this model")
        return kwargs

    def generate_until(self, requests) -> list[str]:
        try:
            return self._generate_until(requests)
        except Exception as error:  # lmms-eval's CLI would log it and exit 0
            compat.exit_on_run_error(error, self.name)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(loss, is_greedy) of each continuation: the loss is its mean negative log-likelihood per token, what
        lmms-eval's own models return (its multiple_choice scoring takes the option with the smallest). The
        context (visuals + question) is pruned on its own, as for generation, once per document, and each
        continuation is then scored against that pruned KV cache: every option of a multiple-choice question
        sees the same kept visual tokens, the answer never picks them, and a question costs one prefill."""
        try:
            return self._loglikelihood(requests)
        except Exception as error:
            compat.exit_on_run_error(error, self.name)

    def _generate_until(self, requests) -> list[str]:
        self.requests_computed["generate_until"] += len(requests)
        self._stats.kind = "generate_until"
        results = []

        def order(args):
            return -len(self.tokenizer.encode(args[0])), args[0]

        collator = utils.Collator([r.args for r in requests], order, grouping=True)
        batches = collator.get_batched(n=self.batch_size, batch_fn=None)
        total = math.ceil(len(requests) / self.batch_size)
        bar = tqdm(total=total, disable=self.rank != 0, desc=f"{self.name} generate")
        for batch in batches:
            contexts, all_gen_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*batch)
            gen_kwargs = dict(all_gen_kwargs[0])
            until = gen_kwargs.pop("until", None) or [self.tokenizer.decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            prompts, visuals = [], []
            for context, visual_fn, doc_id, task, split in zip(contexts, doc_to_visual, doc_ids, tasks, splits):
                doc_visuals = self.doc_visuals(visual_fn, doc_id, task, split)
                visuals.append(doc_visuals)
                prompts.append(self.build_prompt(context, doc_visuals))
            inputs = self.encode(prompts, visuals)
            with torch.inference_mode():
                output = self._model.generate(**inputs, **self.generation_kwargs(gen_kwargs))
            texts = self.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for text in map(self.answer_of, texts):
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                text = text.strip()
                results.append(text)
            bar.update(1)
        bar.close()
        return collator.get_original(results)

    def _loglikelihood(self, requests) -> list[tuple[float, bool]]:
        self.requests_computed["loglikelihood"] += len(requests)
        self._stats.kind = "loglikelihood"
        # one pruned prefill per document and context; each of its continuations (a multiple-choice
        # question's options) is scored on that cache
        docs: dict[tuple, tuple] = {}
        for i, request in enumerate(requests):
            context, continuation, visual_fn, doc_id, task, split = request.args
            if not isinstance(continuation, str):
                continuation = continuation(self.task_dict[task][split][doc_id])
            docs.setdefault((task, split, doc_id, context), (visual_fn, []))[1].append((i, continuation))
        results: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc=f"{self.name} loglikelihood")
        for (task, split, doc_id, context), (visual_fn, options) in docs.items():
            visuals = self.doc_visuals(visual_fn, doc_id, task, split)
            inputs = self.encode([self.build_prompt(context, visuals)], [visuals])
            targets = [
                self.tokenizer(c, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self._device)
                for _, c in options
            ]
            for (i, _), target, logprobs in zip(options, targets, self.continuations_logprobs(inputs, targets)):
                tokens = target[0]
                loss = -float(logprobs.gather(1, tokens[:, None]).mean())
                results[i] = (loss, bool((logprobs.argmax(-1) == tokens).all()))
            bar.update(len(options))
        bar.close()
        return results

    def continuation_logprobs(self, inputs, target: torch.Tensor) -> torch.Tensor:
        """[len(target), vocab] log-probabilities of each token of one continuation [1, len] (one sample)."""
        return self.continuations_logprobs(inputs, [target])[0]

    @torch.inference_mode()
    def continuations_logprobs(self, inputs, targets: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per continuation [1, len]: [len, vocab] log-probabilities of its tokens. One pruned prefill of the
        context (one sample); each continuation is then one decode chunk on its cache, which is put back as the
        context left it after it (`cache_restorer`)."""
        out = self._model(**inputs, use_cache=True)
        cache, first = out.past_key_values, out.logits[0, -1:].float()
        restore = cache_restorer(cache)
        context_len = inputs["input_ids"].shape[1]
        results = []
        for target in targets:
            logits = [first]
            if target.shape[1] > 1:
                mask = torch.ones(1, context_len + target.shape[1] - 1, dtype=torch.long, device=target.device)
                rest = self._model(
                    input_ids=target[:, :-1], attention_mask=mask, past_key_values=cache, use_cache=True
                )  # fmt: skip
                logits.append(rest.logits[0].float())
                restore()
            results.append(torch.log_softmax(torch.cat(logits), dim=-1))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(f"{self.name} does not implement multi-round generation")

    # ------------------------------------------------------------------ efficiency record

    def stats_summary(self, response_cache: str | None = None) -> dict:
        summary = dict(
            model=self.name,
            pretrained=self.pretrained,
            vtr_tag=self.vtr_tag,
            vtr_config={k: getattr(self.vtr_config, k) for k in VTRConfig.field_names()},
            rank=self.rank,
            world_size=self.world_size,
            processes_merged=self._merged_ranks or 1,
            **self._stats.summary(),
        )
        from_cache = {
            kind: self.requests_seen[kind] - self.requests_computed.get(kind, 0)
            for kind in self.requests_seen
            if self.requests_seen[kind] > self.requests_computed.get(kind, 0)
        }
        summary["requests"] = dict(computed=dict(self.requests_computed), from_response_cache=from_cache)
        summary["response_cache"] = response_cache
        # answers lmms-eval took from its response cache: no prefill ran for them, so no figure covers them
        summary["from_cache"] = sum(from_cache.values())
        if from_cache and not any(self.requests_computed.values()):
            summary["note"] = (
                "every answer came from lmms-eval's response cache (--use_cache): nothing was computed, so "
                "prefills is 0 and the means are null; rerun without --use_cache to measure"
            )
        elif from_cache:
            summary["note"] = (
                "some answers came from lmms-eval's response cache (--use_cache) and were not recomputed; "
                "the timings and kept-token figures cover the computed requests only"
            )
        return summary

    def write_stats(self, folder: Path, date_id: str, response_cache: str | None = None) -> Path | None:
        """Write the efficiency record beside `<date_id>_results.json` in `folder` (lmms_eval_compat calls
        this when lmms-eval saves the results), or to `stats_path=` when that was given. With several
        processes, once `_merge_ranks` gathered every process's figures, process 0 alone writes the one
        record; processes that could not be merged (no torch.distributed) each write `..._rank<r>.json`."""
        if self.stats_path and date_id:  # clean() writes to the explicit path
            return None
        merged = self.world_size <= 1 or self._merged_ranks
        if merged and self.rank != 0:  # process 0 holds the same merged record
            return None
        suffix = "" if merged else f"_rank{self.rank}"
        if self.stats_path:
            path = Path(self.stats_path)
            path = path / f"vtr_stats_{self.vtr_tag}.json" if path.suffix != ".json" else path
            path = path.with_name(f"{path.stem}{suffix}.json")
        else:
            path = Path(folder) / f"vtr_stats_{self.vtr_tag}_{date_id}{suffix}.json"
        summary = self.stats_summary(response_cache)
        summary["results_timestamp"] = date_id or None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2, default=str))
        logger.info(f"{self.name}: wrote efficiency stats to {path}")
        return path

    def _merge_ranks(self) -> None:
        """With several processes, gather every process's per-prefill figures and request counts into
        process 0, whose record then covers the whole run (lmms-eval saves results from process 0 only)."""
        import torch.distributed as dist

        if self.world_size <= 1 or not (dist.is_available() and dist.is_initialized()) or self._merged_ranks:
            return
        mine = (self._stats.samples, self.requests_seen, self.requests_computed)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        self._stats.samples = [sample for samples, _, _ in gathered for sample in samples]
        for index, counts in ((1, "requests_seen"), (2, "requests_computed")):
            total: dict[str, int] = {}
            for part in gathered:
                for kind, n in part[index].items():
                    total[kind] = total.get(kind, 0) + n
            setattr(self, counts, total)
        self._merged_ranks = len(gathered)

    def clean(self):
        self._merge_ranks()
        summary = self.stats_summary()
        logger.info(f"{self.name} efficiency: {json.dumps({k: v for k, v in summary.items() if k != 'vtr_config'})}")
        if self.stats_path:  # an explicit path is written even when lmms-eval saves no results
            self.write_stats(Path(self.stats_path), "")
        super().clean()


def cache_restorer(cache):
    """A function that puts `cache` back as it is now, after more tokens ran on it: an attention layer's rows are
    cut back to its own length (pruning may leave the layers' caches of different lengths); a recurrent layer
    (linear attention: Qwen3.5) holds no rows but convolution and recurrent states that a step updates in place,
    which are copied back."""
    held = []
    for layer in cache.layers:
        if hasattr(layer, "recurrent_states"):
            states = (layer.conv_states, layer.recurrent_states)
            held.append([(store, i, t.clone()) for store in states for i, t in store.items() if t is not None])
        else:
            held.append(layer.get_seq_length())

    def restore() -> None:
        for layer, saved in zip(cache.layers, held):
            if isinstance(saved, int):
                layer.crop(saved - layer.get_seq_length())
            else:
                for store, i, state in saved:
                    store[i].copy_(state)

    return restore


class RunStats:
    """Per-prefill efficiency figures, accumulated over a run (forward hooks on the model)."""

    def __init__(self, text_config, visual_token_ids: list[int]):
        self.costs = layer_costs(text_config)
        self.num_layers = text_config.num_hidden_layers
        self.visual_token_ids = list(visual_token_ids)
        self.samples: list[dict] = []
        self._start = None
        self.kind = "forward"  # which request type the next prefills serve (set by the plugin)

    def before_forward(self, module, args, kwargs):
        # a prefill with visuals: pixels, or (generate() in transformers 5) pre-encoded `mm_encoder_outputs`
        if module.vtr_adapter.has_visual_input(kwargs):
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
        ids = torch.tensor(self.visual_token_ids, device=input_ids.device)
        visual_counts = torch.isin(input_ids, ids).sum(1).tolist()
        seq_lens = valid.sum(1).tolist() if valid is not None else [input_ids.shape[1]] * input_ids.shape[0]
        record = module.vtr_last
        for b in range(input_ids.shape[0]):
            seq_len, visual = int(seq_lens[b]), int(visual_counts[b])
            stages, schedule = [], []
            for stage in record.stages if record is not None else []:
                before, kept = stage.image_tokens_before[b], stage.image_tokens_kept[b]
                merged = stage.merged[b] if stage.merged else 0  # recycled tokens stay in the sequence
                stages.append(dict(layer=stage.layer, image_in=before, image_kept=kept, merged=merged))
                schedule.append((stage.layer, before - kept - merged))
            lengths = tokens_per_layer(seq_len, self.num_layers, schedule)
            self.samples.append(
                dict(
                    seq_len=seq_len,
                    image_tokens=visual,
                    stages=stages,
                    equivalent_tokens=equivalent_tokens(lengths),
                    flops_ratio=1 / ideal_speedup_of(self.costs, seq_len, lengths),
                    prefill_ms=elapsed / input_ids.shape[0],
                    kind=self.kind,
                )
            )

    def summary(self) -> dict:
        def mean(values):
            values = list(values)
            return sum(values) / len(values) if values else None

        def block(samples: list[dict]) -> dict:
            by_layer: dict[int, list[dict]] = {}
            for s in samples:
                for stage in s["stages"]:
                    by_layer.setdefault(stage["layer"], []).append(stage)
            flops_ratio = mean(s["flops_ratio"] for s in samples)
            return dict(
                prefills=len(samples),
                mean_seq_len=mean(s["seq_len"] for s in samples),
                mean_image_tokens=mean(s["image_tokens"] for s in samples),
                per_prune_layer=[
                    dict(
                        layer=layer,
                        mean_image_tokens_in=mean(x["image_in"] for x in items),
                        mean_image_tokens_kept=mean(x["image_kept"] for x in items),
                        mean_merged_tokens=mean(x["merged"] for x in items),
                    )
                    for layer, items in sorted(by_layer.items())
                ],
                mean_equivalent_tokens=mean(s["equivalent_tokens"] for s in samples),
                prefill_flops_ratio=flops_ratio,
                # analytic: unpruned decoder FLOPs / pruned decoder FLOPs (cost.py); not a measured time
                ideal_prefill_speedup=1 / flops_ratio if flops_ratio else None,
                mean_prefill_ms=mean(s["prefill_ms"] for s in samples),
                prefill_ms=spread([s["prefill_ms"] for s in samples]),
                prefill_ms_samples=[s["prefill_ms"] for s in samples],  # in request order, process 0's first
            )

        out = block(self.samples)
        out["by_request_type"] = {
            kind: block([s for s in self.samples if s["kind"] == kind])
            for kind in sorted({s["kind"] for s in self.samples})
        }
        return out
