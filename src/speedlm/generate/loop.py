"""Prefill the prompt through the caches, then decode one token at a time."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from speedlm.errors import SpeedlmError
from speedlm.generate.sampling import check_sampling, sample_next


COMPILING_STEPS = 2  # compiled decoding: the steps that compile (generate/compiled.py)


@dataclass
class GenerationResult:
    ids: torch.Tensor  # (B, prompt + new)
    new_tokens: int
    prefill_s: float
    decode_s: float
    cache_bytes: int
    # KV slots per attention layer against the full cache's (one per token seen), summed over
    # the decoding steps (average) and at their largest (peak); None without KV caches
    kv_ratio: float | None = None
    kv_peak_ratio: float | None = None
    # compiled decoding: the first two decoding steps, which compile (the second generalises the
    # graph to a growing cache); decode_s then times the steps after them
    compile_s: float | None = None

    @property
    def decode_tokens_per_s(self) -> float:
        tokens = self.new_tokens - (COMPILING_STEPS if self.compile_s is not None else 0)
        return tokens * self.ids.shape[0] / self.decode_s if self.decode_s > 0 else float("inf")


@torch.no_grad()
def generate(
    model,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    kv_policy=None,
    compile: bool = False,
    stop=None,
) -> GenerationResult:
    """prompt_ids (B, T0) -> GenerationResult. use_cache=False recomputes the whole sequence
    at every step (the reference the cached path must reproduce exactly under greedy decoding).
    kv_policy overrides the retention of every KV cache (cache/policies.py `make_policy`): a bounded
    one lifts the length limit of full-attention models. compile: the single-token steps through
    torch.compile (generate/compiled.py); the first two compile and are timed apart (`compile_s`).
    stop: a callable, new ids (B, n) -> (B,) bool, the rows that are done (generate/stop.py
    `StopStrings`); decoding ends early once every row is done."""
    check_sampling(temperature, top_k, top_p)
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
        raise SpeedlmError("the prompt must contain at least one token; give a non-empty prompt")
    if max_new_tokens < 1:
        raise SpeedlmError(f"the number of new tokens must be at least 1, got {max_new_tokens}")
    total = prompt_ids.shape[1] + max_new_tokens
    if kv_policy is not None and not use_cache:
        raise SpeedlmError("a KV-cache policy needs the cache; drop --no-cache or the policy")
    if compile and not use_cache:
        raise SpeedlmError("compiled decoding compiles the cached single-token step; drop --no-cache or --compile")
    limit = model.max_context(kv_policy)  # None: every cache is bounded, generation may go on as long as asked
    if limit is not None and total > limit:
        raise SpeedlmError(
            f"prompt ({prompt_ids.shape[1]}) + new tokens ({max_new_tokens}) = {total} exceeds the model's "
            f"max_seq_len={limit}; ask for fewer tokens"
        )
    model.eval()
    gen = None
    if seed is not None:
        gen = torch.Generator(device=prompt_ids.device).manual_seed(seed)
    ids = prompt_ids

    sync = torch.cuda.synchronize if prompt_ids.is_cuda else (lambda: None)
    t0 = time.perf_counter()
    cache = model.init_cache(kv_policy) if use_cache else None
    if compile:  # buffers sized for the whole generation: their shapes stay put, so the step compiles once or twice
        cache.reserve(total)
    logits = model(ids, cache)[:, -1]
    sync()
    t1 = time.perf_counter()
    prefill_s = t1 - t0
    usage = []  # (KV slots per layer, tokens seen) after each model call
    step = model
    compile_s = None
    if compile:
        from speedlm.generate.compiled import CompiledStep

        step = CompiledStep(model)
    for i in range(max_new_tokens):
        if cache is not None and (slots := cache.kv_slots()):
            usage.append((sum(slots) / len(slots), cache.seen))
        nxt = sample_next(logits, temperature, top_k, top_p, gen)[:, None]
        ids = torch.cat([ids, nxt], dim=1)
        if i == max_new_tokens - 1 or (stop is not None and bool(stop(ids[:, prompt_ids.shape[1]:]).all())):
            break
        logits = step(nxt, cache)[:, -1] if use_cache else model(ids)[:, -1]
        if compile and i == COMPILING_STEPS - 1:  # the compiling steps, timed apart from decoding
            sync()
            compile_s = time.perf_counter() - t1
            t1 = time.perf_counter()
    sync()
    t2 = time.perf_counter()
    ratio = peak = None
    if usage:
        ratio = sum(s for s, _ in usage) / sum(n for _, n in usage)
        peak = max(s for s, _ in usage) / max(n for _, n in usage)
    new = ids.shape[1] - prompt_ids.shape[1]  # max_new_tokens, or fewer where `stop` ended early
    return GenerationResult(ids, new, prefill_s, t2 - t1, cache.nbytes() if cache else 0, ratio, peak, compile_s)
