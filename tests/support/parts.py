"""Test-only mixers and cache policies. Each one proves a general mechanism with the smallest
module that needs it: a non-suffix KV policy, pre-RoPE policies, a composite cache of a short
convolution and attention, a long convolution decoded from cached inputs, an auxiliary loss,
a mixer that does not mix tokens at all, and a block kind with state of its own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch
from torch import nn

from speedlm.cache import CompositeCache, FullPolicy, TokenBuffer
from speedlm.cache.kv import SinkPolicy
from speedlm.layers.attention import Attention
from speedlm.layers.block import LayerBlock
from speedlm.layers.mixer import Mixer, SeqMeta
from speedlm.layers.norm import RMSNorm
from speedlm.layers.short_conv import ShortConv
from speedlm.registry import Entry, Range


# ----- KV policies ---------------------------------------------------------------------
@dataclass(frozen=True)
class SinkWindowPolicy(SinkPolicy):
    """The sinks' selection (first `sinks` slots and the last window - 1, a non-suffix selection)
    with original positions (post-RoPE), so that decoding equals the masked full forward with
    the mask (k < sinks) | (q - k < window)."""

    shift_head: ClassVar[bool] = False


@dataclass(frozen=True)
class PreRopeFull(FullPolicy):
    """Keeps everything but stores keys before RoPE: slot == position, so attention must equal
    the post-RoPE full cache exactly."""

    pre_rope: ClassVar[bool] = True


# attention sinks with positions shifted into the cache (StreamingLLM's setting): the library's
# own policy, kept under this name for the tests written before it landed
PreRopeSinkWindow = SinkPolicy


# ----- mixers --------------------------------------------------------------------------
class ConvAttention(Mixer):
    """A short causal convolution, then attention: a layer with two kinds of state, held in one
    CompositeCache (conv inputs in a TokenBuffer, keys and values in a KVCache)."""

    supports_bidirectional = False

    def __init__(self, dims, kernel: int = 3, kv_heads: int | None = None):
        super().__init__(dims)
        self.conv = ShortConv(dims.d_model, kernel)
        self.attn = Attention(dims, kv_heads)
        self.reset_parameters()

    def reset_parameters(self):
        self.conv.reset_parameters()
        self.attn.reset_parameters()

    def residual_weights(self):
        return self.attn.residual_weights()

    def mix(self, x, meta, cache=None):
        if cache is None:
            return self.attn(self.conv(x), meta)
        return self.attn(self.conv(x, cache["conv"]), meta, cache["kv"])

    def reference(self, x, meta):
        return self.attn.reference(self.conv.reference(x), meta)

    def init_cache(self, kv_policy=None):
        return CompositeCache(conv=self.conv.init_cache(), kv=self.attn.init_cache(kv_policy))

    def state_bytes(self, context_len, batch_size=1, bytes_per_elem=2):
        return self.conv.state_bytes(context_len, batch_size, bytes_per_elem) + self.attn.state_bytes(
            context_len, batch_size, bytes_per_elem
        )

    def flops_per_token(self, context_len):
        return self.conv.flops_per_token() + self.attn.flops_per_token(context_len)

    def max_context(self, kv_policy=None):
        return self.attn.max_context(kv_policy)


class LongConv(Mixer):
    """Depthwise causal convolution with an explicit filter as long as the training length,
    decoded exactly from all cached inputs (a TokenBuffer under the full policy, like Hyena)."""

    residual_out = ("o_proj",)

    def __init__(self, dims):
        super().__init__(dims)
        self.filter = nn.Parameter(torch.empty(dims.d_model, dims.max_seq_len))
        self.o_proj = nn.Linear(dims.d_model, dims.d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        super().reset_parameters()
        decay = torch.exp(-0.1 * torch.arange(self.dims.max_seq_len, dtype=torch.float64))
        with torch.no_grad():
            self.filter.copy_(torch.randn(self.filter.shape, dtype=torch.float64) * decay)

    def _conv(self, x, history):
        # y[t] = sum_s filter[t - s] x[s] over the whole history, as one matmul with a Toeplitz filter
        full = x if history is None else torch.cat([history, x], dim=1)
        n, t = full.shape[1], x.shape[1]
        lag = torch.arange(n)[:, None] - torch.arange(n)[None, :]  # (n, n) t - s
        toeplitz = self.filter[:, lag.clamp(min=0)] * (lag >= 0)  # (D, n, n)
        y = torch.einsum("dts,bsd->btd", toeplitz[:, n - t :], full)
        return self.o_proj(y)

    def mix(self, x, meta, cache=None):
        if cache is None:
            return self._conv(x, None)
        history = cache.entries()[0] if cache.length else None
        cache.extend(x)
        return self._conv(x, history)

    def reference(self, x, meta):
        outs = [sum(self.filter[:, t - s] * x[:, s] for s in range(t + 1)) for t in range(x.shape[1])]
        return self.o_proj(torch.stack(outs, dim=1))

    def init_cache(self, kv_policy=None):
        return TokenBuffer(FullPolicy(), n_entries=1)

    def state_bytes(self, context_len, batch_size=1, bytes_per_elem=2):
        return batch_size * context_len * self.dims.d_model * bytes_per_elem

    def flops_per_token(self, context_len):
        return 2.0 * self.dims.d_model * (context_len + 1) / 2 + 2.0 * self.dims.d_model**2

    def max_context(self, kv_policy=None):
        return self.dims.max_seq_len


class AuxPenalty(Mixer):
    """Attention that adds `coef * mean(y^2)` to the auxiliary losses, like a router loss."""

    supports_bidirectional = True

    def __init__(self, dims, coef: float = 0.5):
        super().__init__(dims)
        self.attn = Attention(dims)
        self.coef = coef
        self.reset_parameters()

    def reset_parameters(self):
        self.attn.reset_parameters()

    def residual_weights(self):
        return self.attn.residual_weights()

    def mix(self, x, meta: SeqMeta, cache=None):
        y = self.attn(x, meta, cache)
        if meta.aux is not None:
            meta.aux.add("penalty", self.coef * y.pow(2).mean())
        return y

    def reference(self, x, meta):
        return self.attn.reference(x, meta)

    def init_cache(self, kv_policy=None):
        return self.attn.init_cache(kv_policy)

    def state_bytes(self, *a, **k):
        return self.attn.state_bytes(*a, **k)

    def flops_per_token(self, context_len):
        return self.attn.flops_per_token(context_len)

    def max_context(self, kv_policy=None):
        return self.attn.max_context(kv_policy)


class NoMixing(Mixer):
    """A per-token projection: no information moves between positions. The baseline a
    mechanism must beat to show that it mixes tokens."""

    supports_bidirectional = True

    def __init__(self, dims):
        super().__init__(dims)
        self.o_proj = nn.Linear(dims.d_model, dims.d_model, bias=False)
        self.reset_parameters()

    def mix(self, x, meta, cache=None):
        return self.o_proj(x)

    def reference(self, x, meta):
        return x @ self.o_proj.weight.t()

    def init_cache(self, kv_policy=None):
        return CompositeCache()

    def state_bytes(self, *a, **k):
        return 0

    def flops_per_token(self, context_len):
        return 2.0 * self.dims.d_model**2


def entry(name, cls, contract_spec=None) -> Entry:
    return Entry(name, cls, "mixer", "test", f"test-only {cls.__name__}", "-", dict(contract_spec or {}))


# contract-suite entries for the test-only mixers (next to every registered one)
TEST_MIXERS = {
    "test_conv_attention": entry("test_conv_attention", ConvAttention, {"kernel": 4, "kv_heads": 2}),
    "test_long_conv": entry("test_long_conv", LongConv),
    "test_aux_penalty": entry("test_aux_penalty", AuxPenalty),
    "test_no_mixing": entry("test_no_mixing", NoMixing),
}


# ----- blocks --------------------------------------------------------------------------
class ConvPreNormBlock(LayerBlock):
    """A pre-norm block with a short causal convolution of its own in front of the mixer, the
    smallest block kind with state and FLOPs that its mixer does not know about (like
    Conformer's convolution module): its cache is a CompositeCache of the conv state and the
    mixer's cache, and the model must ask the block, not the mixer, for caches and costs."""

    def __init__(self, dims, mixer: dict, ffn: dict, kernel: Annotated[int, Range(min=1)] = 3):
        super().__init__(dims, mixer, ffn)
        self.conv = ShortConv(dims.d_model, kernel)
        self.mixer_norm = RMSNorm(dims.d_model, dims.norm_eps)
        self.ffn_norm = RMSNorm(dims.d_model, dims.norm_eps) if self.ffn is not None else None

    def forward(self, x, meta, cache=None):
        h = self.mixer_norm(x)
        h = h + self.conv(h, None if cache is None else cache["conv"])
        x = x + self.mixer(h, meta, None if cache is None else cache["mixer"])
        if self.ffn is not None:
            x = x + self.ffn(self.ffn_norm(x), meta)
        return x

    def init_cache(self, kv_policy=None):
        return CompositeCache(conv=self.conv.init_cache(), mixer=self.mixer.init_cache(kv_policy))

    def state_bytes(self, context_len, batch_size=1, bytes_per_elem=2):
        own = self.conv.state_bytes(context_len, batch_size, bytes_per_elem)
        return own + super().state_bytes(context_len, batch_size, bytes_per_elem)

    def own_flops_per_token(self):
        return self.conv.flops_per_token()

    def own_reach(self):
        return self.conv.kernel - 1


def block_entry(name, cls) -> Entry:
    return Entry(name, cls, "block", "test", f"test-only {cls.__name__}", "-", {}, ("dims", "mixer", "ffn"))


TEST_BLOCKS = {"test_conv_prenorm": block_entry("test_conv_prenorm", ConvPreNormBlock)}
