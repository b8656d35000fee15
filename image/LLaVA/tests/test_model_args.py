"""--model_args parsing: every VTRConfig field by name, typed from the dataclass; list forms; errors."""

import pytest

from llava.vtr import VTRConfig, VTRConfigError
from llava.vtr.lmms_eval_plugin import LOAD_ARGS
from llava.vtr.model_args import ModelArgsError, describe, parse_model_args, split_args, vtr_field_types


def parse(arg_string):
    return parse_model_args(split_args(arg_string), LOAD_ARGS)


def test_split_keeps_commas_inside_brackets_and_strips_quotes():
    assert split_args("a=1,b=[2,3, 4],c='x,y',d=") == {"a": "1", "b": "[2,3, 4]", "c": "x,y", "d": ""}
    with pytest.raises(ModelArgsError, match="not key=value"):
        split_args("pretrained=x,oops")


# One value for every VTRConfig field, written as a user would type it.
EVERY_FIELD = {
    "enabled": ("true", True),
    "strategy": ("priortr", "priortr"),
    "prune_layer": ("[2,6]", [2, 6]),
    "keep_tokens": ("[64,16]", [64, 16]),
    "score_threshold": ("0.01", 0.01),
    "keep_ratio": ("0.5", 0.5),
    "query_aggregation": ("question", "question"),
    "head_aggregation": ("max", "max"),
    "seed": ("7", 7),
    "priortr_eps": ("1e-5", 1e-5),
    "important_ratio": ("0.25", 0.25),
    "clse_cutoff": ("0.3", 0.3),
    "clse_temperature": ("2", 2.0),
    "clse_reference_layer": ("1", 1),
    "token_merge": ("false", False),
    "convention": ("common", "common"),
    "scoring_layer": ("own", "own"),
    "positions": ("compact", "compact"),
    "earlier_cache": ("trim", "trim"),
    "merge_ratio": ("0.2", 0.2),
    "merge_clusters": ("3", 3),
    "pivot_image_tokens": ("2", 2),
    "pivot_text_tokens": ("3", 3),
    "contextual_tokens": ("5", 5),
    "hiprune_alpha": ("0.2", 0.2),
    "hiprune_layer": ("-4", -4),
    "fastvid_segments": ("6", 6),
    "fastvid_tau": ("0.84", 0.84),
    "fastvid_anchor_share": ("0.5", 0.5),
    "fastvid_anchor_stride": ("2", 2),
    "fastvid_beta": ("0.7", 0.7),
    "fastvid_tree": ("qwen2_5_vl", "qwen2_5_vl"),
    "holitom_tau": ("0.65", 0.65),
    "holitom_beta": ("0.5", 0.5),
    "holitom_neighbours": ("5", 5),
    "holitom_layer": ("12", 12),
    "holitom_inner_ratio": ("0.3", 0.3),
    "dycoke_layer": ("2", 2),
    "dycoke_decode_prune": ("0.7", 0.7),
    "dycoke_gate": ("0.8", 0.8),
    "framefusion_threshold": ("0.5", 0.5),
    "framefusion_cost": ("0.4", 0.4),
    "framefusion_min_similar": ("0.2", 0.2),
}


def test_every_vtr_field_is_accepted_by_name():
    assert set(EVERY_FIELD) == set(vtr_field_types()), "add the new VTRConfig field to EVERY_FIELD"
    loading, cfg = parse(",".join(f"{k}={v}" for k, (v, _) in EVERY_FIELD.items()) + ",pretrained=/m,batch_size=4")
    for key, (_, expected) in EVERY_FIELD.items():
        assert getattr(cfg, key) == expected, key
    assert loading == {"pretrained": "/m", "batch_size": 4}


@pytest.mark.parametrize("written", ["[3,7,16]", "3;7;16", "[3;7;16]", "[ 3, 7, 16 ]"])
def test_list_forms(written):
    _, cfg = parse(f"prune_layer={written},keep_tokens=64")
    assert cfg.prune_layers == [3, 7, 16]


def test_scalars_bools_and_none():
    _, cfg = parse("prune_layer=2,keep_tokens=none,keep_ratio=0.25,enabled=False")
    assert cfg.prune_layer == 2 and cfg.keep_tokens is None and cfg.keep_ratio == 0.25 and not cfg.enabled
    loading, _ = parse("use_cache=no,trust_remote_code=1,attn_implementation=None")
    assert loading == {"use_cache": False, "trust_remote_code": True, "attn_implementation": None}
    _, cfg = parse("strategy=none")
    assert cfg.enabled is False


def test_already_typed_values_pass_through():
    loading, cfg = parse_model_args({"keep_tokens": 32, "batch_size": 2, "device": "cpu"}, LOAD_ARGS)
    assert cfg.keep_tokens == 32 and loading == {"batch_size": 2, "device": "cpu"}


@pytest.mark.parametrize(
    "arg,message",
    [
        ("keep_tokens=abc", "keep_tokens='abc' does not parse as int | list | None"),
        ("prune_layer=[2,x]", "prune_layer='[2,x]' does not parse as int | list"),
        ("seed=1.5", "seed='1.5' does not parse as int"),
        ("enabled=maybe", "enabled='maybe' does not parse as bool"),
        ("batch_size=auto", "batch_size='auto' does not parse as int"),
    ],
)
def test_bad_types_are_named(arg, message):
    with pytest.raises(ModelArgsError, match=message.replace("|", r"\|").replace("[", r"\[")):
        parse(arg)


def test_unknown_key_suggests_and_lists_valid_keys():
    with pytest.raises(ModelArgsError) as err:
        parse("pretrained=x,prune_layers=3")
    message = str(err.value)
    assert "unknown model_args key 'prune_layers' (did you mean 'prune_layer'?)" in message
    for key in ["pretrained", "conv_template", "keep_tokens", "priortr_eps"]:
        assert key in message


def test_range_errors_come_from_vtrconfig():
    with pytest.raises(VTRConfigError, match="keep_ratio"):
        parse("keep_ratio=2")


def test_describe_tags_name_what_changes_results():
    assert describe(VTRConfig(strategy="none")) == "unpruned"
    # method options that differ from their defaults are named too (distinct result folders)
    tag = describe(VTRConfig(strategy="vispruner", prune_layer=0, keep_tokens=64, important_ratio=0.25))
    assert tag == "vispruner_K0_keep64_important_ratio0.25"
    assert describe(VTRConfig(strategy="sparsevlm", token_merge=True)).endswith("_token_mergeTrue")
    assert describe(VTRConfig(strategy="fastv", keep_tokens=64, prune_layer=2)) == "fastv_K2_keep64"
    tag = describe(VTRConfig(strategy="random", prune_layer=[2, 5], keep_ratio=[0.5, 0.25], seed=3))
    assert tag == "random_K2-5_ratio0.5-0.25_seed3"
