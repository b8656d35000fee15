"""Visual token reduction for Video-LLaVA on transformers' stock `VideoLlavaForConditionalGeneration`.

from videollava.vtr import VTRConfig, load_model, load_processor
from videollava.vtr.prompts import encode, video_prompt
model = load_model("LanguageBind/Video-LLaVA-7B-hf", VTRConfig(strategy="fastv", keep_tokens=514, prune_layer=2))
inputs = encode(processor, [video_prompt("What happens?")], videos=[clip.frames])
model.generate(**inputs)
model.vtr_last.stages[0].kept_positions   # what was kept
"""

from .api import load_model, load_processor, wrap
from .config import VTRConfig, VTRConfigError
from .modeling import StageRecord, VTRRecord, VTRVideoLlavaForConditionalGeneration
from .strategy import PruningStrategy, available_strategies, get_strategy, register_strategy

__all__ = [
    "BACKBONES",
    "PruningStrategy",
    "StageRecord",
    "VTRConfig",
    "VTRConfigError",
    "VTRRecord",
    "VTRVideoLlavaForConditionalGeneration",
    "available_strategies",
    "get_strategy",
    "load_model",
    "load_processor",
    "register_strategy",
    "wrap",
]

#: Model families this fork has an adapter for, with that adapter (scripts/capability_matrix.py reads it: a
#: method runs on a family whose adapter provides every fact it `requires`).
BACKBONES = {"Video-LLaVA": VTRVideoLlavaForConditionalGeneration.vtr_adapter_class}
