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


@pytest.mark.parametrize("error", ["no compiler", "compiler bug"])
def test_a_compiler_that_cannot_build_or_fails_falls_back_to_eager_once(monkeypatch, error):
    from torch._inductor.exc import InvalidCxxCompiler

    m = _sharp("hgrn-tiny")
    step = CompiledStep(m)

    def broken(*a, **k):
        # torch 2.13's dynamic-shape code raises NameError for block-topk-tiny's step
        raise InvalidCxxCompiler() if error == "no compiler" else NameError("name 's24' is not defined")

    monkeypatch.setattr(step, "compiled", broken)
    cache = m.init_cache()
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        expected = m(ids, m.init_cache())[:, -1:]  # the whole sequence at once
        m(ids[:, :4], cache)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = step(ids[:, 4:], cache)
            step(ids[:, 4:], cache)
    assert step.failed and ("InvalidCxxCompiler" in step.failed or "NameError" in step.failed)
    assert torch.allclose(out, expected, atol=1e-5)  # the eager step, on a cache the failure left as it was
    # no compiler: eager for good; a compiler bug: layer by layer (the next test)
    fallback = "decoding eagerly" if error == "no compiler" else "compiling layer by layer"
    assert len([w for w in caught if fallback in str(w.message)]) == 1
    assert (step.layers is None) == (error == "no compiler")


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


def _buffers(cache):
    from speedlm.cache.buffer import TokenBuffer
    from speedlm.cache.composite import CompositeCache

    out = []
    for c in cache.layers:
        parts = c.parts.values() if isinstance(c, CompositeCache) else [c]
        out += [p for p in parts if isinstance(p, TokenBuffer)]
    return out


@pytest.mark.parametrize("preset", ["transformer-tiny", "sliding-window-tiny"])
def test_a_reserved_cache_keeps_its_shapes_while_decoding_and_a_window_stays_small(preset):
    m = build_model(preset).eval()
    cache = m.init_cache()
    cache.reserve(40 + 200)
    ids = torch.randint(0, 256, (1, 240), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        m(ids[:, :40], cache)
        shapes = [tuple(b._bufs[0].shape) for b in _buffers(cache)]
        before = [b.reallocations for b in _buffers(cache)]
        for i in range(40, 240):
            m(ids[:, i : i + 1], cache)
    assert [tuple(b._bufs[0].shape) for b in _buffers(cache)] == shapes  # no new shape: no recompile
    if preset.startswith("sliding"):
        # the policy retains 31 slots: reserving 240 tokens holds about twice the prefill, not 240,
        # and the window compacts into buffers of that same shape
        assert all(s[-2] <= 80 for s in shapes)
    else:  # the full cache was allocated for all 240 tokens at once
        assert [b.reallocations for b in _buffers(cache)] == before


def test_a_layer_that_fails_to_compile_runs_eagerly_and_the_others_stay_compiled(monkeypatch, caplog):
    """The whole model's compile fails with a compiler bug: the step compiles layer by layer; the
    failing layer runs eagerly with its reason logged, the other layers run their compiled graphs,
    the logits are the eager step's, and the model's own forward stays eager between steps."""
    import logging

    import speedlm.generate.compiled as compiled_mod

    m = _sharp("hgrn-tiny")
    assert len(m.blocks) >= 2
    step = CompiledStep(m)
    monkeypatch.setattr(step, "compiled", lambda *a, **k: (_ for _ in ()).throw(NameError("name 's24' is not defined")))
    real_init = compiled_mod.LayerwiseStep.__init__
    ran = []

    def init(self, model):
        real_init(self, model)
        for i, f in enumerate(self.compiled):
            if i == 1:  # layer 1's graph: the compiler bug
                self.compiled[i] = lambda *a, **k: (_ for _ in ()).throw(NameError("name 's7' is not defined"))
            else:
                self.compiled[i] = lambda *a, _f=f, _i=i, **k: (ran.append(_i), _f(*a, **k))[1]

    monkeypatch.setattr(compiled_mod.LayerwiseStep, "__init__", init)
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    cache = m.init_cache()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="speedlm.generate.compiled"):
        expected = m(ids, m.init_cache())
        m(ids[:, :5], cache)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outs = [step(ids[:, i : i + 1], cache) for i in range(5, 9)]
    assert step.failed and "NameError" in step.failed and step.layers is not None
    assert set(step.layers.eager_layers) == {1} and "s7" in step.layers.eager_layers[1]
    assert sum("layer 1" in r.getMessage() and "runs eagerly" in r.getMessage() for r in caplog.records) == 1
    assert sorted(set(ran)) == [i for i in range(len(m.blocks)) if i != 1]  # the others ran compiled, every step
    assert all("forward" not in vars(b) for b in m.blocks)  # prefill and training see the eager model
    for i, out in zip(range(5, 9), outs):
        assert torch.allclose(out[:, -1], expected[:, i], atol=1e-4)
