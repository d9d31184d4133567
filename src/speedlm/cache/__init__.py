"""Per-layer inference state. A model's cache is a list of typed layer caches; nothing in the
model special-cases a family: attention layers hold a KVCache with a policy, recurrent layers a
RecurrentState."""

from speedlm.cache.base import LayerCache, ModelCache
from speedlm.cache.kv import FullPolicy, KVCache, WindowPolicy
from speedlm.cache.recurrent import RecurrentState

__all__ = ["LayerCache", "ModelCache", "KVCache", "FullPolicy", "WindowPolicy", "RecurrentState"]
