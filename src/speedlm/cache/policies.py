"""KV policies by name, for running any attention model under a lossy cache without
retraining (`speedlm generate/eval/stream --attention ...`)."""

from __future__ import annotations

from collections.abc import Sequence

from speedlm.cache.kv import KVPolicy, SinkPolicy, WindowPolicy
from speedlm.cache.quantized import KIVIPolicy
from speedlm.cache.scored import H2OPolicy, SnapKVPolicy
from speedlm.cache.sepllm import SepLLMPolicy
from speedlm.errors import SpeedlmError

POLICIES = ("full", "window", "sink", "sepllm", "h2o", "snapkv", "kivi")


def make_policy(
    name: str,
    window: int = 1024,
    sinks: int = 4,
    separators: Sequence[int] | None = None,
    separator_cache: int | None = None,
    cap: int | None = None,
    heavy: int | None = None,
    budget: int | None = None,
    observe: int = 32,
    bits: int = 2,
    group: int = 32,
    residual: int = 32,
) -> KVPolicy | None:
    """"full" (None: each mixer's own), "window" (the last `window` - 1 keys, original
    positions), "sink" (`sinks` initial tokens + the window, shifted positions), "sepllm"
    (`sinks` initial tokens + separators + the window; original positions and every separator
    kept, or with a `cap` and a `separator_cache` the streaming cache with shifted positions),
    "h2o" (`heavy` heavy hitters, default window - 1, and the window - 1 newest keys), "snapkv"
    (`budget` slots, default 2 x (window - 1), chosen by the last `observe` queries), "kivi"
    (every key, `bits`-bit codes in groups of `group`, the newest `residual` in full precision)."""
    if name not in POLICIES:
        raise SpeedlmError(f"unknown attention policy {name!r}; choose one of {', '.join(POLICIES)}")
    if window < 2 or sinks < 0:
        raise SpeedlmError(f"the window must be >= 2 and sinks >= 0, got window={window}, sinks={sinks}")
    if name == "full":
        return None
    if name == "window":
        return WindowPolicy(window)
    if name == "sink":
        return SinkPolicy(sinks, window)
    if name == "h2o":
        recent = window - 1
        heavy = recent if heavy is None else heavy
        if heavy < 0:
            raise SpeedlmError(f"h2o: --heavy must be >= 0, got {heavy}")
        return H2OPolicy(heavy, recent)
    if name == "snapkv":
        budget = 2 * (window - 1) if budget is None else budget
        return SnapKVPolicy(budget, observe)
    if name == "kivi":
        return KIVIPolicy(bits, group, residual)
    if separators is None:
        raise SpeedlmError("the sepllm policy needs separator ids (from the checkpoint's config or tokenizer)")
    if cap is not None and separator_cache is None:
        separator_cache = 64
    return SepLLMPolicy(tuple(separators), sinks, window, separator_cache, cap, shift_positions=cap is not None)
