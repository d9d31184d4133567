import json

import pytest

from speedlm.errors import SpeedlmError
from speedlm.models import ModelConfig, build_model, preset_config, resolve_config


def test_json_round_trip_preserves_every_field():
    cfg = preset_config("linear-hybrid-small", vocab_size=512)
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(again.to_json()) == json.loads(cfg.to_json())


def test_pattern_tiles_layers():
    cfg = ModelConfig(n_layers=4, pattern="LA", mixers={"L": {"name": "linear_attention"}, "A": {"name": "attention"}})
    assert [s["name"] for s in cfg.layer_specs()] == ["linear_attention", "attention"] * 2


@pytest.mark.parametrize(
    "fields,needle",
    [
        (dict(pattern="AX"), "no entry in mixers"),
        (dict(pattern="AAA", n_layers=4), "does not tile"),
        (dict(mixers={"A": {"name": "nope"}}), "unknown mixer 'nope'"),
        (dict(mixers={"A": {"name": "attention", "windw": 3}}), "has no option"),
        (dict(d_model=30, n_heads=4), "not divisible"),
        (dict(vocab_size=0), "vocab_size must be a positive integer"),
        (dict(pattern=""), "non-empty"),
        (dict(objective="mlm"), "objective"),
    ],
)
def test_invalid_configs_raise_one_clear_error(fields, needle):
    with pytest.raises(SpeedlmError, match=needle):
        ModelConfig(**fields)


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


def test_unknown_preset_lists_the_choices():
    with pytest.raises(SpeedlmError, match="unknown preset 'gtp'.*transformer"):
        build_model("gtp")


def test_bidirectional_only_mixer_is_refused_in_a_causal_model(monkeypatch):
    from speedlm.layers.attention import Attention
    from speedlm.models.registry import MIXERS, MixerEntry

    class BidirectionalOnly(Attention):
        supports_causal = False
        supports_bidirectional = True

    monkeypatch.setitem(MIXERS, "bidi", MixerEntry("bidi", BidirectionalOnly, "test", "test", "test"))
    with pytest.raises(SpeedlmError, match="'bidi'.*bidirectional-only.*causal"):
        ModelConfig(mixers={"A": {"name": "bidi"}})
