"""Reversible residual layers (Gomez et al. 2017; Reformer, Kitaev et al. 2020), a model option.

The stream is two copies of the embedding, and each block's two branches update one half each:

    y1 = x1 + F(x2)      F: the mixer branch, mixer(norm(.))
    y2 = x2 + G(y1)      G: the FFN branch, ffn(norm(.))

The output is (y1 + y2) / 2. Since x2 = y2 - G(y1) and x1 = y1 - F(x2), the backward pass
rebuilds every block's inputs from its outputs and recomputes its branches one block at a
time: only the last block's outputs are kept, so training's activation memory does not grow
with depth (the cost is one more forward). The FFN branch is recomputed in `ffn_chunks` pieces
of the sequence, so its hidden activations live one piece at a time.

Decoding and evaluation (a cache, or no gradient) run the same equations without the custom
backward. Auxiliary losses cannot ride through the recomputed forward; a part that adds one is
refused with one line.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from speedlm.errors import SpeedlmError
from speedlm.layers.block import ffn_pieces
from speedlm.layers.context import AuxLosses, SeqMeta


def reversible_forward(blocks, x: torch.Tensor, meta: SeqMeta, caches=None, *, recompute: bool = True) -> torch.Tensor:
    """Run `blocks` as a reversible stack. `recompute=False` keeps every activation (ordinary
    autograd through the same function: what the recomputing backward is tested against)."""
    params = [p for blk in blocks for part in blk.branch_parameters() for p in part if p.requires_grad]
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or bool(params))
    if caches is not None or not needs_grad or not recompute:
        x1 = x2 = x
        for i, blk in enumerate(blocks):
            x1 = x1 + blk.mix_branch(x2, meta, None if caches is None else caches[i])
            if blk.ffn is not None:
                x2 = x2 + blk.ffn_branch(x1, meta)
        return (x1 + x2) / 2
    y1, y2 = _Reversible.apply(x, meta, list(blocks), *params)
    return (y1 + y2) / 2


class _Reversible(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, meta, blocks, *params):
        probe = AuxLosses()
        fwd_meta = replace(meta, aux=probe)
        with torch.no_grad():
            x1 = x2 = x
            for blk in blocks:
                x1 = x1 + blk.mix_branch(x2, fwd_meta)
                if blk.ffn is not None:
                    x2 = x2 + blk.ffn_branch(x1, fwd_meta)
        if probe.parts or probe.metrics:
            raise SpeedlmError(
                f"reversible layers cannot carry auxiliary losses ({sorted({*probe.parts, *probe.metrics})}); "
                "use reversible=false with MoE, MoD or adaptive-span layers"
            )
        ctx.meta, ctx.blocks, ctx.params = replace(meta, aux=None), blocks, params
        # the backward runs outside the caller's autocast: recompute under the same one, or the
        # rebuilt inputs subtract a different branch than was added
        kind = x.device.type
        ctx.autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        ctx.save_for_backward(x1, x2)
        return x1, x2

    @staticmethod
    def backward(ctx, g1, g2):
        # parameter gradients are accumulated into .grad as each block is recomputed (as an
        # ordinary backward pass would), so no more than one block's gradients are in flight
        y1, y2 = ctx.saved_tensors
        meta = ctx.meta
        kind, enabled, dtype = ctx.autocast
        with torch.autocast(kind, dtype=dtype, enabled=enabled):
            return _backward(ctx, y1, y2, g1, g2, meta)


def _backward(ctx, y1, y2, g1, g2, meta):
    for blk in reversed(ctx.blocks):
        mix_params, ffn_params = ([p for p in part if p.requires_grad] for part in blk.branch_parameters())
        if blk.ffn is not None:  # undo y2 = x2 + G(y1), one piece of the sequence at a time
            x2_pieces, dy1_pieces = [], []
            for y1_c, y2_c, g2_c in zip(*(ffn_pieces(z, blk.dims.ffn_chunks) for z in (y1, y2, g2))):
                with torch.enable_grad():
                    y1_c = y1_c.detach().requires_grad_(True)
                    gy = blk.ffn(blk.ffn_norm(y1_c), meta)
                    torch.autograd.backward(gy, g2_c, inputs=[y1_c, *ffn_params])
                x2_pieces.append(y2_c - gy.detach())
                dy1_pieces.append(y1_c.grad)
            x2 = torch.cat(x2_pieces, dim=1)
            g1 = g1 + torch.cat(dy1_pieces, dim=1)
        else:
            x2 = y2
        with torch.enable_grad():  # undo y1 = x1 + F(x2)
            x2_leaf = x2.detach().requires_grad_(True)
            fx = blk.mix_branch(x2_leaf, meta)
            torch.autograd.backward(fx, g1, inputs=[x2_leaf, *mix_params])
        y1, y2, g2 = y1 - fx.detach(), x2, g2 + x2_leaf.grad
    # both halves started as x; the parameters' gradients are already in place
    return (g1 + g2, None, None, *(None for _ in ctx.params))
