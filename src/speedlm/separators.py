"""SepLLM's separator characters (Chen et al. 2024, arXiv:2412.12094), in one place below both
their users: the data layer derives any tokenizer's separator ids from them
(speedlm.data.separators), and the SepLLM layer falls back to the byte tokenizer's ids when a
model config records none (layers/sepllm.py)."""

SEPARATOR_CHARS = ".,?!;:\n\t "
# the byte tokenizer's ids are the bytes themselves
BYTE_SEPARATORS = tuple(sorted(ord(c) for c in SEPARATOR_CHARS))
