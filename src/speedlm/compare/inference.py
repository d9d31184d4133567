"""Inference measurements of one trained model: prefill throughput and per-token decode latency
at several context lengths, the cache each context leaves behind, and the state the model
declares (analytic) beside it.

Everything is measured on the trained weights: latency and cache size depend on them where a
mechanism is data-dependent (Mixture-of-Depths routes as its router learned; adaptive span reads
and keeps as far back as its learned spans). The model runs with its `max_seq_len` raised to the
longest context (full attention's limit is a training-time bound; a mixer with a bounded cache
has none), the trained weights loaded into it. Everything runs in one process, one model after
another, on the same token ids. First calls are treated alike for every model: the caller
clears the process-wide caches before each model, a short untimed warm-up starts the thread
pool and the allocator, and each context's timed prefill includes what its own first call
builds (sparse-attention plans, RoPE tables at that length).
"""

from __future__ import annotations

import statistics
import time

import torch

from speedlm.bench.common import one_line
from speedlm.bench.memory import is_oom
from speedlm.bench.timing import synchronize
from speedlm.models import ModelConfig, build_model

STATE_CONTEXTS = (256, 1024, 4096, 16384, 65536)  # analytic state bytes, for the cache plot


def inference_config(cfg: ModelConfig, longest: int) -> ModelConfig:
    fields = cfg.to_dict()
    fields["max_seq_len"] = max(cfg.max_seq_len, longest)
    return ModelConfig.from_dict(fields)


def inference_model(trained, longest: int, device: torch.device, dtype: torch.dtype):
    """The trained model's weights in a model whose `max_seq_len` admits `longest` tokens, in
    eval mode on `device` and `dtype`."""
    model = build_model(inference_config(trained.config, longest))
    model.load_state_dict(trained.state_dict())
    return model.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def measure_inference(trained, contexts, decode_tokens: int, device: torch.device, dtype: torch.dtype,
                      text: torch.Tensor, seed: int = 0, on_context=None, compile_decode: bool = False) -> dict:
    """{"prefill_tok_s": {n: ...}, "decode_ms": {n: ...}, "cache_bytes": {n: measured},
    "errors": {n: reason}} for each context length n (tokens in the cache before decoding), on
    the trained model `trained`, reading `text` (1-D token ids, repeated where shorter than a
    context): routing and separators behave as on the data the model learned, not as on random
    ids. Decode latency is the median over `decode_tokens` single-token steps after two untimed
    ones; compile_decode: those steps through the compiled step (generate/compiled.py), which
    compiles in the untimed warm-up."""
    longest = max(contexts) + decode_tokens + 2
    model = inference_model(trained, longest, device, dtype)
    vocab = model.config.vocab_size
    text = torch.as_tensor(text, dtype=torch.long).flatten()
    ids_all = text.repeat(-(-longest // text.numel()))[:longest][None].to(device)
    out = {"prefill_tok_s": {}, "decode_ms": {}, "cache_bytes": {}, "errors": {}}
    # a diffusion LM (no init_cache) has no decoding: its prefill is one denoising step's forward
    decodes = hasattr(model, "init_cache") and all(b.supports_decoding for b in model.blocks)
    step = model
    if decodes and compile_decode:
        from speedlm.generate.compiled import CompiledStep

        step = CompiledStep(model)
    # untimed warm-up: the thread pool, the allocator, kernel selection
    warm = torch.randint(0, vocab, (1, 40), generator=torch.Generator().manual_seed(seed + 1)).to(device)
    cache = model.init_cache() if decodes else None
    model(warm[:, :37], cache)
    if decodes:
        for i in range(37, 40):
            step(warm[:, i : i + 1], cache)
    del cache
    for n in contexts:
        ids = ids_all[:, : n + decode_tokens + 2]
        try:
            cache = model.init_cache() if decodes else None
            synchronize(device)
            t0 = time.perf_counter()
            model(ids[:, :n], cache)
            synchronize(device)
            out["prefill_tok_s"][n] = n / (time.perf_counter() - t0)
            if decodes:
                out["cache_bytes"][n] = cache.nbytes()  # what n tokens of context cost
                times = []
                for i in range(decode_tokens + 2):
                    t0 = time.perf_counter()
                    step(ids[:, n + i : n + i + 1], cache)
                    synchronize(device)
                    times.append(time.perf_counter() - t0)
                out["decode_ms"][n] = 1000.0 * statistics.median(times[2:])
            del cache
        except Exception as e:  # noqa: BLE001 - only running out of memory is a measurement result
            if not is_oom(e):
                raise
            out["errors"][n] = one_line(e)
        if on_context is not None:
            on_context(n)
    return out


def state_curve(model, bytes_per_elem: int, contexts=STATE_CONTEXTS) -> dict[int, int]:
    """The inference state (batch 1) the trained model declares after each context length
    (analytic: at its learned spans; Mixture-of-Depths at its capacity)."""
    return {n: int(model.state_bytes(n, 1, bytes_per_elem)) for n in contexts}


@torch.no_grad()
def learned_on(trained, ids: torch.Tensor) -> list[dict]:
    """Per layer, the trained model's data-dependent values and how it treats `ids` (1, T) of
    real text through its caches: spans as learned, the share of tokens routed."""
    was_training = trained.training
    trained.eval()
    try:
        if not hasattr(trained, "init_cache"):
            return [b.learned_summary() for b in trained.blocks]
        cache = trained.init_cache()
        trained(ids, cache)
        return trained.learned_summary(cache)
    finally:
        trained.train(was_training)


def inference_flops(cfg: ModelConfig, contexts, decode_tokens: int) -> float:
    """Forward FLOPs the measurements spend (for the overall progress bar)."""
    with torch.device("meta"):
        model = build_model(cfg)
    return sum(model.flops_per_token(n, training=False) * (n + decode_tokens + 2) for n in contexts)
