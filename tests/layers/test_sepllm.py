"""The SepLLM mixer's options: per-layer windows, full attention in the first/last layers,
separators from the model config; and what its mask means: with no separator in the text it
is attention sinks + a window, with separators everywhere it is full attention."""

import pytest
import torch

from speedlm.cache.kv import FullPolicy
from speedlm.errors import SpeedlmError
from speedlm.layers.attention import Attention
from speedlm.layers.dims import ModelDims
from speedlm.layers.mixer import SeqMeta
from speedlm.layers.sepllm import SepLLMAttention
from speedlm.models import ModelConfig, build_model
from speedlm.ops.metrics import rel_rms_error
from support.parts import SinkWindowPolicy

DIMS = ModelDims(32, 4, max_seq_len=128)


def _pair(separators):
    torch.manual_seed(0)
    sep = SepLLMAttention(DIMS, window=6, initial=3, separators=separators).double()
    full = Attention(DIMS).double()
    full.load_state_dict(sep.state_dict())
    return sep, full


def test_without_separators_it_is_sinks_plus_window_and_with_only_separators_full_attention():
    x = torch.randn(2, 50, 32, dtype=torch.float64)
    ids = torch.randint(10, 100, (2, 50))
    sep, full = _pair([1, 2])  # ids never contain them
    expected = full.reference(x, SeqMeta(token_ids=ids), policy=SinkWindowPolicy(sinks=3, window=6))
    assert rel_rms_error(sep(x, SeqMeta(token_ids=ids)), expected) < 1e-12
    sep_all, full = _pair(list(range(10, 100)))  # every token is a separator
    assert rel_rms_error(sep_all(x, SeqMeta(token_ids=ids)), full(x, SeqMeta(token_ids=ids))) < 1e-12


def test_per_layer_windows_and_full_first_and_last_layers():
    layers = {"P": {"mixer": {"name": "sepllm", "window": [4, 8, 16, 32], "full_layers": "first_last"}}}
    m = build_model(ModelConfig(d_model=32, n_heads=4, n_layers=4, pattern="P", layers=layers))
    mixers = [b.mixer for b in m.blocks]
    assert [mx.window for mx in mixers] == [4, 8, 16, 32]
    assert [isinstance(mx.default_policy(), FullPolicy) for mx in mixers] == [True, False, False, True]
    assert [mx.default_policy().window for mx in mixers[1:3]] == [8, 16]


def test_separators_come_from_the_model_config():
    cfg = ModelConfig(d_model=32, n_heads=4, n_layers=2, pattern="P", layers={"P": {"mixer": "sepllm"}}, separators=[7, 3])
    m = build_model(cfg)
    assert m.blocks[0].mixer.default_policy().separators == (3, 7)
    assert build_model(ModelConfig.from_dict(cfg.to_dict())).blocks[1].mixer.default_policy().separators == (3, 7)


@pytest.mark.parametrize(
    "fields, needle",
    [
        (dict(layers={"P": {"mixer": {"name": "sepllm", "window": [4, 8]}}}, n_layers=4), "needs 4 entries"),
        (dict(layers={"P": {"mixer": {"name": "sepllm", "window": 0}}}), "window must be an integer >= 1"),
        (dict(layers={"P": {"mixer": {"name": "sepllm", "full_layers": "middle"}}}), "full_layers"),
        (dict(layers={"P": {"mixer": "sepllm"}}, separators=[300]), "separators must be"),
    ],
)
def test_bad_options_are_one_line_errors(fields, needle):
    base = dict(d_model=32, n_heads=4, n_layers=2, pattern="P")
    with pytest.raises(SpeedlmError, match=needle):
        ModelConfig(**{**base, **fields})
