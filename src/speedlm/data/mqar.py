"""MQAR: multi-query associative recall (Zoology, Arora et al. 2023, arXiv:2312.04927).

A synthetic task that separates architectures by how well they recall earlier context:

    k1 v1 k2 v2 ... kN vN | . . k3 . . . k1 . k2 . . ...
    \\_ N key-value pairs _/  \\_ queries at random positions _/

Layout (follows the reference `multiquery_ar` generator):
  * keys are drawn without replacement from [1, vocab_size // 2), values without replacement
    from [vocab_size // 2, vocab_size): disjoint halves, so a key never looks like a value.
    Token 0 is never a key (the reference reserves it for padding).
  * the first 2N positions hold the pairs; the rest is `(seq_len - 2N) // 2` two-token
    slots, N of which (chosen without replacement, with power-law weights that favour
    slots near the context, as in the paper: p(gap) ~ gap^(power_a - 1)) start with a query.
  * each key is queried exactly once, in random order.
  * targets follow next-token convention: at the position holding a query key the target is
    that key's value; every other target is IGNORE_INDEX (-100, torch's cross_entropy default).
  * filler (non-query) positions get uniform random tokens over the whole vocab when
    `random_non_queries` (the reference default), else 0. Random filler may equal a key by
    chance; such positions carry no target.

Checked line by line against the reference (HazyResearch/zoology, `multiquery_ar`, one pass):
the same layout, the same three distributions (keys, values, query slots sampled without
replacement with the power-law weights) and the same labels; tests/data/test_data_mqar.py
checks each against its definition, the slot distribution by a chi-square test. Two of the
reference's asserts are not enforced because the definition does not need them: an even
seq_len (an odd one leaves one filler token at the end) and vocab_size > seq_len.
"""

from __future__ import annotations

import torch

from speedlm.errors import SpeedlmError

IGNORE_INDEX = -100


def _sample_distinct(low: int, high: int, count: int, rows: int, generator: torch.Generator) -> torch.Tensor:
    """(rows, count) int64, each row `count` distinct ints from [low, high)."""
    # argsort of iid uniforms = a uniform random permutation per row; keep its first `count`.
    perm = torch.rand(rows, high - low, generator=generator).argsort(dim=1)
    return perm[:, :count] + low


def mqar_batch(
    batch_size: int,
    seq_len: int,
    num_kv_pairs: int,
    vocab_size: int,
    generator: torch.Generator | None = None,
    *,
    power_a: float = 0.01,
    random_non_queries: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One MQAR batch: (inputs, targets), both (batch_size, seq_len) int64 on CPU.

    Requires seq_len >= 4 * num_kv_pairs (room for the pairs and one query slot per key) and
    vocab_size // 2 - 1 >= num_kv_pairs (enough distinct keys). Deterministic given the
    generator's state.
    """
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len), ("num_kv_pairs", num_kv_pairs), ("vocab_size", vocab_size)):
        if int(v) != v or v < 1:
            raise SpeedlmError(f"MQAR {name} must be a positive integer, got {v}")
    if seq_len < 4 * num_kv_pairs:
        raise SpeedlmError(
            f"MQAR seq_len {seq_len} is too short for {num_kv_pairs} key-value pairs (needs >= {4 * num_kv_pairs}); "
            "raise seq_len or lower num_kv_pairs"
        )
    half = vocab_size // 2
    if half - 1 < num_kv_pairs or vocab_size - half < num_kv_pairs:
        raise SpeedlmError(
            f"MQAR vocab_size {vocab_size} has too few distinct keys for {num_kv_pairs} pairs "
            f"(needs >= {2 * num_kv_pairs + 2}); raise vocab_size or lower num_kv_pairs"
        )
    if not power_a > 0.0:
        raise SpeedlmError(f"MQAR power_a must be positive, got {power_a}; the paper uses 0.01")
    g = generator if generator is not None else torch.Generator().manual_seed(0)

    B, T, N = batch_size, seq_len, num_kv_pairs
    keys = _sample_distinct(1, half, N, B, g)  # (B, N)
    values = _sample_distinct(half, vocab_size, N, B, g)  # (B, N)

    if random_non_queries:
        inputs = torch.randint(0, vocab_size, (B, T), generator=g)
    else:
        inputs = torch.zeros(B, T, dtype=torch.long)
    inputs[:, 0 : 2 * N : 2] = keys
    inputs[:, 1 : 2 * N : 2] = values

    slots = (T - 2 * N) // 2
    weights = power_a * torch.arange(1, slots + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.multinomial(weights.expand(B, slots), N, replacement=False, generator=g)  # (B, N)
    query_pos = 2 * N + 2 * gaps  # (B, N), all < T
    inputs.scatter_(1, query_pos, keys)  # gaps[:, i] is where key i is asked

    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    targets.scatter_(1, query_pos, values)
    return inputs, targets


class MQARStream:
    """MQAR as a training stream: `batch(step, batch_size, seq_len, seed)` is a pure function of
    (seed, step), like `TokenStream.batch`, so the trainer (and exact resume) work unchanged.
    Targets are IGNORE_INDEX except at the queries, so the loss scores recall alone."""

    def __init__(self, vocab_size: int, num_kv_pairs: int, **options):
        self.vocab_size, self.num_kv_pairs, self.options = vocab_size, num_kv_pairs, options

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**63)
        return mqar_batch(batch_size, seq_len, self.num_kv_pairs, self.vocab_size, g, **self.options)


@torch.no_grad()
def mqar_accuracy(model, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of queries whose value the model predicts (argmax) correctly."""
    pred = model(inputs.to(next(model.parameters()).device)).argmax(-1).cpu()
    scored = targets != IGNORE_INDEX
    return float((pred[scored] == targets[scored]).float().mean())
