"""Visual token reduction for Video-LLaVA: see videollava.vtr."""

__version__ = "0.1.0"
