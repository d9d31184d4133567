"""Sampling and the prefill + decode loop."""

from speedlm.generate.loop import GenerationResult, generate
from speedlm.generate.sampling import sample_next

__all__ = ["GenerationResult", "generate", "sample_next"]
