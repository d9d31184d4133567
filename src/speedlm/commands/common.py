"""Pieces shared by the CLI commands."""

from __future__ import annotations

import torch


def load_trained(checkpoint: str, device: torch.device):
    """(model, tokenizer, trainer_state) from a run or step folder, for inference: reads the
    config, weights and tokenizer only (speedlm.checkpoint), never the optimizer or RNG state."""
    from speedlm.checkpoint import load_pretrained

    p = load_pretrained(checkpoint, device)
    return p.model, p.tokenizer, {**p.trainer_state, "checkpoint_path": str(p.path)}


def separators_for(model, tokenizer, spec: str | None) -> list[int]:
    """The separator ids a command uses: the user's (`--separators`), else the ones recorded in
    the model config at training time, else derived from the checkpoint's tokenizer."""
    from speedlm.data.separators import parse_separators, resolve_separators

    if spec is not None or model.config.separators is None:
        return resolve_separators(tokenizer, parse_separators(spec))
    return list(model.config.separators)


def policy_from_args(args, model, tokenizer):
    """The KV policy of `--attention` and its sizes (None for full attention)."""
    from speedlm.cache.policies import make_policy

    separators = separators_for(model, tokenizer, args.separators) if args.attention == "sepllm" else None
    return make_policy(
        args.attention, window=args.window, sinks=args.sinks, separators=separators,
        separator_cache=args.separator_cache, cap=args.cap, heavy=getattr(args, "heavy", None),
        budget=getattr(args, "kv_budget", None), observe=getattr(args, "observe", 32), bits=getattr(args, "bits", 2),
        group=getattr(args, "group", 32), residual=getattr(args, "residual", 32),
    )


def describe_policy(policy) -> str:
    if policy is None:
        return "full attention"
    fields = ", ".join(f"{k}={v}" for k, v in vars(policy).items() if k != "separators")
    return f"{type(policy).__name__}({fields})"
