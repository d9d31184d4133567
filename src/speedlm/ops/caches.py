"""The process-wide caches, in one registry, so that a comparison can start every model from the
same empty state (DESIGN.md, "Measuring honestly": nothing process-wide lets one model's timing
depend on another's).

Every module-level cache in speedlm registers itself here when its module is imported: sparse
attention plans and block masks, RoPE tables, the compiled FlexAttention function, capability
probes (kernel libraries installed, `torch._grouped_mm` working, a backend that cannot compile).
`clear_process_caches()` empties them all; a probe's result is then probed again on its next use,
so the first-call cost is paid by every model alike. `tests/test_process_caches.py` checks that
every module-level cache of src/speedlm is registered.

It lives in ops (the lowest layer that holds caches) so that ops, layers and everything above can
register and clear.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class _Cache:
    clear: Callable[[], None]
    size: Callable[[], int]


_REGISTRY: dict[str, _Cache] = {}


def register(name: str, clear: Callable[[], None], size: Callable[[], int]) -> None:
    """Register a process-wide cache: `clear()` empties it, `size()` counts its entries. Names
    are unique (module.cache); registering a name again replaces it (a reloaded module)."""
    _REGISTRY[name] = _Cache(clear, size)


def register_functools_cache(name: str, fn) -> None:
    """A `functools.cache` / `lru_cache`-wrapped function."""
    register(name, fn.cache_clear, lambda: fn.cache_info().currsize)


def clear_process_caches() -> None:
    """Empty every registered cache."""
    for cache in _REGISTRY.values():
        cache.clear()


def process_cache_sizes() -> dict[str, int]:
    """{name: entries} for every registered cache."""
    return {name: int(cache.size()) for name, cache in _REGISTRY.items()}
