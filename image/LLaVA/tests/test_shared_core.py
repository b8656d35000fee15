"""The shared core works on its own in every fork that copies it (this file is copied too, per package)."""

import importlib

import torch

from llava.vtr.attention import ScoringAttention
from llava.vtr.config import VTRConfig
from llava.vtr.engine import BackboneAdapter, TokenState
from llava.vtr.strategy import available_strategies
from llava.vtr.strategy.base import select_batch


def test_every_shared_module_imports_from_this_package():
    for name in ("engine", "attention", "config", "model_args", "cost", "strategy"):
        module = importlib.import_module(f"llava.vtr.{name}")
        assert module.__name__.startswith("llava.vtr")
    assert {"fastv", "priortr", "random"} <= set(available_strategies())
    assert BackboneAdapter.anchor_row(None, 7) == 7  # question-free row: the first after the span


def test_batched_selection_keeps_each_samples_best_visual_tokens_in_order():
    scores = torch.tensor([[9.0, 0.1, 0.7, 0.3, 0.9], [0.0, 0.5, 0.5, 0.2, 9.0]])
    visual = torch.tensor([[False, True, True, True, True], [True, True, True, True, False]])
    keep = select_batch(scores, visual, VTRConfig(keep_tokens=2).stage_budget(0))
    assert keep.tolist() == [[False, False, True, False, True], [False, True, True, False, False]]


def test_token_state_gathers_every_row_tensor_and_fills_re_padding():
    state = TokenState(
        hidden=torch.arange(8.0).view(1, 4, 2),
        valid=torch.ones(1, 4, dtype=torch.bool),
        original_index=torch.arange(4).view(1, 4),
        positions=torch.arange(4).view(1, 4, 1).expand(1, 4, 3),  # M-RoPE-like extra rows
    )
    state.gather(torch.tensor([[0, 1, 3]]), torch.tensor([[False, True, True]]))
    assert state.hidden[0, 2].tolist() == [6.0, 7.0]
    assert state.original_index.tolist() == [[-1, 1, 3]] and state.valid.tolist() == [[False, True, True]]
    assert state.positions[0, :, 0].tolist() == [0, 1, 3]


def test_scoring_attention_is_causal():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    attn = ScoringAttention(lambda rows: q[:, :, rows], k, torch.ones(1, 5, dtype=torch.bool), 2, 0.5)
    full = attn.full()
    assert torch.all(full.triu(1) == 0)
    torch.testing.assert_close(full.sum(-1), torch.ones(1, 2, 5))
