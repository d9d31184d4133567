"""One FLOP convention for every part (README, "How FLOPs are counted"), and its helpers.

A part is charged what its mechanism's efficient algorithm computes, 2 FLOPs per multiply-add:
masked work counted by its visible pairs (causal attention: (T + 1) / 2 keys per query; a
chunked linear recurrence: the causal half of each C x C chunk; a window: the keys inside it),
data-dependent parts (spans, routing, top-k blocks, LSH buckets, separators) at their current
values. Norms, activations, gates, softmax and RoPE are not counted in any part; elementwise
work is counted only where it is the mixing itself (a scan's recurrence, a short or long
convolution, a feature map).

`Flops` splits a forward count by what `torch.utils.flop_counter.FlopCounterMode` can see, so
that each part's count can be checked against the counter (tests/layers/test_flop_convention.py,
`speedlm bench flops`):

- `linear`: the part's `nn.Linear` modules, called as modules (the counter attributes these to
  the Linear children);
- `matmul`: every other matrix product (attention scores and values, SDPA, chunk products,
  convolutions through `F.conv1d`, functional projections);
- `other`: work the counter cannot see (elementwise scans, FFTs, triangular solves, vecdot walks).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Flops:
    """Forward FLOPs per token of a part, split as the module doc says."""

    linear: float = 0.0
    matmul: float = 0.0
    other: float = 0.0

    @property
    def total(self) -> float:
        return self.linear + self.matmul + self.other

    @property
    def visible(self) -> float:
        """What FlopCounterMode can see: the linear and matmul parts."""
        return self.linear + self.matmul

    def __add__(self, o: "Flops") -> "Flops":
        return Flops(self.linear + o.linear, self.matmul + o.matmul, self.other + o.other)

    def scaled(self, f: float) -> "Flops":
        return Flops(f * self.linear, f * self.matmul, f * self.other)


def attention_flops(heads: int, keys: float, qk_dim: int, v_dim: int) -> float:
    """Scores and weighted values of `heads` queries over `keys` visible keys each."""
    return 2.0 * heads * keys * (qk_dim + v_dim)


def causal_keys(context_len: int) -> float:
    """Mean visible keys of a causal query over context_len tokens: (T + 1) / 2."""
    return (context_len + 1) / 2


def chunk_visible_keys(context_len: int, chunk: int) -> float:
    """Mean visible keys of a query inside the causal C x C product of a chunked form (chunks of
    min(chunk, T) tokens from position 0, the last one shorter): position i sees i mod C + 1."""
    n = context_len
    c = max(1, min(chunk, n))
    full, rest = divmod(n, c)
    return (full * c * (c + 1) / 2 + rest * (rest + 1) / 2) / max(n, 1)
