"""speedlm: every family of efficient LLM architecture behind one contract."""

from speedlm.errors import SpeedlmError

__version__ = "0.1.0"

__all__ = ["SpeedlmError", "__version__"]
