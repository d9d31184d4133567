"""Mixture-of-Depths (Raposo et al. 2024, arXiv:2404.02258): a router wraps any block kind
(`inner`) and only some tokens pass through it; the others ride the residual unchanged.

- A router gives every token one scalar logit r (computed in at least float32). A selected token
  becomes x + sigmoid(r) * (block(x) - x): the block's residual update scaled by a bounded
  router weight, which is how the router learns (with capacity 1.0 the layer is the plain block
  with its update scaled by sigmoid(r)).
- Training: expert-choice top-k over the sequence, k = ceil(capacity * T) tokens per row
  (at least one). The selected tokens keep their original positions (RoPE, windows), and the
  inner block's mixer sees only them: attention, and its KV cache, cover only selected tokens.
- Top-k over the sequence looks at the future, so inference routes causally, by one of the
  paper's two methods (`causal_rule`):
  - "aux": a binary cross-entropy on the router logits with the top-k choice as targets (the
    `mod_router` auxiliary loss) teaches the router itself; at inference a token is routed when
    sigmoid(r) > 0.5.
  - "predictor": a small MLP on the stop-gradient input learns to predict the top-k choice
    (`mod_predictor` loss, which does not reach the model); at inference it decides.
  Training also reports the causal rule's agreement with top-k (`mod_agreement` metric).
  In eval mode the causal rule runs everywhere, so validation loss, the uncached forward and
  cached generation agree.
- Inference selects a different number of tokens per row, so the inner block runs row by row
  (a loop over the batch, not over tokens), each row with its own inner cache (`RoutedCache`).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from speedlm.cache.base import LayerCache
from speedlm.errors import SpeedlmError
from speedlm.layers.block import Block
from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import Flops
from speedlm.layers.mixer import SeqMeta
from speedlm.registry import BLOCKS, Range


class RoutedCache(LayerCache):
    """One inner-block cache per batch row (rows route different numbers of tokens), made on
    the first call; `counts[b]` is how many tokens row b has passed through the block."""

    def __init__(self, make):
        self._make = make
        self.rows: list | None = None
        self.counts: list[int] = []
        self.seen = 0  # tokens each row has offered the router

    def row(self, b: int, batch: int):
        if self.rows is None:
            self.rows = [self._make() for _ in range(batch)]
            self.counts = [0] * batch
        if len(self.rows) != batch:
            raise SpeedlmError(f"this cache was made for a batch of {len(self.rows)} rows, got {batch}")
        return self.rows[b]

    def tensors(self) -> list[torch.Tensor]:
        return [t for c in self.rows or [] for t in c.tensors()]

    def summary(self) -> dict:
        """The share of the tokens seen that the rows routed through the block."""
        if not self.seen or not self.counts:
            return {}
        return {"routed_fraction": sum(self.counts) / (len(self.counts) * self.seen)}

    def kv_slots(self) -> list[float]:
        """Per KV cache of the inner block, the slots a row holds (the mean over the rows, which
        route different numbers of tokens; zeros before the first call)."""
        if self.rows is None:
            return self._make().kv_slots()
        per_row = [c.kv_slots() for c in self.rows]
        return [sum(col) / len(col) for col in zip(*per_row)]

    def detach(self) -> None:
        for c in self.rows or []:
            c.detach()


def _gather_rows(t: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    """t (B, T) at per-row indices idx (B, k)."""
    return None if t is None else t.expand(idx.shape[0], -1).gather(1, idx)


class MoDBlock(Block):
    @classmethod
    def check_options(cls, dims: ModelDims, inner: str = "prenorm", **options) -> None:
        if inner == "mod" or inner not in BLOCKS:
            raise SpeedlmError(f"MoD wraps a registered block kind other than itself; got inner={inner!r}")

    def __init__(
        self,
        dims: ModelDims,
        mixer: dict,
        ffn: dict,
        inner: str = "prenorm",
        capacity: Annotated[float, Range(min=1e-3, max=1.0)] = 0.125,
        causal_rule: Literal["aux", "predictor"] = "aux",
        aux_coef: Annotated[float, Range(min=0)] = 0.01,
    ):
        super().__init__(dims)
        self.capacity, self.causal_rule, self.aux_coef = capacity, causal_rule, aux_coef
        self.inner = BLOCKS.build({"name": inner}, dims, mixer=mixer, ffn=ffn)
        d = dims.d_model
        self.router = nn.Linear(d, 1, bias=False)
        hidden = max(8, d // 8)
        self.predictor = (
            nn.Sequential(nn.Linear(d, hidden, bias=False), nn.SiLU(), nn.Linear(hidden, 1, bias=False))
            if causal_rule == "predictor" else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.router.weight, 0.0, self.dims.init_std)
        if self.predictor is not None:
            for m in self.predictor:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0.0, self.dims.init_std)

    # the model and the tests ask blocks for their parts
    @property
    def mixer(self):
        return self.inner.mixer

    @property
    def ffn(self):
        return self.inner.ffn

    # ----- routing (in at least float32, outside autocast) -----
    def _router_logits(self, x: torch.Tensor) -> torch.Tensor:
        dt = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dt), self.router.weight.to(dt)).squeeze(-1)

    def _predictor_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The predictor on the stop-gradient input: its loss trains it, never the model."""
        dt = torch.promote_types(x.dtype, torch.float32)
        first, _, last = self.predictor
        with torch.autocast(x.device.type, enabled=False):
            h = F.silu(F.linear(x.detach().to(dt), first.weight.to(dt)))
            return F.linear(h, last.weight.to(dt)).squeeze(-1)

    def causal_decision(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: which tokens the causal rule routes (each token on its own)."""
        if self.predictor is None:
            return router_logits > 0
        return self._predictor_logits(x) > 0

    def forward(self, x: torch.Tensor, meta: SeqMeta, cache: RoutedCache | None = None) -> torch.Tensor:
        logits = self._router_logits(x)  # (B, T)
        gate = torch.sigmoid(logits)
        # the top-k over the sequence needs no causal rule where the model is not causal (encoders)
        if (self.training or not meta.causal) and cache is None:
            return self._train_forward(x, meta, logits, gate)
        return self._causal_forward(x, meta, self.causal_decision(x, logits), gate, cache)

    def _sub_meta(self, meta: SeqMeta, idx: torch.Tensor, t: int, start: int) -> SeqMeta:
        """The selected tokens' metadata: their original positions, ids and documents."""
        pos = meta.position_tensor(t, idx.device)
        return SeqMeta(
            start=start, causal=meta.causal, token_ids=_gather_rows(meta.token_ids, idx),
            positions=_gather_rows(pos, idx), doc_ids=_gather_rows(meta.doc_ids, idx), aux=meta.aux,
        )

    def _train_forward(self, x, meta, logits, gate):
        b, t, d = x.shape
        k = max(1, math.ceil(self.capacity * t))
        idx = logits.topk(k, dim=-1).indices.sort(-1).values  # (B, k), in sequence order
        chosen = torch.zeros_like(logits, dtype=torch.bool).scatter(1, idx, True)
        if meta.aux is not None:
            target = chosen.to(logits.dtype)
            if self.predictor is None:
                meta.aux.add("mod_router", self.aux_coef * F.binary_cross_entropy_with_logits(logits, target))
            else:  # the predictor learns from the stop-gradient input: nothing reaches the model
                pred = self._predictor_logits(x)
                meta.aux.add("mod_predictor", self.aux_coef * F.binary_cross_entropy_with_logits(pred, target))
            meta.aux.metric("mod_agreement", (self.causal_decision(x, logits) == chosen).float().mean())
        gidx = idx[..., None].expand(b, k, d)
        xs = x.gather(1, gidx)
        delta = self.inner(xs, self._sub_meta(meta, idx, t, meta.start)) - xs
        return x.scatter_add(1, gidx, gate.gather(1, idx)[..., None].to(x.dtype) * delta)

    def _causal_forward(self, x, meta, decide, gate, cache):
        b = x.shape[0]
        if meta.doc_ids is not None and cache is not None:
            raise SpeedlmError("document ids are for training; calls with a cache take none")
        rows = []
        for r in range(b):  # rows route different numbers of tokens: the block runs row by row
            idx = decide[r].nonzero()[:, 0]
            if idx.numel() == 0:
                rows.append(x[r])
                continue
            row_cache = None if cache is None else cache.row(r, b)
            start = 0 if cache is None else cache.counts[r]
            sub = self._sub_meta(_row_meta(meta, r), idx[None], x.shape[1], start)
            xs = x[r : r + 1, idx]
            delta = self.inner(xs, sub, row_cache) - xs
            if cache is not None:
                cache.counts[r] += idx.numel()
            rows.append(x[r].index_add(0, idx, gate[r, idx, None].to(x.dtype) * delta[0]))
        if cache is not None:
            cache.row(0, b)  # made even when nothing was routed, so that it counts what it saw
            cache.seen += x.shape[1]
        return torch.stack(rows)

    # ----- what the model asks -----
    @property
    def supports_decoding(self) -> bool:
        return self.inner.supports_decoding

    @property
    def data_dependent_state(self) -> bool:
        return True  # how many tokens a row routes depends on the tokens: state_bytes is at capacity

    def init_cache(self, kv_policy=None) -> RoutedCache:
        return RoutedCache(lambda: self.inner.init_cache(kv_policy))

    def _routed(self, context_len: int) -> int:
        return max(1, math.ceil(self.capacity * context_len))

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        """At the capacity's rate: the inner block's state after capacity * context_len tokens."""
        return self.inner.state_bytes(self._routed(context_len), batch_size, bytes_per_elem)

    def flops_per_token(self, context_len: int) -> float:
        """The router (and predictor) on every token; the inner block on the k = ceil(capacity T)
        tokens top-k routes (k / T of them), over the selected sequence's length."""
        k = self._routed(context_len)
        return self._routing_flops() + k / max(context_len, 1) * self.inner.flops_per_token(k)

    def bidirectional_flops_per_token(self, context_len: int) -> float:
        """As `flops_per_token`, with the inner block's queries seeing both sides (encoders route
        by top-k over the sequence at the capacity too)."""
        k = self._routed(context_len)
        return self._routing_flops() + k / max(context_len, 1) * self.inner.bidirectional_flops_per_token(k)

    def flops_breakdown(self, context_len: int, causal: bool = True) -> Flops:
        # the router and predictor are functional F.linear calls (in float32): matmul
        k = self._routed(context_len)
        inner = self.inner.flops_breakdown(k, causal).scaled(k / max(context_len, 1))
        return Flops(matmul=self._routing_flops()) + inner

    def _routing_flops(self) -> float:
        routing = 2.0 * self.dims.d_model
        if self.predictor is not None:
            routing += sum(2.0 * m.weight.numel() for m in self.predictor if isinstance(m, nn.Linear))
        return routing

    def max_context(self, kv_policy=None) -> int | None:
        return self.inner.max_context(kv_policy)

    def learned_summary(self) -> dict:
        return {"capacity": self.capacity, **self.inner.learned_summary()}

    @property
    def data_dependent_flops(self) -> bool:
        return self.inner.data_dependent_flops  # training routes exactly the capacity

    def reach(self) -> int | None:
        return self.inner.reach()  # routed tokens keep their positions: the inner block's reach

    def residual_weights(self) -> list[torch.Tensor]:
        return self.inner.residual_weights()


def _row_meta(meta: SeqMeta, r: int) -> SeqMeta:
    def row(t):
        return None if t is None else t[r : r + 1] if t.shape[0] > 1 else t

    return SeqMeta(start=meta.start, causal=meta.causal, token_ids=row(meta.token_ids), positions=row(meta.positions),
                   doc_ids=row(meta.doc_ids), aux=meta.aux)
