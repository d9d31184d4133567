"""Validation loss and perplexity over contiguous, non-overlapping windows of held-out ids."""

from __future__ import annotations

import contextlib
import math

import torch

from speedlm.errors import SpeedlmError


def eval_batches(ids, batch_size: int, seq_len: int, max_batches: int | None = None):
    """`speedlm.data.dataset.iter_eval_batches`, imported here rather than at module import
    so that importing the trainer never pulls in the tokenizer and corpus code."""
    from speedlm.data.dataset import iter_eval_batches

    return iter_eval_batches(ids, batch_size, seq_len, max_batches=max_batches)


def memory_batches(ids, batch_size: int, seq_len: int, max_batches: int | None = None):
    """`speedlm.data.dataset.iter_memory_batches`, imported lazily like `eval_batches`."""
    from speedlm.data.dataset import iter_memory_batches

    return iter_memory_batches(ids, batch_size, seq_len, max_batches=max_batches)


def require_tokens(n: int, seq_len: int, what: str) -> None:
    """`speedlm.data.dataset.require_tokens` (the one "too few tokens" check), imported lazily."""
    from speedlm.data.dataset import require_tokens as check

    check(n, seq_len, what)


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """`torch.autocast` for `dtype`, or a no-op context for plain fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(
    model,
    val_ids,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    kv_policy=None,
    memory: int = 0,
) -> dict:
    """Token-weighted mean cross-entropy over up to `max_batches` batches of `val_ids`.

    Returns {"loss": nats/token, "ppl": exp(loss), "tokens": tokens scored}: the language-model
    cross-entropy alone, without auxiliary losses. The model runs
    in eval mode under no_grad and is put back in the mode it was in. `device` defaults to
    the model's.

    `kv_policy` runs every attention layer under that KV policy without retraining (each
    sequence one call through fresh caches: the policy's window and marks mask the attention,
    original positions); the result then also has "kv_ratio" (KV entries attended, averaged
    over the queries, against the full cache's), "kv_peak_ratio" (the most entries any
    query needs, against the full cache at the end of the sequence) and "kv_bytes_ratio" (the
    bytes the caches hold at the end of each sequence, against a full cache's, measured). A
    policy that one masked call cannot emulate (`emulated_by_mask` False: eviction by attention
    scores, quantisation) decodes each sequence token by token instead.

    `memory` = K > 0: evaluation with memory, as segment mode trains (`--segments K`): each row
    reads one contiguous part of the stream, window after window, through a cache carried
    across K windows at a time and then started afresh.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)  # summed on device: one sync at the end
    tokens = 0
    seen = full = peak = 0
    held = held_full = 0
    if memory and kv_policy is not None:
        raise SpeedlmError("evaluation with memory carries the model's own caches; it takes no KV policy")
    cache = None
    batches = memory_batches(val_ids, batch_size, seq_len, max_batches) if memory else eval_batches(val_ids, batch_size, seq_len, max_batches)
    try:
        for i, (x, y) in enumerate(batches):
            if memory and i % memory == 0:
                cache = model.init_cache()
            n = int((y != -100).sum())  # model.loss averages over non-ignored targets; counted on CPU, no sync
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast_context(device, autocast_dtype):
                if cache is not None:
                    lm = model.loss(x, y, cache=cache).parts["lm"]
                elif kv_policy is None:
                    lm = model.loss(x, y).parts["lm"]
                else:
                    policy_cache = model.init_cache(kv_policy)
                    if kv_policy.emulated_by_mask:
                        logits = model(x, policy_cache)
                    else:
                        logits = torch.cat([model(x[:, i : i + 1], policy_cache) for i in range(x.shape[1])], dim=1)
                    lm = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100)
                    full_cache = model.init_cache()
                    model(x, full_cache)
                    held, held_full = held + policy_cache.nbytes(), held_full + full_cache.nbytes()
            total += lm.double() * n
            tokens += n
            if kv_policy is not None:
                keys = kv_policy.keys_seen(x)
                seen += int(keys.sum())
                full += x.shape[0] * x.shape[1] * (x.shape[1] + 1) // 2
                peak = max(peak, float(keys.max()) / x.shape[1])
    finally:
        model.train(was_training)
    if tokens == 0:
        raise SpeedlmError("validation produced no batches; use more validation data or a shorter seq_len")
    loss = float(total) / tokens
    try:
        ppl = math.exp(loss)
    except OverflowError:
        ppl = float("inf")
    result = {"loss": loss, "ppl": ppl, "tokens": tokens}
    if kv_policy is not None:
        result.update(kv_ratio=seen / full, kv_peak_ratio=peak, kv_bytes_ratio=held / max(1, held_full))
    return result
