"""Longformer attention (Beltagy et al. 2020, arXiv:2004.05150): a sliding window of `window`
keys plus global tokens.

- Every query attends, with the usual projections, to its window and to the global keys (one
  softmax; ops/longformer.py's pattern on the sparse path: never a T x T mask).
- A global query attends to every key, with its own projections (q_global, k_global, v_global,
  as the paper), computed apart: O(globals x T).
- `global_tokens`: an int g (the first g positions, the rule) or a list of positions. In a causal
  model only a prefix can be global (a global query sees every key, and causally that is only
  the ones before it): anything else is refused when the config is checked. The causal cache
  keeps the global prefix and the last window - 1 keys, plus the global projections' keys and
  values of the prefix: O(globals + window).
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from speedlm.cache.buffer import TokenBuffer
from speedlm.cache.composite import CompositeCache
from speedlm.cache.kv import PrefixWindowPolicy, token_positions
from speedlm.errors import SpeedlmError
from speedlm.layers.attention import AttentionBase
from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import Flops, attention_flops
from speedlm.layers.mixer import SeqMeta, linear_flops
from speedlm.layers.rope import apply_rope, rope_reference
from speedlm.ops.attention import attention, attention_reference
from speedlm.ops.longformer import LongformerLocal, UpToPosition
from speedlm.ops.masks import AttentionMask, Full
from speedlm.registry import Range


def _global_positions(global_tokens) -> tuple[int, ...]:
    return tuple(range(global_tokens)) if isinstance(global_tokens, int) else tuple(sorted(set(global_tokens)))


class LongformerAttention(AttentionBase):
    supports_bidirectional = True
    supports_doc_ids = False  # global tokens would cross document boundaries

    @classmethod
    def check_options(cls, dims: ModelDims, global_tokens: int | list[int] = 1, kv_heads=None, **options) -> None:
        super().check_options(dims, kv_heads=kv_heads)
        if isinstance(global_tokens, int):
            if isinstance(global_tokens, bool) or global_tokens < 0:
                raise SpeedlmError(f"global_tokens must be a count >= 0 or a list of positions, got {global_tokens!r}")
        elif any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in global_tokens):
            raise SpeedlmError(f"global positions must be integers >= 0, got {global_tokens}")

    @classmethod
    def causal_problem(cls, global_tokens: int | list[int] = 1, **options) -> str | None:
        g = _global_positions(global_tokens)
        if g != tuple(range(len(g))):
            return (f"in a causal model only a global prefix is valid (positions 0..g-1), got global positions "
                    f"{list(g)[:8]}; use global_tokens=g, or a bidirectional model")
        return None

    def __init__(
        self,
        dims: ModelDims,
        window: Annotated[int, Range(min=1)] = 256,
        global_tokens: int | list[int] = 1,
        kv_heads: Annotated[int | None, Range(min=1)] = None,
    ):
        super().__init__(dims, kv_heads)
        self.window = window
        self.globals = _global_positions(global_tokens)
        self._pattern = LongformerLocal(window, self.globals)
        d = dims.d_model
        self.q_global = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_global = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.v_global = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.reset_parameters()

    def pattern(self):
        return self._pattern

    def default_policy(self):
        return PrefixWindowPolicy(len(self.globals), self.window)

    def max_context(self, kv_policy=None):
        return None  # the window and the global prefix: nothing else is ever read

    def init_cache(self, kv_policy=None):
        # the global projections' keys and values of the prefix: not a KV cache a policy trims
        # (a plain token buffer that keeps the global positions), beside the local KV cache
        prefix = TokenBuffer(PrefixWindowPolicy(len(self.globals), 1), n_entries=2)
        return CompositeCache(kv=super().init_cache(kv_policy), global_kv=prefix)

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        prefix = min(context_len, len(self.globals))
        return super().state_bytes(context_len, batch_size, bytes_per_elem) + 2 * batch_size * self.kv_heads * self.head_dim * prefix * bytes_per_elem

    def flops_breakdown(self, context_len: int, causal: bool = True) -> Flops:
        """Every query over its band and the global keys outside it (one softmax); each global
        row over what it sees with the global projections: causally the keys up to itself (row p:
        p + 1 keys, the prefix's own global keys and values), bidirectionally every key (global
        keys and values for every token, global queries for the global rows)."""
        n, w = context_len, self.window
        pos = torch.arange(n, dtype=torch.float64, device="cpu")
        rows = [p for p in self.globals if p < n]
        g = torch.tensor(rows, dtype=torch.float64, device="cpu")
        share = len(rows) / max(n, 1)  # global rows per token
        if causal:  # the globals are a prefix (causal_problem): those left of the band
            local = torch.clamp(pos + 1, max=w) + torch.clamp(pos - w + 1, min=0, max=len(rows))
            global_keys = (g + 1).sum().item() / max(n, 1)
            projections = linear_flops(self.q_global, self.k_global, self.v_global) * share
        else:
            band = torch.clamp(pos + w, max=n) - torch.clamp(pos - w + 1, min=0)
            outside = ((pos[:, None] - g[None, :]).abs() >= w).sum(1) if rows else 0
            local = band + outside
            global_keys = share * n
            projections = linear_flops(self.k_global, self.v_global) + linear_flops(self.q_global) * share
        keys = local.mean().item() + global_keys
        return Flops(linear=self.projection_flops() + projections,
                     matmul=attention_flops(self.n_heads, keys, self.head_dim, self.head_dim))

    # ----- forward -----
    def mix(self, x, meta: SeqMeta, cache: CompositeCache | None = None):
        y = super().mix(x, meta, None if cache is None else cache["kv"])
        b, t, _ = x.shape
        pos = meta.query_positions()
        pos_t = meta.position_tensor(t, x.device).expand(b, t)
        g_query = self._pattern.is_global(pos_t)  # (B, T): this call's global queries
        rows = g_query.any(0).nonzero()[:, 0]  # their union over the batch
        if rows.numel() == 0:
            return y  # no global row here (decoding past the prefix): nothing more to compute
        # causally a global row reads no later key: project only up to the last global row
        end = int(rows.max()) + 1 if meta.causal else t
        sub_pos = pos if isinstance(pos, int) else pos[:, :end]
        qg, kg, vg = self._global_qkv(x[:, :end], sub_pos)
        k_pos = pos_t[:, :end]
        if cache is not None:  # later chunks of the prefix need these keys
            (kg, vg), k_pos = cache["global_kv"].extend(kg, vg, positions=sub_pos)
            k_pos = token_positions(k_pos, kg.shape[-2], x.device)
        # global rows see every key (causally: every key up to their position) with the global projections
        pattern = UpToPosition() if meta.causal else Full()
        mask = AttentionMask(pattern, rows.numel(), kg.shape[-2], pos_t[:, rows], k_pos.expand(b, -1), causal=False)
        out = self.output(attention(qg[:, :, rows], kg, vg, mask))
        y = y.clone()
        y[:, rows] = torch.where(g_query[:, rows, None], out, y[:, rows])
        return y

    def _global_qkv(self, x, pos):
        t = x.shape[1]
        qg = self.split_heads(self.q_global(x), self.n_heads)
        kg = self.split_heads(self.k_global(x), self.kv_heads)
        vg = self.split_heads(self.v_global(x), self.kv_heads)
        cos, sin = self._rope_table(pos, t, qg)
        return apply_rope(qg, cos, sin), apply_rope(kg, cos, sin), vg

    # ----- reference -----
    def reference(self, x, meta: SeqMeta, policy=None):
        y = super().reference(x, meta, policy)
        b, t, _ = x.shape
        pos = meta.position_tensor(t, x.device)
        is_global = self._pattern.is_global(pos).expand(b, t)
        if not is_global.any():
            return y
        qg = rope_reference(self._heads_of(x, self.q_global.weight, self.n_heads), pos, self.rope_theta)
        kg = rope_reference(self._heads_of(x, self.k_global.weight, self.kv_heads), pos, self.rope_theta)
        vg = self._heads_of(x, self.v_global.weight, self.kv_heads)
        idx = torch.arange(t, device=x.device)
        allowed = torch.ones(t, t, dtype=torch.bool, device=x.device)
        if meta.causal:
            allowed = idx[None, :] <= idx[:, None]
        full = self.reference_output(attention_reference(qg, kg, vg, allowed))
        return torch.where(is_global[..., None], full, y)
