import json

import pytest

from speedlm.errors import SpeedlmError
from speedlm.models import ModelConfig, build_model, preset_config, resolve_config


def test_json_round_trip_preserves_every_field():
    cfg = preset_config("linear-hybrid-small", vocab_size=512)
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(again.to_json()) == json.loads(cfg.to_json())


def test_pattern_tiles_layers_and_letters_carry_layer_specs():
    cfg = ModelConfig(
        n_layers=4,
        pattern="LA",
        layers={"L": {"mixer": "linear_attention", "ffn": "none"}, "A": {"mixer": {"name": "attention", "kv_heads": 2}}},
    )
    specs = cfg.layer_specs()
    assert [s["mixer"]["name"] for s in specs] == ["linear_attention", "attention"] * 2
    # per-letter FFN, the model-wide default elsewhere; string shorthands normalised
    assert [s["ffn"]["name"] for s in specs] == ["none", "swiglu"] * 2
    assert all(s["block"] == {"name": "prenorm"} for s in specs)
    assert cfg.layers["L"]["mixer"] == {"name": "linear_attention"}
    model = build_model(cfg)
    assert model.blocks[0].ffn is None and model.blocks[1].ffn is not None
    assert [b.mixer.dims.layer_idx for b in model.blocks] == [0, 1, 2, 3]
    assert all(b.mixer.dims.n_layers == 4 and b.mixer.dims.max_seq_len == cfg.max_seq_len for b in model.blocks)


def test_foundation_config_json_still_loads():
    """The foundation wrote a `mixers` table of mixer specs and `ffn` as a string."""
    old = {
        "d_model": 16, "ffn": "swiglu", "ffn_hidden": 32, "init_std": 0.02, "max_seq_len": 64,
        "mixers": {"A": {"kv_heads": 1, "name": "attention"}}, "n_heads": 2, "n_layers": 2, "norm_eps": 1e-06,
        "objective": "ar", "pattern": "A", "rope_theta": 10000.0, "tie_embeddings": True, "vocab_size": 32,
    }
    cfg = ModelConfig.from_dict(old)
    assert cfg.layers == {"A": {"mixer": {"name": "attention", "kv_heads": 1}}}
    assert cfg.ffn == {"name": "swiglu"}
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(SpeedlmError, match="not both"):
        ModelConfig.from_dict({**old, "layers": cfg.layers})


@pytest.mark.parametrize(
    "fields,needle",
    [
        (dict(pattern="AX"), "no entry in layers"),
        (dict(pattern="AAA", n_layers=4), "does not tile"),
        (dict(layers={"A": {"mixer": {"name": "nope"}}}), "unknown mixer 'nope'"),
        (dict(layers={"A": {"mixer": {"name": "attention", "windw": 3}}}), "has no option"),
        (dict(layers={"A": {"mixer": "attention", "ffn": "moe-ish"}}), r"layers\['A'\].ffn: unknown ffn 'moe-ish'"),
        (dict(layers={"A": {"mixer": "attention", "block": "macaron?"}}), "unknown block"),
        (dict(layers={"A": {"mixer": "attention", "norm": "x"}}), r"unknown key\(s\) \['norm'\]"),
        (dict(layers={"A": {"ffn": "swiglu"}}), "with a 'mixer'"),
        (dict(layers={"A": {"name": "attention"}}), "with a 'mixer'"),
        (dict(ffn="nope"), "ffn: unknown ffn 'nope'"),
        (dict(d_model=30, n_heads=4), "not divisible"),
        (dict(vocab_size=0), "vocab_size must be a positive integer"),
        (dict(pattern=""), "non-empty"),
        (dict(objective="mlm"), "objective"),
        (dict(init_std="big"), "init_std must be a positive number"),
    ],
)
def test_invalid_configs_raise_one_clear_error(fields, needle):
    with pytest.raises(SpeedlmError, match=needle):
        ModelConfig(**fields)


@pytest.mark.parametrize(
    "spec,needle",
    [
        ({"name": "sliding_window", "window": "abc"}, r"option 'window' of mixer 'sliding_window' must be int, got 'abc'"),
        ({"name": "sliding_window", "window": 2.5}, "must be int, got 2.5"),
        ({"name": "sliding_window", "window": True}, "must be int, got True"),
        ({"name": "attention", "kv_heads": "2"}, "must be int or null"),
        ({"name": "linear_attention", "normalize": "yes"}, "must be bool"),
        # bounds from the annotations, and checks against the model's sizes (check_options)
        ({"name": "sliding_window", "window": 0}, "option 'window' of mixer 'sliding_window' must be >= 1, got 0"),
        ({"name": "attention", "kv_heads": 0}, "must be >= 1"),
        ({"name": "attention", "kv_heads": 3}, "kv_heads=3 must be a positive divisor of n_heads=4"),
        ({"name": "linear_attention", "chunk_size": 0}, "'chunk_size' of mixer 'linear_attention' must be >= 1"),
    ],
)
def test_mixer_option_values_are_validated_with_the_config(spec, needle):
    with pytest.raises(SpeedlmError, match=needle) as e:
        ModelConfig(layers={"A": {"mixer": spec}})
    assert str(e.value).startswith("invalid model config: layers['A']") and "\n" not in str(e.value)


def test_ffn_option_values_are_validated():
    with pytest.raises(SpeedlmError, match="option 'hidden' of ffn 'swiglu' must be int or null"):
        ModelConfig(ffn={"name": "swiglu", "hidden": "wide"})
    with pytest.raises(SpeedlmError, match="'hidden' of ffn 'swiglu' must be >= 1, got -4"):
        ModelConfig(layers={"A": {"mixer": "attention", "ffn": {"name": "swiglu", "hidden": -4}}})


def test_unknown_json_field_and_bad_json():
    with pytest.raises(SpeedlmError, match="unknown field"):
        ModelConfig.from_dict({"d_modle": 3})
    with pytest.raises(SpeedlmError, match="not valid JSON"):
        ModelConfig.from_json("{oops")


def test_build_from_preset_dict_config_and_json_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(preset_config("gqa").to_json())
    a, b = resolve_config("gqa"), resolve_config(str(path))
    assert a == b == resolve_config(a.to_dict())
    assert build_model("gqa-tiny").config == a
    assert resolve_config(str(path), vocab_size=100).vocab_size == 100


def test_unknown_preset_lists_the_choices():
    with pytest.raises(SpeedlmError, match="unknown preset 'gtp'.*transformer"):
        build_model("gtp")


def test_bidirectional_only_mixer_is_refused_in_a_causal_model(monkeypatch):
    from speedlm.layers.attention import Attention
    from speedlm.models.registry import MIXERS

    class BidirectionalOnly(Attention):
        supports_causal = False
        supports_bidirectional = True

    MIXERS.register("bidi", BidirectionalOnly, family="test", description="test", paper="test")
    try:
        with pytest.raises(SpeedlmError, match="'bidi'.*bidirectional-only.*causal"):
            ModelConfig(layers={"A": {"mixer": {"name": "bidi"}}})
    finally:
        MIXERS.unregister("bidi")


def test_every_preset_counts_its_flops_on_the_meta_device():
    """compare plans every model on the meta device (no weights): a FLOP count that makes a tensor
    on the default device and reads it back would fail there."""
    import torch

    from speedlm.models.presets import PRESETS

    with torch.device("meta"):
        for name in PRESETS:
            model = build_model(preset_config(f"{name}-tiny"))
            assert model.flops_per_token(256, training=True) > 0, name
