"""The options a replacing mixer gets from the attention layer it replaces, so that the
teacher's weights fit it (init_from_attention.py).

Options the user wrote always win; these only fill what was left out:
- softmax-attention mixers (subclasses of AttentionBase: sliding window, SepLLM, ...) inherit
  the teacher's projection and position options (kv_heads, head_dim, RoPE, biases, ...) that
  they accept, so their q/k/v/o have the teacher's shapes and positions;
- the linear mixers take widths that match the teacher's heads: GLA keys as wide as the
  teacher's (expand_k), (Gated) DeltaNet values as wide as its keys (value_factor 1, the
  teacher's head width), Mamba-2 one group and one head per attention head with a state as wide
  as a head (d_state = head_dim), as Mamba-in-the-Llama sizes it.
A user who sets a width that does not match gets the mixer's own init, and the report says why.
"""

from __future__ import annotations

from speedlm.layers.attention import AttentionBase
from speedlm.layers.dims import ModelDims
from speedlm.registry import MIXERS

# what AttentionBase's subclasses take to shape their projections and positions
PROJECTION_OPTIONS = ("kv_heads", "positions", "qkv_bias", "qk_norm", "head_dim", "rope_dim", "output_gate")


def attention_geometry(spec: dict, dims: ModelDims) -> tuple[int, int, int]:
    """(query heads, key/value heads, head width) of an attention layer from its spec."""
    heads = dims.n_heads
    return heads, spec.get("kv_heads") or heads, spec.get("head_dim") or dims.head_dim


def _gla(spec, dims):
    heads, _, width = attention_geometry(spec, dims)
    return {"expand_k": heads * width / dims.d_model}


def _deltanet(spec, dims):
    _, _, width = attention_geometry(spec, dims)
    return {"value_factor": 1} if width == dims.head_dim else {"key_dim": width, "value_dim": width}


def _mamba2(spec, dims):
    heads, _, width = attention_geometry(spec, dims)
    inner = heads * width
    shaped = {"d_state": width, "n_groups": heads, "head_dim": width}
    shaped.update({"expand": inner // dims.d_model} if inner % dims.d_model == 0 else {"d_inner": inner})
    return shaped


SHAPED = {"gla": _gla, "deltanet": _deltanet, "gated_deltanet": _deltanet, "mamba2": _mamba2}
# options that any one of a SHAPED function's keys stands in for: a user who sets one sets the shape
_SAME_SHAPE = {"value_dim": "value_factor", "value_factor": "value_dim", "expand": "d_inner", "d_inner": "expand"}


def student_mixer_spec(teacher_spec: dict, new_spec: dict, dims: ModelDims) -> dict:
    """new_spec with what it left out filled from the teacher's attention spec (module doc)."""
    entry = MIXERS[new_spec["name"]]
    given = set(new_spec) | {_SAME_SHAPE[k] for k in new_spec if k in _SAME_SHAPE}
    if issubclass(entry.cls, AttentionBase):
        accepted = set(entry.options())
        fill = {k: v for k, v in teacher_spec.items() if k in PROJECTION_OPTIONS and k in accepted}
    elif new_spec["name"] in SHAPED:
        fill = SHAPED[new_spec["name"]](teacher_spec, dims)
    else:
        fill = {}
    return {**new_spec, **{k: v for k, v in fill.items() if k not in given}}
