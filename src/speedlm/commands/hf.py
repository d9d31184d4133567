"""`speedlm hf ...`: export a checkpoint as a Hugging Face folder, import a Llama one, and
score a Hugging Face model under SepLLM / sink KV caches (the optional extra `hf`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from speedlm.errors import SpeedlmError


def _hf():
    try:
        import speedlm.hf as hf
    except ImportError:  # transformers is missing; speedlm.hf turns that into a SpeedlmError
        raise SpeedlmError('the Hugging Face commands need transformers: pip install "speedlm[hf]"') from None
    return hf


def run_hf_export(args) -> Path:
    out = _hf().export_checkpoint(args.checkpoint, args.out, format=args.format)
    how = "AutoModelForCausalLM.from_pretrained" + ("" if args.format in ("llama", "native") else " (after `import speedlm.hf`)")
    print(f"exported {args.checkpoint} as a Hugging Face {args.format} model to {out}; load it with {how}")
    return out


def run_hf_import(args) -> Path:
    step = _hf().import_model(args.model, args.out)
    print(f"imported {args.model} into speedlm: {step}")
    return step


def _load_hf(folder: str, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise SpeedlmError(f"{folder} is not a Hugging Face model folder (no config.json)")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
        return model, AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, RuntimeError) as e:
        raise SpeedlmError(f"cannot load the Hugging Face model in {folder}: {str(e).splitlines()[0]}") from None


def run_hf_eval(args) -> list[dict]:
    """Perplexity of the validation text's first --tokens tokens: the unwrapped model in one
    forward, then the model wrapped with the --attention policy, streamed through its cache in
    chunks; KV slots held against the full cache's."""
    from speedlm.data import load_corpus
    from speedlm.data.separators import parse_separators
    from speedlm.device import resolve_device

    hf = _hf()
    if args.tokens < 2:
        raise SpeedlmError(f"--tokens must be at least 2, got {args.tokens}")
    device = resolve_device(args.device)
    model, tokenizer = _load_hf(args.model, device)
    text = load_corpus(args.data).val_text
    ids = torch.tensor(tokenizer(text[: 16 * args.tokens], add_special_tokens=False).input_ids[: args.tokens], device=device)[None]
    if ids.shape[1] < args.tokens:
        raise SpeedlmError(f"the validation text has only {ids.shape[1]} tokens; ask for fewer with --tokens")
    rows = []
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None or args.tokens <= limit:
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()
        rows.append({"attention": "full", "nll": nll, "ppl": float(torch.tensor(nll).exp()), "kv_ratio": 1.0, "tokens": args.tokens - 1})
    separators = parse_separators(args.separators)
    if isinstance(separators, str):
        from speedlm.data.separators import separator_ids

        separators = separator_ids(tokenizer, separators)
    wrapper = hf.sepllm(model, args.attention, separators=separators, tokenizer=tokenizer, window=args.window,
                        initial=args.sinks, cap=args.cap, separator_cache=args.separator_cache)
    result = wrapper.perplexity(ids, chunk=args.chunk)
    rows.append({"attention": args.attention, "window": args.window, "initial": args.sinks, "cap": args.cap, **result})
    for r in rows:
        print(json.dumps(r))
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return rows
