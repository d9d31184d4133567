"""`speedlm generate`: prefill the prompt, decode through the caches, report tokens/s."""

from __future__ import annotations

import torch

from speedlm.commands.common import describe_policy, load_trained, policy_from_args
from speedlm.device import resolve_device


def run_generate(args):
    from speedlm.generate import generate
    from speedlm.generate.stop import StopStrings, cut_at_stop

    device = resolve_device(args.device)
    model, tokenizer, _ = load_trained(args.checkpoint, device)
    if getattr(model, "mask_id", None) is not None:
        return _run_diffusion(args, model, tokenizer, device)
    if args.steps is not None or args.block is not None or args.threshold is not None or args.prefix_cache:
        from speedlm.errors import SpeedlmError

        raise SpeedlmError("--steps, --block, --threshold and --prefix-cache are for diffusion checkpoints; this one is autoregressive")
    policy = policy_from_args(args, model, tokenizer)
    ids = torch.as_tensor(tokenizer.encode(args.prompt), dtype=torch.long, device=device).view(1, -1)
    result = generate(
        model,
        ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        use_cache=not args.no_cache,
        kv_policy=policy,
        compile=getattr(args, "compile", False),
        stop=StopStrings(tokenizer, args.stop) if args.stop else None,
    )
    if args.stop:  # the prompt, then the new text up to the first stop string
        print(args.prompt + cut_at_stop(tokenizer.decode(result.ids[0, ids.shape[1]:].tolist()), args.stop))
    else:
        print(tokenizer.decode(result.ids[0].tolist()))
    cache = "no cache" if args.no_cache else f"cache {result.cache_bytes / 1024:.1f} KiB"
    if result.kv_ratio is not None and policy is not None:
        cache += (f", {describe_policy(policy)}: KV {result.kv_ratio:.1%} of the full cache on average, "
                  f"{result.kv_peak_ratio:.1%} at peak")
    compiled = "" if result.compile_s is None else f", first steps compiling {result.compile_s:.1f} s"
    print(
        f"\n[{result.new_tokens} tokens: prefill {result.prefill_s * 1e3:.1f} ms{compiled}, "
        f"decode {result.decode_tokens_per_s:.1f} tokens/s, {cache}]"
    )
    return result


def _run_diffusion(args, model, tokenizer, device):
    from speedlm.errors import SpeedlmError
    from speedlm.generate.diffusion import diffusion_generate

    ignored = [flag for flag, value in (("--top-k", args.top_k), ("--top-p", args.top_p), ("--no-cache", args.no_cache),
                                        ("--compile", getattr(args, "compile", False)),
                                        ("--attention", getattr(args, "attention", "full") != "full"),
                                        ("--stop", getattr(args, "stop", None))) if value]
    if ignored:
        raise SpeedlmError(f"{', '.join(ignored)}: not for diffusion checkpoints (they unmask with --steps, --block, "
                           "--remasking, --threshold, --temperature, --prefix-cache)")

    ids = torch.as_tensor(tokenizer.encode(args.prompt), dtype=torch.long, device=device).view(1, -1)
    steps = args.steps if args.steps is not None else args.max_new_tokens
    result = diffusion_generate(model, ids, args.max_new_tokens, steps, block=args.block, remasking=args.remasking,
                                temperature=args.temperature, threshold=args.threshold, seed=args.seed,
                                prefix_cache=args.prefix_cache)
    print(tokenizer.decode(result.ids[0].tolist()))
    print(f"\n[{result.new_tokens} tokens in {result.steps} denoising steps ({result.tokens_per_step:.2f} tokens/step), "
          f"{result.tokens_per_s:.1f} tokens/s]")
    return result
