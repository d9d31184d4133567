"""Export an imported model back to its original transformers class (`--format native`),
without a hand-written inverse per architecture.

Every converter in hf/imports.py maps a Hugging Face state dict onto speedlm's element by
element and affinely: each speedlm weight element is `a * (one HF element) + b`, or a constant
(copies, transposes, slices and unpacking have a = 1, b = 0; a folded muP multiplier is a; a
zero-centred norm gain stored as w + 1 is b = 1; a gain speedlm holds where the original has none
is a constant). Running the converter itself on a few probe weights reads that map off:

    f(0) = b,   f(1) - f(0) = a,   (f(P) - b) / a = P[source]

with P holding each HF element's index (split in two probes of small integers, which float32,
the converters' output type, holds exactly). The inverse puts every speedlm element back at its
source. The result is then converted forward once more and must give the speedlm weights again,
so a converter that is not of this form is refused rather than exported wrong.

Costs a few copies of the weights in memory (one per probe), which is fine for the models
speedlm tests and runs here; a 7B model needs ~5x its float32 size.
"""

from __future__ import annotations

import torch

from speedlm.errors import SpeedlmError

_LOW = 4096  # probe digits: index = high * _LOW + low, both small integers (exact in float32)


def native_class(hf_config):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_config(hf_config).eval()
    except (ValueError, KeyError) as e:
        raise SpeedlmError(f"transformers has no causal LM class for {hf_config.model_type!r}: {e}") from None


def _unique_params(hf) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for each distinct parameter storage (tied weights once)."""
    seen, out = set(), []
    for name, p in hf.state_dict(keep_vars=True).items():
        if not isinstance(p, torch.nn.Parameter) or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        out.append((name, p))
    return out


def _converted(hf, params, flat: torch.Tensor, convert) -> dict[str, torch.Tensor]:
    """The speedlm state of `hf` with its parameters set from `flat` (in `params` order)."""
    with torch.no_grad():
        offset = 0
        for _, p in params:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    return {k: v.detach().to(torch.float64) for k, v in convert(hf).state_dict().items()}


def to_native(model, hf_config, convert):
    """The transformers model of `hf_config` whose conversion by `convert` (a loaded HF model ->
    speedlm model, e.g. `hf.imports.from_pretrained`) is `model`; SpeedlmError when the
    converter is not an elementwise affine map or a speedlm weight has no source."""
    hf = native_class(hf_config).to(torch.float32)
    params = _unique_params(hf)
    n = sum(p.numel() for _, p in params)
    idx = torch.arange(n, dtype=torch.float64)
    base = _converted(hf, params, torch.zeros(n), convert)
    ones = _converted(hf, params, torch.ones(n), convert)
    low = _converted(hf, params, (idx % _LOW + 1).float(), convert)
    high = _converted(hf, params, (idx // _LOW + 1).float(), convert)
    target = {k: v.detach().to(torch.float64) for k, v in model.state_dict().items()}
    if set(target) != set(base):
        raise SpeedlmError("this model's weights do not match its Hugging Face architecture's (was it changed after import?)")
    flat = torch.full((n,), float("nan"), dtype=torch.float64)
    for name, b in base.items():
        a = ones[name] - b
        src = a != 0
        if not src.any():
            continue
        digit = lambda probe: torch.round((probe[name][src] - b[src]) / a[src]) - 1  # noqa: E731
        source = (digit(high) * _LOW + digit(low)).long()
        flat[source] = (target[name][src] - b[src]) / a[src]
    unset = torch.isnan(flat)
    if unset.any():
        offset = 0
        for name, p in params:
            if unset[offset : offset + p.numel()].any():
                raise SpeedlmError(f"the Hugging Face weight {name} has no speedlm counterpart; cannot export natively")
            offset += p.numel()
    back = _converted(hf, params, flat.to(torch.float32), convert)
    for name, want in target.items():
        if not torch.allclose(back[name], want, rtol=1e-6, atol=1e-7):
            raise SpeedlmError(f"exporting {name} natively does not reproduce it; the converter is not invertible here")
    return hf


__all__ = ["native_class", "to_native"]
