"""speedlm's Mamba mixer against Hugging Face transformers' `MambaMixer` on the same weights: the
pure-PyTorch alternatives a CPU user has (transformers' sequential loop over the tokens, and its
`use_mambapy` path, mambapy's parallel scan over (B, T, D, N) tensors).

Built at mamba-small's mixer sizes (width 256, 512 inner channels, 16 states, dt rank 16, a
4-tap conv), HF's weights copied into ours; `mamba_mixer_pair` checks the outputs agree before
anything is timed. Needs the `hf` extra (transformers, mambapy); `bench ops` adds these rows
only where both import.
"""

from __future__ import annotations

import importlib.util

import torch

D_MODEL, D_STATE = 256, 16  # mamba-small's mixer


def available() -> bool:
    return importlib.util.find_spec("transformers") is not None and importlib.util.find_spec("mambapy") is not None


def _hf_mixer(use_mambapy: bool, seed: int):
    from transformers import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer

    config = MambaConfig(hidden_size=D_MODEL, state_size=D_STATE, expand=2, conv_kernel=4,
                         time_step_rank=-(-D_MODEL // 16), use_bias=False, use_conv_bias=True, use_mambapy=use_mambapy)
    torch.manual_seed(seed)
    return MambaMixer(config, layer_idx=0).eval()


def _ours_from(hf) -> torch.nn.Module:
    from speedlm.layers.dims import ModelDims
    from speedlm.layers.mamba import Mamba

    ours = Mamba(ModelDims(D_MODEL, 1), d_state=D_STATE, expand=2, conv_kernel=4).eval()
    names = {"conv1d.weight": "conv.weight", "conv1d.bias": "conv.bias"}
    state = {names.get(k, k): (v[:, 0] if k == "conv1d.weight" else v) for k, v in hf.state_dict().items()}
    ours.load_state_dict(state)
    return ours


def mamba_mixer_pair(use_mambapy: bool, t: int, seed: int = 0):
    """(HF's mixer forward, ours) as callables on one shared (1, t, 256) input, after checking
    that they agree (relative RMS error < 1e-4 in float32)."""
    from speedlm.layers.context import SeqMeta

    hf = _hf_mixer(use_mambapy, seed)
    ours = _ours_from(hf)
    x = torch.randn(1, t, D_MODEL, generator=torch.Generator().manual_seed(seed))
    meta = SeqMeta()
    with torch.no_grad():
        a, b = hf(x), ours.mix(x, meta)
    err = float((a - b).pow(2).mean().sqrt() / a.pow(2).mean().sqrt())
    if not err < 1e-4:
        raise AssertionError(f"speedlm's Mamba mixer and transformers' MambaMixer disagree: relative error {err:.2e}")
    return (lambda: hf(x)), (lambda: ours.mix(x, meta))


__all__ = ["available", "mamba_mixer_pair"]
