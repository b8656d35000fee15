"""Visual token reduction for InternVL2.5 and InternVL3 on transformers' stock `InternVLForConditionalGeneration`.

from internvl_vtr import VTRConfig, load_model, load_processor
model = load_model("OpenGVLab/InternVL3-2B-hf", VTRConfig(strategy="fastv", keep_tokens=256, prune_layer=2))
model.generate(**inputs)
model.vtr_last.stages[0].kept_positions   # what was kept
"""

from .api import load_model, load_processor, wrap
from .config import VTRConfig, VTRConfigError
from .modeling import InternVLAdapter, StageRecord, VTRInternVLForConditionalGeneration, VTRRecord
from .strategy import PruningStrategy, available_strategies, get_strategy, register_strategy

__version__ = "0.1.0"

__all__ = [
    "BACKBONES",
    "PruningStrategy",
    "StageRecord",
    "VTRConfig",
    "VTRConfigError",
    "VTRInternVLForConditionalGeneration",
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
BACKBONES = {"InternVL2.5": InternVLAdapter, "InternVL3": InternVLAdapter}
