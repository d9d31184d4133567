"""A replacing mixer's first weights, taken from the softmax attention it replaces.

`INIT_FROM_ATTENTION[name](attention, new) -> [what was copied]`, each line "new <- teacher"
(or "new := value" for a part set to a neutral value). Every mapping checks all shapes before
it writes anything: where the teacher's weights do not fit, it raises `NoMapping` with the
reason and leaves the new mixer at its own init (build_student reports that, it does not fail:
the student still builds, and the report says which layers start from scratch).

- linear_attention: q, k, v, o kept, the feature map (elu + 1) in place of the softmax.
  T2R (Kasai et al. 2021, arXiv:2103.13076) and LoLCATs (Zhang et al. 2024, arXiv:2410.10254)
  start linear attention from the attention's projections and then train what changed.
- gla, deltanet, gated_deltanet: the same q, k, v, o (Mamba-in-the-Llama's reuse of the
  attention projections, Wang et al. 2024, arXiv:2408.15237, applied to these recurrences, as
  MOHAWK's stage 1-2 alignment assumes, Bick et al. 2024, arXiv:2408.10189); gates, betas,
  decays and the output norm keep their own init, and the short convolution of (Gated)
  DeltaNet starts as the identity (only the current token's tap is 1) so q, k, v reach the
  recurrence as the projections make them.
- mamba2: C <- W_q, B <- W_k, x <- W_v, out <- W_o (Mamba-in-the-Llama, its section 2: an SSM
  read as linear attention, C the query, B the key, x the value); the rows of in_proj are
  z | x | B | C | dt. Needs one group and one head per attention head and d_state = head width
  (distill/shapes.py sets these); the conv starts as the identity, z, dt, A, D and the norm
  keep their own init.
- softmax attention mixers (sliding window, SepLLM, dilated, LogSparse, ... any AttentionBase):
  every weight of the teacher's attention kept as it is, the training-free baseline (SepLLM,
  Chen et al. 2024, arXiv:2412.12094; StreamingLLM's window, Xiao et al. 2023,
  arXiv:2309.17453); parts the teacher lacks (Longformer's global projections) keep their init.
GQA: a teacher's kv heads are repeated onto the new mixer's heads (each query head keeps the
key and value it read).
"""

from __future__ import annotations

import torch

from speedlm.errors import SpeedlmError
from speedlm.layers.attention import AttentionBase
from speedlm.registry import MIXERS


class NoMapping(SpeedlmError):
    """The teacher's attention does not fit the new mixer; the message says why."""


def _heads(weight: torch.Tensor, heads: int, to_heads: int, what: str) -> torch.Tensor:
    """Rows of `heads` consecutive head blocks repeated onto `to_heads` (GQA: each kv head serves
    to_heads / heads query heads in order)."""
    if to_heads % heads:
        raise NoMapping(f"{what}: {heads} teacher heads do not spread over {to_heads} heads")
    blocks = weight.reshape(heads, -1, *weight.shape[1:])
    return blocks.repeat_interleave(to_heads // heads, dim=0).reshape(-1, *weight.shape[1:])


class _Plan:
    """Copies checked first and written together, so a refusal leaves nothing half-copied."""

    def __init__(self):
        self.copies: list[tuple[torch.Tensor, torch.Tensor, str]] = []

    def copy(self, dst: torch.Tensor, src: torch.Tensor, label: str) -> None:
        if dst.shape != src.shape:
            raise NoMapping(f"{label}: shape {tuple(src.shape)} does not fit {tuple(dst.shape)}")
        self.copies.append((dst, src, label))

    def write(self) -> list[str]:
        with torch.no_grad():
            for dst, src, _ in self.copies:
                dst.copy_(src)
        return [label for _, _, label in self.copies]


def _plain(att: AttentionBase, target: str) -> None:
    """The linear mixers have no counterpart for these attention options."""
    for part, option in ((att.q_proj.bias, "qkv_bias"), (att.q_norm, "qk_norm"), (att.g_proj, "output_gate")):
        if part is not None:
            raise NoMapping(f"the teacher's {option} has no counterpart in {target}")


def _identity_conv(conv) -> str:
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, -1] = 1.0  # the last tap reads the current token (ops/conv.py)
        if conv.bias is not None:
            conv.bias.zero_()
    return "conv := identity (current-token tap 1, others and bias 0)"


def _repeated(n_from: int, n_to: int) -> str:
    return "" if n_from == n_to else f" ({n_from} kv heads repeated to {n_to})"


def heads_from_attention(att: AttentionBase, new) -> list[str]:
    """q, k, v, o of a HeadsMixer (linear attention, GLA, DeltaNet, Gated DeltaNet)."""
    target = type(new).__name__
    _plain(att, target)
    if new.key_dim != att.head_dim or new.value_dim != att.head_dim:
        raise NoMapping(f"{target} has key/value widths {new.key_dim}/{new.value_dim}, the teacher's heads "
                        f"{att.head_dim}; set the mixer's widths to the teacher's")
    q_heads = new.q_proj.weight.shape[0] // new.key_dim
    k_heads = new.k_proj.weight.shape[0] // new.key_dim
    v_heads = new.v_proj.weight.shape[0] // new.value_dim
    if q_heads != att.n_heads or v_heads != att.n_heads:
        raise NoMapping(f"{target} has {q_heads} query and {v_heads} value heads, the teacher {att.n_heads}")
    plan = _Plan()
    plan.copy(new.q_proj.weight, att.q_proj.weight, "q_proj.weight <- q_proj.weight")
    plan.copy(new.k_proj.weight, _heads(att.k_proj.weight, att.kv_heads, k_heads, "k_proj"),
              "k_proj.weight <- k_proj.weight" + _repeated(att.kv_heads, k_heads))
    plan.copy(new.v_proj.weight, _heads(att.v_proj.weight, att.kv_heads, v_heads, "v_proj"),
              "v_proj.weight <- v_proj.weight" + _repeated(att.kv_heads, v_heads))
    plan.copy(new.o_proj.weight, att.o_proj.weight, "o_proj.weight <- o_proj.weight")
    copied = plan.write()
    conv = getattr(new, "conv", None)  # (Gated) DeltaNet's short convolution over q | k | v
    return copied + ([_identity_conv(conv)] if conv is not None else [])


def mamba2_from_attention(att: AttentionBase, new) -> list[str]:
    """C <- W_q, B <- W_k, x <- W_v, out <- W_o (Mamba-in-the-Llama)."""
    _plain(att, "mamba2")
    h, hd = att.n_heads, att.head_dim
    if (new.n_groups, new.d_state, new.n_heads, new.head_dim) != (h, hd, h, hd):
        raise NoMapping(f"mamba2 needs n_groups = heads = {h} and d_state = head_dim = {hd} to take the teacher's "
                        f"attention; it has n_groups={new.n_groups}, d_state={new.d_state}, {new.n_heads} heads of "
                        f"{new.head_dim}")
    e, gn = new.inner, new.n_groups * new.d_state
    w = new.in_proj.weight
    plan = _Plan()  # in_proj rows: z | x | B | C | dt
    plan.copy(w[e : 2 * e], _heads(att.v_proj.weight, att.kv_heads, h, "v_proj"),
              "in_proj.weight[x rows] <- v_proj.weight" + _repeated(att.kv_heads, h))
    plan.copy(w[2 * e : 2 * e + gn], _heads(att.k_proj.weight, att.kv_heads, h, "k_proj"),
              "in_proj.weight[B rows] <- k_proj.weight" + _repeated(att.kv_heads, h))
    plan.copy(w[2 * e + gn : 2 * e + 2 * gn], att.q_proj.weight, "in_proj.weight[C rows] <- q_proj.weight")
    plan.copy(new.out_proj.weight, att.o_proj.weight, "out_proj.weight <- o_proj.weight")
    return plan.write() + [_identity_conv(new.conv)]


def keep_attention(att: AttentionBase, new) -> list[str]:
    """Every weight of the teacher's attention into a softmax-attention mixer, as it is."""
    target = type(new).__name__
    if not isinstance(new, AttentionBase):
        raise NoMapping(f"{target} is not a softmax-attention mixer")
    for what in ("positions", "rope_dim", "head_dim", "kv_heads", "rope_theta"):
        if getattr(att, what) != getattr(new, what):
            raise NoMapping(f"{target} has {what}={getattr(new, what)!r}, the teacher {getattr(att, what)!r}")
    params = dict(new.named_parameters())
    plan = _Plan()
    for name, weight in att.named_parameters():
        if name not in params:
            raise NoMapping(f"{target} has no {name} for the teacher's")
        plan.copy(params[name], weight, f"{name} <- {name}")
    return plan.write()


INIT_FROM_ATTENTION = {
    "linear_attention": heads_from_attention,
    "gla": heads_from_attention,
    "deltanet": heads_from_attention,
    "gated_deltanet": heads_from_attention,
    "mamba2": mamba2_from_attention,
}


def mapping_for(name: str):
    """The mapping for a registered mixer: its entry above, `keep_attention` for any softmax-
    attention mixer, or None (the mixer starts from its own init)."""
    if name in INIT_FROM_ATTENTION:
        return INIT_FROM_ATTENTION[name]
    return keep_attention if issubclass(MIXERS[name].cls, AttentionBase) else None
