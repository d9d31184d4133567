"""Compiled decoding (generate/compiled.py) gives the tokens eager decoding gives: a growing KV
cache (full attention, which reallocates its buffer while decoding), a window cache and a
recurrent state; the compiling step is timed apart; the CLI's --compile prints the same text;
a compiler that cannot build falls back to eager with one warning. Each compile takes ~10 s on
2 cores: three small models here."""

from __future__ import annotations

import warnings

import pytest
import torch

from speedlm.errors import SpeedlmError
from speedlm.generate import generate
from speedlm.generate.compiled import CompiledStep, graph_breaks
from speedlm.models import build_model


def _sharp(preset):
    torch.manual_seed(0)
    m = build_model(preset).eval()
    with torch.no_grad():
        m.embed.weight.mul_(20)  # a random model with clear argmaxes: no near-ties for greedy to flip on
    return m


@pytest.mark.parametrize("preset", ["transformer-tiny", "sliding-window-tiny", "hgrn-tiny"])
def test_compiled_decoding_gives_the_eager_tokens(preset):
    m = _sharp(preset)
    prompt = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    eager = generate(m, prompt, 40)
    compiled = generate(m, prompt, 40, compile=True)  # 40 + 40 tokens: the full KV buffer reallocates (64 -> 128)
    assert torch.equal(compiled.ids, eager.ids)
    assert compiled.compile_s is not None and compiled.compile_s > 0 and eager.compile_s is None
    assert not graph_breaks(), f"the step should compile whole: {graph_breaks()}"


def test_compile_needs_the_cache():
    with pytest.raises(SpeedlmError, match="--compile"):
        generate(build_model("hgrn-tiny"), torch.zeros(1, 3, dtype=torch.long), 2, use_cache=False, compile=True)


def test_a_compiler_that_cannot_build_falls_back_to_eager_once(monkeypatch):
    from torch._inductor.exc import InvalidCxxCompiler

    m = _sharp("hgrn-tiny")
    step = CompiledStep(m)

    def no_compiler(*a, **k):
        raise InvalidCxxCompiler()

    monkeypatch.setattr(step, "compiled", no_compiler)
    cache = m.init_cache()
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        m(ids[:, :4], cache)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = step(ids[:, 4:], cache)
            step(ids[:, 4:], cache)
    assert out.shape == (1, 1, m.config.vocab_size) and step.failed and "InvalidCxxCompiler" in step.failed
    assert len([w for w in caught if "decoding eagerly" in str(w.message)]) == 1


def test_compare_times_its_decode_column_through_the_compiled_step_when_asked(monkeypatch):
    from speedlm.compare import inference
    from speedlm.generate import compiled

    made = []

    class Recording(compiled.CompiledStep):
        def __init__(self, model):
            super().__init__(model)
            made.append(self)

    monkeypatch.setattr(compiled, "CompiledStep", Recording)
    model = build_model("hgrn-tiny")
    text = torch.randint(0, 256, (500,), generator=torch.Generator().manual_seed(0))
    eager = inference.measure_inference(model, [64], 4, torch.device("cpu"), torch.float32, text)
    assert not made and eager["decode_ms"][64] > 0
    fast = inference.measure_inference(model, [64], 4, torch.device("cpu"), torch.float32, text, compile_decode=True)
    assert len(made) == 1 and made[0].calls == 3 + 4 + 2 and fast["decode_ms"][64] > 0  # warm-up, timed, untimed
