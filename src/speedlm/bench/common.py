"""Argument checks and small helpers shared by the benchmarks and `speedlm compare`: each
user mistake is one SpeedlmError line, raised before any work starts."""

from __future__ import annotations

import random

import torch

from speedlm.errors import SpeedlmError

# names a user may give for a dtype that models are cast to (benchmarks of inference speed)
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """auto (bf16 on CUDA where supported, else fp16; float32 on CPU) or a named dtype, checked
    against what the device runs natively."""
    from speedlm.device import check_dtype_supported

    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise SpeedlmError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
        resolved = dtype
    else:
        key = str(dtype).lower().removeprefix("torch.")
        if key not in DTYPES:
            raise SpeedlmError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
        resolved = DTYPES[key]
    check_dtype_supported(device, resolved)
    return resolved


def as_list(value, what: str) -> list:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    try:
        value = list(value)
    except TypeError:
        raise SpeedlmError(f"{what} must be a list, got {value!r}") from None
    if not value:
        raise SpeedlmError(f"give at least one {what[:-1]}")
    return value


def check_presets(presets) -> list[str]:
    presets = as_list(presets, "presets")
    for p in presets:
        if not isinstance(p, str) or not p:
            raise SpeedlmError(f"presets are names (e.g. transformer-tiny), got {p!r}")
    dup = sorted({p for p in presets if presets.count(p) > 1})
    if dup:
        raise SpeedlmError(f"preset(s) {dup} given more than once")
    return presets


def check_ints(what: str, values) -> list[int]:
    """A sorted, de-duplicated list of positive integers (`lengths`, `pairs`, `widths`)."""
    out = []
    for v in as_list(values, what):
        if isinstance(v, str) and v.isdigit():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SpeedlmError(f"{what} must be positive integers, got {v!r}")
        out.append(v)
    return sorted(set(out))


def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpeedlmError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def write_results(result: dict, md: str, files: dict[str, str]) -> dict:
    """Write `result` as JSON to files["json"] and `md` to files["md"] (the other entries of
    `files` were written by the caller: plots), print the tables and what was written, and
    return `result` with "files"."""
    import json
    import os

    os.makedirs(os.path.dirname(files["json"]) or ".", exist_ok=True)
    result["files"] = files
    with open(files["json"], "w") as f:
        json.dump(result, f, indent=2)
    with open(files["md"], "w") as f:
        f.write(md)
    print(md)
    print("wrote " + ", ".join(files.values()))
    return result


def one_line(exc: BaseException) -> str:
    """`Type: first line of the message`, for a report cell."""
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    return f"{type(exc).__name__}: {msg}"[:200]


def build_seeded(spec, seed: int, device, dtype, min_seq_len: int = 0):
    """The model of `spec` (preset name or config) with its weights drawn from `seed`, whatever
    ran before (the caller's random state is left as it was), its max_seq_len raised to
    `min_seq_len` where shorter, on `device` in `dtype`. A checkpoint folder gives its own
    weights (an imported model routes as it learned to)."""
    from speedlm.checkpoint.pretrained import build_spec, spec_config

    longer = {"max_seq_len": min_seq_len} if min_seq_len > spec_config(spec).max_seq_len else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_spec(spec, **longer)
    return model.to(device=device, dtype=dtype)


def text_token_ids(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Byte ids of real text (the default corpus's validation split), `shape` of consecutive
    windows from a seeded offset: what models see in use. Mechanisms that look at the tokens
    (SepLLM keeps separators, 35 % of this text; routers) cost what they cost on text, not on
    uniform random ids (3.5 % separators)."""
    import numpy as np

    from speedlm.data import encode_split, load_corpus, make_tokenizer

    corpus = load_corpus("stdlib")
    ids = np.asarray(encode_split(corpus, make_tokenizer("byte", corpus, None), "val"), dtype=np.int64)
    need = int(np.prod(shape))
    start = random.Random(seed).randrange(ids.size - need) if ids.size > need else 0
    flat = np.tile(ids, -(-need // ids.size) + 1)[start : start + need]
    return torch.from_numpy(flat.copy()).view(*shape)
