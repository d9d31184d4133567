"""What every intra-layer hybrid shares (Hymba, layers/hymba.py; Falcon-H1, layers/
parallel_hybrid.py): an attention branch `attn` and a state-space branch `ssm` (a conv + SSM
state cache) read the same input in one layer. The cache is one CompositeCache of the KV cache
and the SSM's conv inputs and state, the state is the two branches' together, and the context
limit is the attention's. Subclasses combine the two outputs."""

from __future__ import annotations

from speedlm.cache.composite import CompositeCache
from speedlm.layers.flops import Flops
from speedlm.layers.mixer import Mixer, SeqMeta


class ParallelBranches(Mixer):
    attn: Mixer
    ssm: Mixer

    def branches(self, x, meta: SeqMeta, cache: CompositeCache | None = None):
        """(attention output, SSM output) of `x`, each through its part of the cache."""
        ssm_cache = None if cache is None else CompositeCache(conv=cache["conv"], state=cache["state"])
        return self.attn(x, meta, None if cache is None else cache["kv"]), self.ssm(x, meta, ssm_cache)

    def reference_branches(self, x, meta: SeqMeta, policy=None):
        return self.attn.reference(x, meta, policy), self.ssm.reference(x, meta)

    def init_cache(self, kv_policy=None):
        ssm = self.ssm.init_cache()
        return CompositeCache(kv=self.attn.init_cache(kv_policy), conv=ssm["conv"], state=ssm["state"])

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        return self.attn.state_bytes(context_len, batch_size, bytes_per_elem) + self.ssm.state_bytes(
            context_len, batch_size, bytes_per_elem
        )

    def branch_flops(self, context_len: int) -> Flops:
        return self.attn.flops_breakdown(context_len) + self.ssm.flops_breakdown(context_len)

    def max_context(self, kv_policy=None) -> int | None:
        return self.attn.max_context(kv_policy)


__all__ = ["ParallelBranches"]
