"""Visual token reduction for the Qwen-VL families on transformers' stock classes: Qwen3-VL (dense and MoE,
DeepStack), Qwen2.5-VL, Qwen2-VL and Qwen3.5 (dense and MoE, a hybrid linear/full-attention decoder); images and
videos, M-RoPE kept exact.

from visual_token_pruning import VTRConfig, load_model, load_processor
model = load_model("Qwen/Qwen3-VL-2B-Instruct", VTRConfig(strategy="fastv", keep_tokens=64, prune_layer=2))
model.generate(**inputs)
model.vtr_last.stages[0].kept_positions   # what was kept
"""

from .api import load_model, load_processor, wrap
from .config import VTRConfig, VTRConfigError
from .modeling import (
    StageRecord,
    VTRQwen2_5_VLForConditionalGeneration,
    VTRQwen2VLForConditionalGeneration,
    VTRQwen3_5ForConditionalGeneration,
    VTRQwen3_5MoeForConditionalGeneration,
    VTRQwen3VLForConditionalGeneration,
    VTRQwen3VLMoeForConditionalGeneration,
    VTRRecord,
)
from .strategy import PruningStrategy, available_strategies, get_strategy, register_strategy

__version__ = "0.1.0"

__all__ = [
    "BACKBONES",
    "PruningStrategy",
    "StageRecord",
    "VTRConfig",
    "VTRConfigError",
    "VTRQwen2VLForConditionalGeneration",
    "VTRQwen2_5_VLForConditionalGeneration",
    "VTRQwen3VLForConditionalGeneration",
    "VTRQwen3VLMoeForConditionalGeneration",
    "VTRQwen3_5ForConditionalGeneration",
    "VTRQwen3_5MoeForConditionalGeneration",
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
BACKBONES = {
    "Qwen3-VL": VTRQwen3VLForConditionalGeneration.vtr_adapter_class,
    "Qwen3-VL-MoE": VTRQwen3VLMoeForConditionalGeneration.vtr_adapter_class,
    "Qwen2.5-VL": VTRQwen2_5_VLForConditionalGeneration.vtr_adapter_class,
    "Qwen2-VL": VTRQwen2VLForConditionalGeneration.vtr_adapter_class,
    "Qwen3.5": VTRQwen3_5ForConditionalGeneration.vtr_adapter_class,
    "Qwen3.5-MoE": VTRQwen3_5MoeForConditionalGeneration.vtr_adapter_class,
}
