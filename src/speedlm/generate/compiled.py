"""Compiled decoding: the single-token step of a model through `torch.compile`.

Why: a decoded token of a tiny model costs 0.6-2 ms on a CPU whatever its size, which is per-op
Python and dispatch overhead (hundreds of small ops per token), not arithmetic. Compiled, the
step's ops fuse into a few C++ kernels and the overhead goes (BENCHMARKS.md, "Compiled decoding").

What is compiled is the model's whole forward for a one-token call, caches included: dynamo
traces the cache updates (in-place writes into the preallocated KV buffers, the recurrent and
convolution states) as part of the graph. Static cache shapes: `generate` first reserves every
cache's buffers for the whole generation (`ModelCache.reserve`: what each policy retains of
prompt + new tokens), so no buffer is reallocated while decoding: the first step compiles, the
second recompiles once with the cache length symbolic, and no later step compiles. (Without the
reservation a full KV cache's doublings each cost a recompile of 1-2 s: 48 tokens of
transformer-tiny took 395 ms per token in all against eager's 1.6.) Where dynamo cannot trace an op it
breaks the graph there and runs that op eagerly: that is the per-op fallback, and the breaks
and their reasons are logged once, after the first step (`graph_breaks`). Where compiling the
whole model fails with a compiler bug and the eager step runs, the step compiles layer by layer
(`LayerwiseStep`): a layer whose compile fails runs eagerly, its reason logged, the others stay
compiled. Where no compiler can build at all (no C++ toolchain, no Triton), the step falls back
to the eager model for good, with one warning. On CUDA the default mode is used: CUDA graphs
("reduce-overhead") need static shapes, which a growing KV cache does not have.

Prefill stays eager (one call of many tokens: nothing to gain, and another compile).
"""

from __future__ import annotations

import logging
import warnings

import torch

from speedlm.ops.dispatch import is_compile_failure

log = logging.getLogger(__name__)

# A one-token step's projections are 1-row matrix products. As aten GEMV calls they cost ~50 us each
# on a 2-core CPU whatever their size (transformer-small's 43 take 2.4 ms; one call over the same
# 15 MB of weights, 0.9): per-call overhead, not bandwidth. Inductor's memory-bound mm pass
# rewrites a 1-row product (CPU: first dimension <= 1, the others <= 2048) as a multiply and a
# reduction that it generates and fuses itself: transformer-small's compiled step went from 3.9 to
# 1.8 ms (BENCHMARKS.md, "Compiled decoding"). Only matrix products of one row are rewritten, so
# batched decoding keeps its GEMMs; `skip_dynamic_shape_dim_check`: the recompiled step, whose
# cache length is symbolic, keeps the rewrite
INDUCTOR_OPTIONS = {"post_grad_fusion_options": {"decompose_mm_pass": {"skip_dynamic_shape_dim_check": True}}}


def graph_breaks() -> dict[str, int]:
    """Dynamo's graph breaks since the last reset, {reason: count}."""
    from torch._dynamo.utils import counters

    return dict(counters["graph_break"])


class CompiledStep:
    """Call it like the model, `step(ids, cache)`, for single-token steps."""

    def __init__(self, model: torch.nn.Module):
        import torch._dynamo
        from torch._dynamo.utils import counters

        # Every model's forward is one code object (CausalLM.forward), and dynamo keeps at most
        # `recompile_limit` graphs per code object: the graphs of models compiled before this one
        # would count against it, and past the limit dynamo silently runs eager (measured: the
        # fifth tiny model in one bench decode run decoded slower than eager). Each compiled
        # step therefore starts from dynamo's empty cache, as the first one did.
        torch._dynamo.reset()
        counters.clear()  # graph_breaks() then reports this model's breaks only
        self.model = model
        # static first, then dynamo's automatic dynamic shapes: the second step, whose cache length
        # differs, recompiles once with that length symbolic. Compiling everything dynamic from
        # the start (dynamic=True) saves that recompile but makes every size symbolic, and the
        # kernels slower (transformer-tiny 0.82 against 0.41 ms per token)
        self.compiled = torch.compile(model, dynamic=None, options=INDUCTOR_OPTIONS)
        self.failed: str | None = None  # why compiling the whole model was given up, if it was
        self.layers: LayerwiseStep | None = None  # the per-layer fallback, once the whole model failed
        self.calls = 0

    def __call__(self, ids: torch.Tensor, cache):
        if self.layers is not None:
            return self.layers(ids, cache)
        if self.failed is not None:
            return self.model(ids, cache)
        try:
            out = self.compiled(ids, cache)
        except Exception as e:  # noqa: BLE001 - sorted out just below
            # A compiler that cannot build, or a compiler bug (torch 2.13 raises NameError from its
            # dynamic-shape code for block-topk-tiny's step): if the eager step runs, the failure
            # was the compiler's. If the eager step fails too, that error is the model's and
            # propagates. (A failed compiled call has not applied its cache updates: dynamo
            # replays them after the graph.)
            out = self.model(ids, cache)
            self.failed = _reason(e)
            if is_compile_failure(e):  # no compiler at all: every layer would fail alike
                warnings.warn(f"compiled decoding cannot compile here ({self.failed}); decoding eagerly", stacklevel=2)
            else:  # a bug in one layer's graph: compile layer by layer, the failing ones run eagerly
                warnings.warn(f"compiled decoding failed in torch.compile for the whole model ({self.failed}); "
                              "compiling layer by layer", stacklevel=2)
                self.layers = LayerwiseStep(self.model)
            return out
        self.calls += 1
        if self.calls == 1:
            breaks = graph_breaks()
            if breaks:
                log.warning("compiled decoding: %d graph break(s), those ops run eagerly: %s",
                            sum(breaks.values()), "; ".join(f"{r} (x{n})" for r, n in breaks.items()))
        return out


def _reason(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:300]


class LayerwiseStep:
    """The per-layer fallback: each block's forward compiled on its own; a block whose compile
    fails runs eagerly from then on, with its reason logged once (`eager_layers`). The embedding,
    final norm and head run eagerly. The compiled forwards are swapped in only for the duration
    of a step, so prefill and any other use of the model stay eager."""

    def __init__(self, model: torch.nn.Module):
        import torch._dynamo

        self.model = model
        blocks = list(model.blocks)
        # the blocks share one code object (Block.forward): each instance's graphs count against
        # dynamo's per-code-object limit, which would otherwise send the later layers to eager
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(blocks))
        self.eager = [type(b).forward.__get__(b) for b in blocks]
        self.compiled = [torch.compile(f, dynamic=None, options=INDUCTOR_OPTIONS) for f in self.eager]
        self.eager_layers: dict[int, str] = {}  # layer index -> why it runs eagerly
        self.calls = 0

    def _forward(self, i: int):
        def forward(*args, **kwargs):
            if i in self.eager_layers:
                return self.eager[i](*args, **kwargs)
            try:
                return self.compiled[i](*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - a compile failure of this layer: it runs eagerly
                out = self.eager[i](*args, **kwargs)
                self.eager_layers[i] = _reason(e)
                mixer = type(getattr(self.model.blocks[i], "mixer", self.model.blocks[i])).__name__
                log.warning("compiled decoding: layer %d (%s) runs eagerly: %s", i, mixer, self.eager_layers[i])
                return out

        return forward

    def __call__(self, ids: torch.Tensor, cache):
        blocks = list(self.model.blocks)
        for i, b in enumerate(blocks):
            b.forward = self._forward(i)  # an instance attribute: nn.Module.__call__ finds it first
        try:
            out = self.model(ids, cache)
        finally:
            for b in blocks:
                del b.forward
        self.calls += 1
        return out


__all__ = ["INDUCTOR_OPTIONS", "CompiledStep", "LayerwiseStep", "graph_breaks"]
