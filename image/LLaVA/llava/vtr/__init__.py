"""Visual token reduction for LLaVA-1.5, 1.6 and OneVision (LLaVA-Video) on transformers' stock
`LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration` and `LlavaOnevisionForConditionalGeneration`.

from llava.vtr import VTRConfig, load_model
model = load_model("llava-hf/llava-1.5-7b-hf", VTRConfig(strategy="fastv", keep_tokens=64, prune_layer=2))
model.generate(**inputs)
model.vtr_last.stages[0].kept_positions   # what was kept
"""

from .api import load_model, load_processor, wrap
from .config import VTRConfig, VTRConfigError
from .modeling import (
    LlavaAdapter,
    LlavaNextAdapter,
    LlavaOnevisionAdapter,
    StageRecord,
    VTRLlavaForConditionalGeneration,
    VTRLlavaNextForConditionalGeneration,
    VTRLlavaOnevisionForConditionalGeneration,
    VTRRecord,
)
from .strategy import PruningStrategy, available_strategies, get_strategy, register_strategy

__all__ = [
    "BACKBONES",
    "PruningStrategy",
    "StageRecord",
    "VTRConfig",
    "VTRConfigError",
    "VTRLlavaForConditionalGeneration",
    "VTRLlavaNextForConditionalGeneration",
    "VTRLlavaOnevisionForConditionalGeneration",
    "VTRRecord",
    "available_strategies",
    "get_strategy",
    "load_model",
    "load_processor",
    "register_strategy",
    "wrap",
]

#: Model families this fork has an adapter for, with that adapter (scripts/capability_matrix.py reads it: a
#: method runs on a family whose adapter provides every fact it `requires`).
BACKBONES = {"LLaVA-1.5": LlavaAdapter, "LLaVA-1.6": LlavaNextAdapter, "LLaVA-OneVision": LlavaOnevisionAdapter}
