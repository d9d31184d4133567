"""Block top-k attention, MoBA-style (Lu et al. 2025, arXiv:2502.13189): each causal query
attends to `top_k` blocks of `block_size` positions, as in MoBA: its own block (up to itself),
always selected, and the top_k - 1 earlier blocks whose mean key scores highest against it
(ops/block_topk_attention.py, whose `earlier` count is top_k - 1).

The cache keeps every key and value (a later query may pick any earlier block, as in MoBA) plus
the running key sum of every block, so a decode step scores the blocks from those summaries
instead of re-pooling the keys. The keys sit in a plain token buffer, not a KVCache: a lossy KV
policy (window, sinks, SepLLM) would drop blocks the gate may choose, and is refused.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F

from speedlm.cache.base import LayerCache
from speedlm.cache.buffer import TokenBuffer
from speedlm.cache.composite import CompositeCache
from speedlm.cache.kv import FullPolicy, refuse_lossy, token_positions
from speedlm.layers.attention import AttentionBase
from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import Flops
from speedlm.layers.mixer import SeqMeta
from speedlm.layers.rope import apply_rope, rope_reference
from speedlm.ops.attention import attention_reference
from speedlm.ops.block_topk_attention import block_key_sums, block_topk_attention, block_topk_mask, summary_dtype
from speedlm.registry import Range


class BlockKeySums(LayerCache):
    """Running sums of each block's rotated keys, (B, Hkv, blocks, Dh) in float32 or better,
    detached (only the gate reads them), growing by one block every block_size tokens."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.sums: torch.Tensor | None = None

    def add(self, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        n = int(positions.max()) // self.block_size + 1
        if self.sums is None:
            b, hkv, _, dh = k.shape
            self.sums = k.new_zeros(b, hkv, n, dh, dtype=summary_dtype(k.dtype))
        elif self.sums.shape[2] < n:
            self.sums = F.pad(self.sums, (0, 0, 0, n - self.sums.shape[2]))
        return block_key_sums(k, positions, self.block_size, out=self.sums)

    def tensors(self) -> list[torch.Tensor]:
        return [] if self.sums is None else [self.sums]

    def detach(self) -> None:
        pass  # built from detached keys: no autograd history to cut


class BlockTopkAttention(AttentionBase):
    """Each causal query attends to `top_k` blocks of `block_size` positions (MoBA's top-k): its own
    block (up to itself) and the top_k - 1 earlier blocks with the highest q . mean(block keys)
    per KV head; a query reads about top_k * block_size keys at any context length, from a full
    cache."""

    supports_bidirectional = False  # MoBA's gate picks among past blocks: a causal rule
    supports_doc_ids = False  # a selected block may lie in another document

    def __init__(
        self,
        dims: ModelDims,
        block_size: Annotated[int, Range(min=1)] = 64,
        top_k: Annotated[int, Range(min=1)] = 3,
        kv_heads: Annotated[int | None, Range(min=1)] = None,
    ):
        super().__init__(dims, kv_heads)
        self.block_size, self.top_k = block_size, top_k
        self.earlier = top_k - 1  # the own block is always one of the top_k
        self.reset_parameters()

    @staticmethod
    def _refuse_lossy(kv_policy) -> None:
        refuse_lossy(kv_policy, "block_topk", "keeps every key (its gate may pick any earlier block)")

    def init_cache(self, kv_policy=None):
        self._refuse_lossy(kv_policy)
        return CompositeCache(kv=TokenBuffer(FullPolicy(), n_entries=2), blocks=BlockKeySums(self.block_size))

    def max_context(self, kv_policy=None):
        return self.dims.max_seq_len  # the cache is full whatever policy is asked for

    def mix(self, x, meta: SeqMeta, cache: CompositeCache | None = None):
        q, k, v = self.project(x)
        t = x.shape[1]
        pos = meta.query_positions()
        cos, sin = self._rope_table(pos, t, q)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q_pos = token_positions(pos, t, x.device)
        if cache is None:
            k_all, v_all, k_pos, sums = k, v, q_pos, block_key_sums(k, q_pos, self.block_size)
        else:
            sums = cache["blocks"].add(k, q_pos)
            (k_all, v_all), kp = cache["kv"].extend(k, v, positions=pos)
            k_pos = token_positions(kp, k_all.shape[2], x.device)
        y = block_topk_attention(q, k_all, v_all, q_pos, k_pos, sums, self.block_size, self.earlier)
        return self.output(y)

    def reference(self, x, meta: SeqMeta, policy=None):
        """The rule as a dense mask over float64 scores, with projections and RoPE computed
        independently of the fast path."""
        self._refuse_lossy(policy)
        t = x.shape[1]
        q, k, v = self.reference_project(x)
        pos = meta.position_tensor(t, x.device)
        q, k = rope_reference(q, pos, self.rope_theta), rope_reference(k, pos, self.rope_theta)
        allowed = block_topk_mask(q, k, pos, pos, self.block_size, self.earlier)
        return self.reference_output(attention_reference(q, k, v, allowed))

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        blocks = -(-context_len // self.block_size)
        # the sums are float32 or better (BlockKeySums), whatever the activations
        sums = batch_size * self.kv_heads * self.head_dim * blocks * max(bytes_per_elem, 4)
        return super().state_bytes(context_len, batch_size, bytes_per_elem) + sums

    def flops_breakdown(self, context_len: int, causal: bool = True) -> Flops:
        # plus the gate: a query scores each earlier block's mean key (its visible blocks)
        i = torch.arange(context_len, dtype=torch.float64, device="cpu")
        scored = torch.div(i, self.block_size, rounding_mode="floor").mean().item()
        return super().flops_breakdown(context_len) + Flops(matmul=2.0 * self.n_heads * self.head_dim * scored)

    def _mean_keys(self, context_len: int) -> float:
        i = torch.arange(context_len, dtype=torch.float64, device="cpu")
        own = torch.remainder(i, self.block_size) + 1  # the own block up to the query
        past = torch.clamp(torch.div(i, self.block_size, rounding_mode="floor"), max=self.earlier) * self.block_size
        return (own + past).mean().item()

