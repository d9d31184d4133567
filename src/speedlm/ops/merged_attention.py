"""One softmax over several key sets, each through the fused CPU flash kernel, merged by
log-sum-exp (as ring attention merges blocks): the exact attention over the union of the sets.

Why: marked-window attention (SepLLM, sinks, Longformer's globals) gives each block of queries
two key sets, the window span (a view of the keys) and the marked keys before it (a prefix of
one gathered copy). Concatenating them per block made a copy of every block's keys, which
autograd kept for the backward: the training step's memory grew with T x marked keys (8.3 GB
for sepllm-small at 16k against full attention's 2.2 GB). Here each part runs
`aten._scaled_dot_product_flash_attention_for_cpu`, which returns its log-sum-exp; the parts
merge as out = sum_i exp(lse_i - lse) out_i with lse = logsumexp_i lse_i, and only the query,
the merged output and log-sum-exp, the masks and views of the keys are kept. The backward runs
each part's fused backward with the *merged* output and log-sum-exp, which gives that part's
exact share of the gradient (its probabilities are exp(s - lse) with the global lse).

CPU only (CUDA's flash kernel takes no mask: there FlexAttention is the fused path); the
caller falls back to masked SDPA elsewhere. Grouped-query heads fold into the query length:
the queries of one key-value head attend as one longer block, so no key is repeated.
"""

from __future__ import annotations

import torch

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = visible) as the kernel's additive one (0 or -inf), in `dtype`."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


class _Merged(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, scale, *parts):
        keys, values, masks = parts[0::3], parts[1::3], parts[2::3]
        outs, lses = [], []
        for k, v, allowed in zip(keys, values, masks):
            out, lse = _FLASH(q, k, v, attn_mask=additive_mask(allowed, q.dtype), scale=scale)
            # a row that sees no key of this part: the kernel returns 0 and lse 0; it weighs nothing
            seen = allowed.any(-1)
            outs.append(out)
            lses.append(lse.masked_fill(~seen, float("-inf")))
        lse = torch.logsumexp(torch.stack(lses), dim=0)
        sees = torch.isfinite(lse)
        lse = torch.where(sees, lse, torch.zeros_like(lse))  # a row that sees nothing outputs 0, grads 0
        merged = torch.zeros_like(outs[0])
        for out, part_lse in zip(outs, lses):
            merged += out * torch.exp(part_lse - lse).unsqueeze(-1)
        ctx.scale = scale
        ctx.save_for_backward(q, merged, lse, *parts)  # the masks as booleans: a quarter of the additive ones
        return merged

    @staticmethod
    def backward(ctx, grad):
        q, merged, lse, *parts = ctx.saved_tensors
        grad = grad.contiguous()
        dq = torch.zeros_like(q)
        grads = []
        for k, v, allowed in zip(parts[0::3], parts[1::3], parts[2::3]):
            gq, gk, gv = _FLASH_BACKWARD(grad, q, k, v, merged, lse, 0.0, False,
                                         attn_mask=additive_mask(allowed, q.dtype), scale=ctx.scale)
            dq += gq
            grads += [gk, gv, None]
        return dq, None, *grads


def merged_attention(q: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                     scale: float | None = None) -> torch.Tensor:
    """Attention of q (B, H, Tq, Dh) over the union of key sets `parts`: each (k, v, allowed)
    with k/v (B, Hkv, Tk_i, Dh) (Hkv dividing H) and allowed a boolean (B or 1, 1, Tq or 1, Tk_i):
    a part every query sees alike passes one row, which the kernel broadcasts (no Tq x Tk mask is
    built or read). Rows that see no key in any part output 0."""
    b, h, tq, d = q.shape
    hkv = parts[0][0].shape[1]
    group = h // hkv
    if group > 1:  # the group's queries as one block per key-value head: no key is copied
        q = q.reshape(b, hkv, group * tq, d)
        parts = [(k, v, m.repeat(1, 1, group, 1) if m.shape[2] > 1 else m) for k, v, m in parts]  # query g * Tq + t
    flat = []
    for k, v, allowed in parts:
        flat += [k, v, allowed]
    out = _Merged.apply(q, scale, *flat)
    return out.reshape(b, h, tq, d) if group > 1 else out


def can_merge(q: torch.Tensor) -> bool:
    """Whether this input can take the fused CPU path (a CPU float tensor)."""
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64, torch.bfloat16)


__all__ = ["additive_mask", "can_merge", "merged_attention"]
