"""Inference measurements of one architecture: prefill throughput and per-token decode latency
at several context lengths, the cache each context leaves behind, and the analytic state size.

Latency does not depend on the weights' values, so these run on a fresh model of the trained
architecture whose `max_seq_len` is raised to the longest context (full attention's limit is a
training-time bound; a mixer with a bounded cache has none). Everything runs in one process, one
model after another, on the same token ids.
"""

from __future__ import annotations

import statistics
import time

import torch

from speedlm.bench.common import build_seeded, one_line
from speedlm.bench.memory import is_oom
from speedlm.bench.timing import synchronize
from speedlm.models import ModelConfig, build_model

STATE_CONTEXTS = (256, 1024, 4096, 16384, 65536)  # analytic state bytes, for the cache plot


def inference_config(cfg: ModelConfig, longest: int) -> ModelConfig:
    fields = cfg.to_dict()
    fields["max_seq_len"] = max(cfg.max_seq_len, longest)
    return ModelConfig.from_dict(fields)


@torch.no_grad()
def measure_inference(cfg: ModelConfig, contexts, decode_tokens: int, device: torch.device, dtype: torch.dtype,
                      seed: int = 0, on_context=None) -> dict:
    """{"prefill_tok_s": {n: ...}, "decode_ms": {n: ...}, "cache_bytes": {n: measured},
    "errors": {n: reason}} for each context length n (tokens in the cache before decoding).
    Decode latency is the median over `decode_tokens` single-token steps after two untimed ones."""
    longest = max(contexts) + decode_tokens + 2
    model = build_seeded(inference_config(cfg, longest), seed, device, dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    vocab = cfg.vocab_size
    out = {"prefill_tok_s": {}, "decode_ms": {}, "cache_bytes": {}, "errors": {}}
    # a diffusion LM (no init_cache) has no decoding: its prefill is one denoising step's forward
    decodes = hasattr(model, "init_cache") and all(b.supports_decoding for b in model.blocks)
    # untimed warm-up: first calls pay for kernel selection, thread-pool start and allocations
    warm = torch.randint(0, vocab, (1, 40), generator=torch.Generator().manual_seed(seed + 1)).to(device)
    cache = model.init_cache() if decodes else None
    model(warm[:, :37], cache)
    if decodes:
        for i in range(37, 40):
            model(warm[:, i : i + 1], cache)
    del cache
    for n in contexts:
        ids = torch.randint(0, vocab, (1, n + decode_tokens + 2), generator=gen).to(device)
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
                    model(ids[:, n + i : n + i + 1], cache)
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


def state_curve(cfg: ModelConfig, bytes_per_elem: int, contexts=STATE_CONTEXTS) -> dict[int, int]:
    """Analytic inference-state bytes (batch 1) after each context length."""
    with torch.device("meta"):
        model = build_model(cfg)
    return {n: int(model.state_bytes(n, 1, bytes_per_elem)) for n in contexts}


def inference_flops(cfg: ModelConfig, contexts, decode_tokens: int) -> float:
    """Forward FLOPs the measurements spend (for the overall progress bar)."""
    with torch.device("meta"):
        model = build_model(cfg)
    return sum(model.flops_per_token(n, training=False) * (n + decode_tokens + 2) for n in contexts)
