"""Per-layer inference state. A model's cache is a list of typed layer caches; nothing in the
model special-cases a family: attention layers hold a KVCache with a policy, recurrent layers a
RecurrentState, convolutions a TokenBuffer of their last inputs, and layers with several kinds
of state a CompositeCache."""

from speedlm.cache.base import LayerCache, ModelCache
from speedlm.cache.buffer import TokenBuffer
from speedlm.cache.composite import CompositeCache
from speedlm.cache.kv import FullPolicy, KVCache, KVPolicy, WindowPolicy
from speedlm.cache.recurrent import RecurrentState

__all__ = [
    "CompositeCache",
    "FullPolicy",
    "KVCache",
    "KVPolicy",
    "LayerCache",
    "ModelCache",
    "RecurrentState",
    "TokenBuffer",
    "WindowPolicy",
]
