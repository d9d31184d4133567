"""The contract's reference comparison can only catch a paper mismatch in a part the reference
writes out itself. Each test here makes one of the fast path's helpers subtly wrong (a plausible
misreading of the paper) and shows that the contract's float64 comparison then fails, while the
reference's output does not move: the reference does not follow the fast path's helper."""

import pytest
import torch
import torch.nn.functional as F

from speedlm.layers import deltanet, mamba2, performer
from speedlm.ops.metrics import rel_rms_error

from layers import test_contract as contract  # a module, so pytest does not collect its tests twice

T = 37


def _favor_features_scaled_by_sqrt_d(x, projection):
    """Bug: x scaled by D^-1/2 instead of D^-1/4 (the softmax temperature read off q k / sqrt(D))."""
    return _ORIGINAL["favor_features"](x * x.shape[-1] ** -0.25, projection)


def _gated_norm_before_gate(self, y, z, rms):
    """Bug: RMSNorm(y) * silu(z) (mamba-ssm's norm_before_gate=True) instead of RMSNorm(y * silu(z))."""
    b, t, _ = y.shape
    normed = rms(y.view(b, t, self.n_groups, -1)).reshape(b, t, self.inner)
    return normed * F.silu(z) * self.norm_weight


def _ssd_inputs_b_c_swapped(self, xbc):
    """Bug: B and C read in the wrong order from the conv output (x | C | B)."""
    xs, B, C = _ORIGINAL["_ssd_inputs"](self, xbc)
    return xs, C, B


def _qkv_without_silu_on_v(self, x, conv_out):
    """Bug: the values skip the conv's silu (only q and k activated)."""
    q, k, _ = _ORIGINAL["_qkv"](self, x, conv_out)
    h, dk = self.n_heads, self.key_dim
    return q, k, self.split_heads(conv_out[..., 2 * h * dk :], h)


_ORIGINAL = {
    "favor_features": performer.favor_features,
    "_ssd_inputs": mamba2.Mamba2._ssd_inputs,
    "_qkv": deltanet.DeltaNet._qkv,
}

CASES = [
    ("performer", performer, "favor_features", _favor_features_scaled_by_sqrt_d),
    ("mamba2", mamba2.Mamba2, "_gated_norm", _gated_norm_before_gate),
    ("mamba2", mamba2.Mamba2, "_ssd_inputs", _ssd_inputs_b_c_swapped),
    ("deltanet", deltanet.DeltaNet, "_qkv", _qkv_without_silu_on_v),
    ("gated_deltanet", deltanet.DeltaNet, "_qkv", _qkv_without_silu_on_v),
]


@pytest.mark.parametrize("name, owner, helper, wrong", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
@torch.no_grad()
def test_a_wrong_fast_path_helper_fails_the_contract_and_leaves_the_reference_unchanged(
    monkeypatch, name, owner, helper, wrong
):
    mixer, x, ids = contract.make(name), contract.x_of(T), contract.ids_of(T)
    meta = contract.meta
    reference = mixer.reference(x, meta(ids))
    assert rel_rms_error(mixer(x, meta(ids)), reference) < 1e-12  # as the contract runs it, unpatched
    monkeypatch.setattr(owner, helper, wrong)
    assert torch.equal(mixer.reference(x, meta(ids)), reference)  # the reference never calls the helper
    assert rel_rms_error(mixer(x, meta(ids)), reference) > 1e-4  # ... and the fast path now differs
    with pytest.raises(AssertionError):
        contract.test_reference_equivalence_float64_and_float32(name, T)
