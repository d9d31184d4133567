"""Transformer-XL attention (Dai et al. 2019, arXiv:1901.02860) as a mixer: segment-level
recurrence with a memory of `mem_len` positions, and relative positional encoding with the u
and v biases (ops/relative_attention.py); no RoPE.

Segment memory is the cache: after each call it keeps the keys and values of the last
`mem_len` positions before the current segment (and the segment so far), and nothing older.
The trainer's segment mode (`--segments`) runs consecutive segments of one stream through the
same cache that decoding uses, detached between segments: the previous segment's states enter
as constants, the paper's stop-gradient memory. One difference: keys and values are cached
rather than the layer's input states (the same values through the projections, and what
decoding needs), so the key/value projections get no gradient through the memory positions,
where the paper's [SG(m); h] W_k would give them one. Each layer reaches back at most mem_len + segment - 1 positions, so the model's
reach is about mem_len x n_layers (`reach`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch
from torch import nn

from speedlm.cache.buffer import TokenBuffer
from speedlm.cache.kv import KVPolicy, token_positions
from speedlm.errors import SpeedlmError
from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import Flops, attention_flops
from speedlm.layers.heads import HeadsMixer
from speedlm.layers.mixer import SeqMeta, linear_flops
from speedlm.ops.relative_attention import first_visible, relative_attention, relative_attention_reference, sinusoid
from speedlm.registry import Range


@dataclass(frozen=True)
class SegmentMemoryPolicy(KVPolicy):
    """Keep the keys the next query can see: from the start of its segment minus `memory`."""

    segment: int
    memory: int
    bounded: ClassVar[bool] = True

    def keep(self, length, positions, marks=None):
        if isinstance(positions, int):
            nxt = positions + length
            first = max(0, nxt // self.segment * self.segment - self.memory - positions)
            return slice(min(first, length), length)
        # explicit positions: the suffix that every row's next query may still need
        nxt = positions.max(dim=1).values + 1
        needed = positions >= first_visible(nxt, self.segment, self.memory)[:, None]
        first = int(needed.float().argmax(dim=1).min()) if bool(needed.any(dim=1).all()) else length
        return slice(first, length)

    def retained(self, context_len: int) -> int:
        return context_len - max(0, context_len // self.segment * self.segment - self.memory)


class TransformerXLAttention(HeadsMixer):
    supports_doc_ids = True

    def __init__(
        self,
        dims: ModelDims,
        mem_len: Annotated[int, Range(min=0)] = 128,
        segment: Annotated[int, Range(min=1)] = 128,
        kv_heads: Annotated[int | None, Range(min=1)] = None,
    ):
        super().__init__(dims, kv_heads)
        self.mem_len, self.segment = mem_len, segment
        self.r_proj = nn.Linear(dims.d_model, self.n_heads * self.head_dim, bias=False)  # W_r of the paper
        self.u = nn.Parameter(torch.empty(self.n_heads, self.head_dim))  # content bias
        self.v_bias = nn.Parameter(torch.empty(self.n_heads, self.head_dim))  # position bias
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.normal_(self.u, 0.0, self.dims.init_std)
        nn.init.normal_(self.v_bias, 0.0, self.dims.init_std)

    def policy(self) -> SegmentMemoryPolicy:
        return SegmentMemoryPolicy(self.segment, self.mem_len)

    def reach(self) -> int:
        """How many positions back a query of this layer can see."""
        return self.mem_len + self.segment - 1

    def _relative(self, dtype) -> torch.Tensor:
        span = self.mem_len + self.segment
        s = sinusoid(torch.arange(span, device=self.r_proj.weight.device), self.dims.d_model).to(dtype)
        return self.r_proj(s).view(span, self.n_heads, self.head_dim).transpose(0, 1)

    def mix(self, x, meta: SeqMeta, cache: TokenBuffer | None = None):
        b, t, _ = x.shape
        q, k, v = self.project(x)
        q_pos = meta.position_tensor(t, x.device)
        if cache is not None:
            (k, v), k_pos = cache.extend(k, v, positions=meta.query_positions())
            k_pos = token_positions(k_pos, k.shape[-2], x.device)
        else:
            k_pos = q_pos
        y = relative_attention(q, k, v, self._relative(q.dtype), self.u.to(q.dtype), self.v_bias.to(q.dtype), q_pos, k_pos,
                               self.segment, self.mem_len, meta.doc_ids, meta.doc_ids)
        return self.output(y)

    def reference(self, x, meta: SeqMeta, policy=None):
        t = x.shape[1]
        q, k, v = self.reference_project(x)
        per_kv = self.n_heads // self.kv_heads
        k, v = k.repeat_interleave(per_kv, 1), v.repeat_interleave(per_kv, 1)
        pos = meta.position_tensor(t, x.device)
        y = relative_attention_reference(q, k, v, self.r_proj.weight, self.u, self.v_bias, pos, self.segment, self.mem_len,
                                         meta.doc_ids)
        return self.reference_output(y)

    # ----- what the model asks -----
    def init_cache(self, kv_policy=None) -> TokenBuffer:
        if kv_policy is not None:
            raise SpeedlmError("transformer_xl keeps its own segment memory (mem_len); it takes no KV policy")
        return TokenBuffer(self.policy(), n_entries=2)

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        return 2 * batch_size * self.kv_heads * self.head_dim * self.policy().retained(context_len) * bytes_per_elem

    def flops_breakdown(self, context_len: int, causal: bool = True) -> Flops:
        n = context_len
        p = torch.arange(n, device="cpu")
        # visible keys: from the start of the query's segment less the memory (clamped at the
        # sequence start) up to itself; at T <= mem_len + segment that is plain causal attention
        first = torch.clamp(first_visible(p, self.segment, self.mem_len), min=0)
        keys = (p - first + 1).double().mean().item()
        rel = linear_flops(self.r_proj) * (self.reach() + 1) / max(n, 1)  # the position projection, once per call
        # content scores and weighted values over the visible keys, and each query's product with
        # the position embedding of each visible key's distance (the same visible pairs)
        return Flops(linear=self.projection_flops() + rel,
                     matmul=attention_flops(self.n_heads, keys, 2 * self.head_dim, self.head_dim))

    def max_context(self, kv_policy=None) -> int | None:
        return None  # bounded memory: nothing older than mem_len + segment positions is read
