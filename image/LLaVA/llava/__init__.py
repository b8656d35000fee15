"""LLaVA fork of vtr: visual token reduction on the stock transformers LLaVA classes (see `llava.vtr`)."""

__version__ = "0.1.0"
