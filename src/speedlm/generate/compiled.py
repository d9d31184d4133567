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
and their reasons are logged once, after the first step (`graph_breaks`). Where compiling fails
(no C++ toolchain, no Triton, or a compiler bug) and the eager step runs, the step falls back to
the eager model for good, with one warning. On CUDA the default mode is used: CUDA graphs
("reduce-overhead") need static shapes, which a growing KV cache does not have.

Prefill stays eager (one call of many tokens: nothing to gain, and another compile).
"""

from __future__ import annotations

import logging
import warnings

import torch

from speedlm.ops.dispatch import is_compile_failure

log = logging.getLogger(__name__)


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
        self.compiled = torch.compile(model, dynamic=None)
        self.failed: str | None = None  # why compiling was given up, if it was
        self.calls = 0

    def __call__(self, ids: torch.Tensor, cache):
        if self.failed is not None:
            return self.model(ids, cache)
        try:
            out = self.compiled(ids, cache)
        except Exception as e:  # noqa: BLE001 - sorted out just below
            # A compiler that cannot build, or a compiler bug (torch 2.13 raises NameError from its
            # dynamic-shape code for block-topk-tiny's step): if the
            # eager step runs, the failure was the compiler's, and decoding goes on eagerly. If
            # the eager step fails too, that error is the model's and propagates. (A failed
            # compiled call has not applied its cache updates: dynamo replays them after the graph.)
            out = self.model(ids, cache)
            self.failed = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:300]
            kind = "cannot compile here" if is_compile_failure(e) else "failed in torch.compile"
            warnings.warn(f"compiled decoding {kind} ({self.failed}); decoding eagerly", stacklevel=2)
            return out
        self.calls += 1
        if self.calls == 1:
            breaks = graph_breaks()
            if breaks:
                log.warning("compiled decoding: %d graph break(s), those ops run eagerly: %s",
                            sum(breaks.values()), "; ".join(f"{r} (x{n})" for r, n in breaks.items()))
        return out


__all__ = ["CompiledStep", "graph_breaks"]
