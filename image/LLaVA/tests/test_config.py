"""Every invalid config value gets an error that names the field, the value and the allowed range."""

import logging

import pytest
import torch

from llava.vtr import VTRConfig, VTRConfigError
from llava.vtr.strategy.registry import UnknownStrategyError


def test_defaults_are_llava_15s():
    cfg = VTRConfig()
    assert cfg.enabled and cfg.strategy == "fastv"
    assert cfg.prune_layers == [3] and cfg.keep_tokens == 192
    assert cfg.stage_budget(0).keep_tokens == 192


def test_ratio_alone_is_not_overridden_by_the_default_keep_tokens():
    cfg = VTRConfig(keep_ratio=0.25)
    assert cfg.keep_tokens is None and cfg.stage_budget(0) == (None, None, 0.25)


def test_none_strategy_disables():
    assert VTRConfig(strategy="none").enabled is False
    assert VTRConfig(strategy="None ").enabled is False


@pytest.mark.parametrize(
    "kwargs,field,fragment",
    [
        (dict(prune_layer=0), "prune_layer", ">= 1 for 'fastv'"),
        (dict(prune_layer=-1), "prune_layer", "integer >= 0 (0 = before the first decoder layer"),
        (dict(prune_layer=[3, 3]), "prune_layer", "strictly increasing"),
        (dict(prune_layer=[5, 2]), "prune_layer", "strictly increasing"),
        (dict(prune_layer=[]), "prune_layer", "at least one"),
        (dict(prune_layer=2.5), "prune_layer", "integer"),
        (dict(keep_tokens=-1), "keep_tokens", "integer >= 0"),
        (dict(keep_tokens=1.5), "keep_tokens", "integer >= 0"),
        (dict(keep_tokens=True), "keep_tokens", "integer >= 0"),
        (dict(keep_ratio=1.5), "keep_ratio", "[0, 1]"),
        (dict(keep_ratio=-0.1), "keep_ratio", "[0, 1]"),
        (dict(score_threshold=float("nan")), "score_threshold", "finite"),
        (dict(prune_layer=[2, 4], keep_tokens=[64, 32, 16]), "keep_tokens", "one value per prune layer"),
        (dict(query_aggregation="first"), "query_aggregation", "'last', 'question'"),
        (dict(head_aggregation="sum"), "head_aggregation", "'mean', 'max'"),
        (dict(seed="x"), "seed", "integer"),
        (dict(enabled="yes"), "enabled", "True or False"),
        (dict(priortr_eps=0), "priortr_eps", "(0, 1)"),
    ],
)
def test_invalid_values_name_field_value_and_range(kwargs, field, fragment):
    with pytest.raises(VTRConfigError) as err:
        VTRConfig(**kwargs)
    message = str(err.value)
    assert f"VTRConfig.{field}=" in message and fragment in message
    assert repr(kwargs[field] if field in kwargs else None) in message


def test_unknown_strategy_lists_the_registered_ones():
    with pytest.raises(UnknownStrategyError, match="fastv.*priortr.*random"):
        VTRConfig(strategy="fastvv")


def test_several_budgets_warn_which_one_wins(caplog):
    with caplog.at_level(logging.WARNING):
        VTRConfig(keep_tokens=64, keep_ratio=0.5)
    assert "keep_tokens takes priority" in caplog.text


def test_rising_per_stage_counts_warn(caplog):
    with caplog.at_level(logging.WARNING):
        VTRConfig(prune_layer=[2, 4], keep_tokens=[16, 8])
    assert "rises" not in caplog.text
    with caplog.at_level(logging.WARNING):
        VTRConfig(prune_layer=[2, 4], keep_tokens=[8, 16])
    assert "keep_tokens=[8, 16] rises" in caplog.text


def test_prune_layer_past_the_last_layer_is_rejected_with_the_layer_count(tiny_path):
    from llava.vtr import load_model

    with pytest.raises(VTRConfigError, match=r"4 decoder layers, so a prune layer must be at most 3"):
        load_model(tiny_path, VTRConfig(prune_layer=4))
    model = load_model(tiny_path, VTRConfig(prune_layer=3))
    model.vtr_config = VTRConfig(prune_layer=[2, 9])  # set behind the setter's back: still caught at forward
    with pytest.raises(VTRConfigError, match="prune_layer"):
        model(input_ids=torch.tensor([[1, model.config.image_token_id]]), pixel_values=torch.zeros(1, 3, 64, 64))


def test_bad_strategy_output_is_a_clear_error(tiny_path, single_inputs):
    from llava.vtr import PruningStrategy, load_model, register_strategy

    @register_strategy("test_wrong_length")
    class Wrong(PruningStrategy):
        needs_attention = False

        def compute_scores(self, attention, image_token_range, config, **ctx):
            return torch.zeros(3)

    model = load_model(tiny_path, VTRConfig(strategy="test_wrong_length", prune_layer=2))
    with pytest.raises(ValueError, match=r"must return a tensor of 64 scores.*got \(3,\)"):
        model(**single_inputs)


def test_static_cache_and_non_empty_cache_are_refused(tiny_path, single_inputs):
    from transformers import DynamicCache

    from llava.vtr import load_model

    model = load_model(tiny_path, VTRConfig(prune_layer=2, keep_tokens=4))
    with pytest.raises(ValueError, match="DynamicCache"):
        model.generate(**single_inputs, max_new_tokens=2, cache_implementation="static")
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        model(input_ids=single_inputs["input_ids"][:, :2], past_key_values=cache)
        with pytest.raises(ValueError, match="empty KV cache"):
            model(**single_inputs, past_key_values=cache)
