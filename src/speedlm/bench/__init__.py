"""Benchmarks: `run_speed_bench` (latency, peak memory and scaling exponents per preset)."""

from speedlm.bench.speed import run_speed_bench

__all__ = ["run_speed_bench"]
