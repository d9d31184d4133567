"""The CPU peak-memory helper (profiler allocation timeline) and its pieces."""

import pytest
import torch

from speedlm.bench.memory import PeakMemory, cpu_peak_bytes, is_oom, peak_of_timeline

MB4 = 1000 * 1000 * 4  # one 1000x1000 float32 tensor


def test_two_live_tensors_peak_at_8mb():
    def two():
        a = torch.ones(1000, 1000)
        b = torch.ones(1000, 1000)
        return a, b

    assert cpu_peak_bytes(two) == pytest.approx(2 * MB4, rel=0.10)


def test_freed_tensor_does_not_add_to_peak():
    def sequential():
        a = torch.ones(1000, 1000)
        del a
        return torch.ones(1000, 1000)

    assert cpu_peak_bytes(sequential) == pytest.approx(MB4, rel=0.10)


def test_nested_op_allocations_are_counted_once():
    # aten::add -> output alloc; a naive sum over per-op totals would double-count nested ops
    def op():
        a = torch.ones(1000, 1000)
        return a + 1

    assert cpu_peak_bytes(op) == pytest.approx(2 * MB4, rel=0.10)


def test_backward_allocations_are_seen():
    w = torch.randn(1000, 1000, requires_grad=True)

    def fwd_bwd():
        (w.exp() * w).sum().backward()

    # forward alone holds exp(w) (saved) and the product: 8 MB; backward needs more
    assert cpu_peak_bytes(fwd_bwd) > 2.5 * MB4


def test_mark_counts_held_memory_but_not_earlier_transients():
    with PeakMemory("cpu") as pm:
        held = torch.ones(1000, 1000)
        transient = torch.ones(1000, 1000)
        del transient
        pm.mark()
        later = torch.ones(500, 1000)
        del later
    del held
    assert pm.peak_bytes == pytest.approx(MB4 + MB4 // 2, rel=0.10)


def test_peak_of_timeline():
    recs = [(3, -5), (1, 10), (2, 5), (4, 7)]  # unsorted on purpose
    assert peak_of_timeline(recs) == 17  # 10, 15, 10, 17
    assert peak_of_timeline(recs, since=3) == 17
    assert peak_of_timeline([(1, 10), (2, -10), (3, 4)], since=3) == 4
    assert peak_of_timeline([(1, 10)], since=5) == 10  # held, nothing after
    assert peak_of_timeline([(1, -10)]) == 0
    assert peak_of_timeline([]) == 0


def test_is_oom():
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert is_oom(MemoryError())
    assert not is_oom(RuntimeError("shape mismatch"))
    assert not is_oom(ValueError("out of memory"))
