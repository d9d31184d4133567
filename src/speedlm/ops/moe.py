"""Mixture-of-Experts routing and dispatch: pure functions over flattened tokens x (N, D) and
stacked SwiGLU expert weights (E, D, H) / (E, H, D).

Routing (logits in float32 at least, whatever the activations' dtype):
- `route_topk`: token choice, each token takes its k highest-scoring experts, weights = the
  softmax renormalised over the chosen k (Mixtral, Jiang et al. 2024, arXiv:2401.04088), or the
  chosen softmax probabilities as they are (`renormalize=False`: Switch, DeepSeekMoE, Jamba).
- `balance_loss`: the Switch Transformer load-balancing loss E * sum_e f_e * P_e (Fedus et al.
  2021, arXiv:2101.03961), with f_e the fraction of the N * k assignments that go to expert e,
  so a perfectly balanced router scores exactly 1 for any k. (Hugging Face's Mixtral
  `load_balancing_loss_func` counts f_e per token, summing to k: k times this value.)
- `z_loss`: mean squared log-sum-exp of the router logits (ST-MoE, Zoph et al. 2022,
  arXiv:2202.08906).

Dispatch (`moe_swiglu`) without a Python loop over tokens: the N * k assignments are sorted by
expert (one argsort), gathered once, every expert's contiguous group is multiplied, and the
outputs are scattered back once, weighted by their router weights. The groups run as one
`torch._grouped_mm` where this torch build supports it for the device and dtype (probed once,
forward and backward); else padded to the largest group as one batched matmul ("padded"), or on
CPU as one matmul per expert on its slice of the sorted tokens ("sliced", the fastest there:
CPU `bmm` runs below the rate of separate matmuls).
With a `capacity`, each expert keeps its first `capacity` assignments in token order and drops
the rest (their tokens ride the residual: the FFN adds nothing for them); `capacity=None` is
dropless. `moe_swiglu_reference` computes every expert for every token densely, for tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from speedlm.ops.caches import register


def route_topk(
    logits: torch.Tensor, k: int, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (N, E) -> (weights (N, k), experts (N, k), probs (N, E)), in at least float32."""
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    top, experts = probs.topk(k, dim=-1)
    return (top / top.sum(-1, keepdim=True) if renormalize else top), experts, probs


def balance_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Switch load balancing: E * sum_e (share of assignments to e) * (mean router prob of e)."""
    n_experts = probs.shape[-1]
    share = torch.bincount(experts.flatten(), minlength=n_experts).to(probs.dtype) / experts.numel()
    return n_experts * (share * probs.mean(0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1).pow(2).mean()


def expert_capacity(n_tokens: int, k: int, n_experts: int, factor: float | None) -> int | None:
    """Assignments each expert may take: ceil(factor * N * k / E) (None: dropless)."""
    return None if factor is None else max(1, math.ceil(factor * n_tokens * k / n_experts))


# ----- grouped matmul -----
# whether torch._grouped_mm works, per (device type, dtype): a capability probe, registered with
# the process caches (ops/caches.py); clearing it makes the next MoE call probe again
_GROUPED_MM_WORKS: dict[tuple[str, torch.dtype], bool] = {}
register("moe.grouped_mm_works", _GROUPED_MM_WORKS.clear, lambda: len(_GROUPED_MM_WORKS))


def _grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs forward and backward here, empty groups included."""
    key = (device.type, dtype)
    if key not in _GROUPED_MM_WORKS:
        ok = hasattr(torch, "_grouped_mm")
        if ok:
            # the probe needs autograd, whatever mode the first MoE call happens to run in
            with torch.enable_grad(), torch.inference_mode(False):
                ok = _probe_grouped_mm(device, dtype)
        _GROUPED_MM_WORKS[key] = ok
    return _GROUPED_MM_WORKS[key]


def _probe_grouped_mm(device, dtype) -> bool:
    """A small grouped product with an empty group, forward and backward, against matmuls."""
    try:
        a = torch.randn(24, 16, device=device, dtype=dtype, requires_grad=True)
        b = torch.randn(3, 16, 16, device=device, dtype=dtype, requires_grad=True)
        offs = torch.tensor([8, 8, 24], device=device, dtype=torch.int32)
        out = torch._grouped_mm(a, b, offs=offs)
        out.sum().backward()
        ref = torch.cat([a[:8] @ b[0], a[8:] @ b[2]])
        return bool(torch.allclose(out, ref, rtol=1e-2, atol=1e-2)) and bool(b.grad[1].abs().max() == 0)
    except (RuntimeError, NotImplementedError, TypeError):
        return False


BACKENDS = ("auto", "grouped_mm", "padded", "sliced")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """"auto": `torch._grouped_mm` where it runs (forward and backward) for this device and
    dtype; else on CPU one matmul per expert on its contiguous slice of the sorted tokens
    ("sliced": measured fastest there, `speedlm bench moe`), and elsewhere the padded batch
    ("padded": one batched matmul, one kernel launch per projection)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown MoE dispatch backend {backend!r}; choose one of {BACKENDS}")
    if backend != "auto":
        return backend
    if _grouped_mm_works(device, dtype):
        return "grouped_mm"
    return "sliced" if device.type == "cpu" else "padded"


def dispatch_swiglu(x, token, group, rank, counts, w, w_gate, w_up, w_down, backend: str = "auto") -> torch.Tensor:
    """The experts on their assignments, sorted by expert: assignment i sends token[i] to expert
    group[i] (non-decreasing) as that expert's rank[i]-th, with weight w[i]; counts (E,) per
    expert. -> y (N, D): the weighted outputs summed per token (zero for unassigned tokens)."""
    dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):  # autocast has no rule for grouped_mm: cast like a matmul
        dtype = torch.get_autocast_dtype(x.device.type)
    backend = resolve_backend(backend, x.device, dtype)
    n, n_experts = x.shape[0], w_gate.shape[0]
    if backend == "sliced":
        xs = x.index_select(0, token)
        sizes = counts.tolist()
        outs = [
            (F.silu(xe @ w_gate[e]) * (xe @ w_up[e])) @ w_down[e]
            for e, xe in enumerate(torch.split(xs, sizes)) if sizes[e]
        ]
        out = (torch.cat(outs) if outs else xs) * w.to(x.dtype)[:, None]
        y = x.new_zeros(n, x.shape[1]).index_add(0, token, out)
    elif backend == "grouped_mm":
        offs = counts.cumsum(0).to(torch.int32)
        xs = x.index_select(0, token).to(dtype)
        wg, wu, wd = (t.to(dtype) for t in (w_gate, w_up, w_down))
        h = F.silu(torch._grouped_mm(xs, wg, offs=offs)) * torch._grouped_mm(xs, wu, offs=offs)
        out = torch._grouped_mm(h, wd, offs=offs).to(x.dtype) * w.to(x.dtype)[:, None]
        y = x.new_zeros(n, x.shape[1]).index_add(0, token, out)
    else:
        # one padded batch (E, C, D), C the largest group: every group in one batched matmul.
        # Padding slots read token 0 and carry weight 0, so they add nothing.
        c = int(counts.max()) if token.numel() else 1
        slot = group * c + rank
        src = torch.zeros(n_experts * c, dtype=torch.long, device=x.device).index_put((slot,), token)
        wp = w.new_zeros(n_experts * c).index_put((slot,), w).to(x.dtype)
        xp = x.index_select(0, src).view(n_experts, c, -1)
        h = F.silu(torch.bmm(xp, w_gate)) * torch.bmm(xp, w_up)
        out = torch.bmm(h, w_down).view(n_experts * c, -1) * wp[:, None]
        y = x.new_zeros(n, x.shape[1]).index_add(0, src, out)
    return y


def moe_swiglu(
    x: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    capacity: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, D), routing weights/experts (N, k), experts' SwiGLU weights w_gate/w_up (E, D, H),
    w_down (E, H, D) -> (y (N, D) = sum over kept assignments of weight * expert(x), kept (N, k)
    bool: which assignments the capacity let through). backend: see `resolve_backend`."""
    n, k = experts.shape
    n_experts = w_gate.shape[0]
    flat = experts.flatten()
    order = torch.argsort(flat, stable=True)  # by expert, token order within an expert
    counts = torch.bincount(flat, minlength=n_experts)
    rank = torch.arange(order.numel(), device=x.device) - (counts.cumsum(0) - counts)[flat[order]]
    if capacity is not None:
        keep = rank < capacity
        order, rank = order[keep], rank[keep]
        counts = torch.clamp(counts, max=capacity)
    group, token, w = flat[order], order // k, weights.flatten()[order]
    y = dispatch_swiglu(x, token, group, rank, counts, w, w_gate, w_up, w_down, backend)
    kept = torch.zeros(n * k, dtype=torch.bool, device=x.device)
    kept[order] = True
    return y, kept.view(n, k)


def expert_choice_swiglu(x, probs, capacity: int, w_gate, w_up, w_down, backend: str = "auto", rows: int = 1):
    """Expert choice (Zhou et al. 2022, arXiv:2202.09368): in each of `rows` sequences (the N
    tokens are rows x T), each expert takes the `capacity` tokens that score it highest (probs
    (N, E), the router's softmax over experts), weighted by that score; a token may be taken by
    several experts or none. Every expert sees its whole row, future tokens included: for
    bidirectional models. -> (y (N, D), chosen (N, E) bool)."""
    n, n_experts = probs.shape
    t = n // rows
    c = min(capacity, t)
    top, idx = probs.view(rows, t, n_experts).topk(c, dim=1)  # (rows, C, E): per row and expert, its tokens
    idx = idx + (torch.arange(rows, device=x.device) * t)[:, None, None]
    idx, top = idx.permute(2, 0, 1).reshape(n_experts, rows * c), top.permute(2, 0, 1).reshape(n_experts, rows * c)
    order = torch.argsort(idx, dim=1)  # token order within each expert (deterministic layout)
    token = idx.gather(1, order).flatten()
    w = top.gather(1, order).flatten()
    c = rows * c
    group = torch.arange(n_experts, device=x.device).repeat_interleave(c)
    rank = torch.arange(c, device=x.device).repeat(n_experts)
    counts = torch.full((n_experts,), c, dtype=torch.long, device=x.device)
    y = dispatch_swiglu(x, token, group, rank, counts, w, w_gate, w_up, w_down, backend)
    chosen = torch.zeros(n, n_experts, dtype=torch.bool, device=x.device)
    chosen[token, group] = True
    return y, chosen


def moe_swiglu_reference(x, weights, experts, w_gate, w_up, w_down, kept=None) -> torch.Tensor:
    """Every expert on every token (N, E, D), combined with a dense (N, E) weight matrix that
    is the routing weight where the assignment was kept and 0 elsewhere."""
    n_experts = w_gate.shape[0]
    w = weights if kept is None else weights * kept
    dense = torch.zeros(x.shape[0], n_experts, dtype=x.dtype, device=x.device)
    dense.scatter_add_(1, experts, w.to(x.dtype))
    h = F.silu(torch.einsum("nd,edh->neh", x, w_gate)) * torch.einsum("nd,edh->neh", x, w_up)
    return torch.einsum("ne,ned->nd", dense, torch.einsum("neh,ehd->ned", h, w_down))


def moe_swiglu_loop(x, weights, experts, w_gate, w_up, w_down) -> torch.Tensor:
    """The per-expert loop with index gathers (as Hugging Face's Mixtral block dispatches):
    for each expert, gather its tokens, run it, scatter-add the weighted outputs. A baseline
    for `speedlm bench moe`, not used by the models."""
    y = torch.zeros_like(x)
    for e in range(w_gate.shape[0]):
        token, slot = torch.where(experts == e)
        if token.numel() == 0:
            continue
        xe = x[token]
        out = (F.silu(xe @ w_gate[e]) * (xe @ w_up[e])) @ w_down[e]
        y = y.index_add(0, token, out * weights[token, slot, None].to(out.dtype))
    return y
