"""Streaming: feed a token stream of any length through a model one chunk at a time under a
bounded KV policy (SepLLM, attention sinks, a window) and measure, per segment of the stream,
the perplexity, the KV entries held, the throughput and the process memory."""

from __future__ import annotations

import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from speedlm.errors import SpeedlmError
from speedlm.progress import progress_bar


def process_rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        scale = 1 if os.uname().sysname == "Darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


@dataclass
class StreamSegment:
    tokens: int  # tokens scored so far (the end of this segment)
    ppl: float  # over this segment
    kv_mean: float  # KV slots per attention layer, averaged over this segment's calls
    kv_peak: int
    tokens_per_s: float
    rss_mb: float


@dataclass
class _Totals:
    """Sums over a stretch of the stream (a segment, or all of it)."""

    nll: float = 0.0
    tokens: int = 0
    kv: float = 0.0  # KV slots per layer, summed over calls
    calls: int = 0
    peak: int = 0

    def add(self, nll: float, tokens: int, slots: list[int]) -> None:
        self.nll += nll
        self.tokens += tokens
        self.kv += sum(slots) / max(1, len(slots))
        self.calls += 1
        self.peak = max(self.peak, max(slots, default=0))


@torch.no_grad()
def stream_tokens(
    model,
    ids: torch.Tensor,
    kv_policy,
    chunk: int = 64,
    segment: int = 10_000,
    on_segment: Callable[[StreamSegment], None] | None = None,
    progress: bool = True,
) -> dict:
    """Score ids (1-D) as one stream: each call feeds `chunk` tokens through the same caches
    and scores their next tokens. Returns the whole stream's perplexity, KV entries (mean and
    peak per attention layer), tokens/s, the memory after warm-up (the first segment) and at
    the end, and the per-segment records."""
    n = ids.numel() - 1
    if n < 1:
        raise SpeedlmError("the stream needs at least 2 tokens")
    if chunk < 1 or segment < chunk:
        raise SpeedlmError(f"need chunk >= 1 and segment >= chunk, got chunk={chunk}, segment={segment}")
    limit = model.max_context(kv_policy)
    if limit is not None and n > limit:
        raise SpeedlmError(
            f"this model's cache is unbounded under this policy (max_seq_len={limit}); stream at most {limit} tokens "
            f"or choose a bounded policy (window, sink, sepllm with a cap)"
        )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    cache = model.init_cache(kv_policy)
    segments: list[StreamSegment] = []
    total, seg = _Totals(), _Totals()
    bar = progress_bar(total=n, desc="stream", unit="tok", disable=not progress)
    start = seg_start = time.perf_counter()
    try:
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            x = ids[s:e].to(device)[None]
            y = ids[s + 1 : e + 1].to(device)
            logits = model(x, cache)
            nll = float(F.cross_entropy(logits[0].float(), y, reduction="sum"))
            slots = cache.kv_slots()
            total.add(nll, e - s, slots)
            seg.add(nll, e - s, slots)
            bar.update(e - s)
            if seg.tokens >= segment or e == n:
                now = time.perf_counter()
                rec = StreamSegment(
                    tokens=e, ppl=math.exp(seg.nll / seg.tokens), kv_mean=seg.kv / seg.calls, kv_peak=seg.peak,
                    tokens_per_s=seg.tokens / (now - seg_start), rss_mb=process_rss_bytes() / 2**20,
                )
                segments.append(rec)
                if on_segment is not None:
                    on_segment(rec)
                bar.set_postfix(ppl=f"{rec.ppl:.2f}", kv=f"{rec.kv_mean:.0f}", rss_mb=f"{rec.rss_mb:.0f}")
                seg, seg_start = _Totals(), now
    finally:
        bar.close()
        model.train(was_training)
    elapsed = time.perf_counter() - start
    warm, end = segments[0].rss_mb, segments[-1].rss_mb
    return {
        "tokens": n,
        "ppl": math.exp(total.nll / n),
        "kv_mean": total.kv / total.calls,
        "kv_peak": total.peak,
        "tokens_per_s": n / elapsed,
        "rss_warm_mb": warm,
        "rss_end_mb": end,
        "rss_growth": (end - warm) / warm,
        "segments": [vars(r) for r in segments],
    }
