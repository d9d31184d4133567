"""`speedlm stream`: a long token stream through a checkpoint under a bounded KV policy;
perplexity per segment, KV entries, tokens/s and process memory as JSONL and a plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from speedlm.commands.common import describe_policy, load_trained, policy_from_args
from speedlm.device import resolve_device
from speedlm.errors import SpeedlmError


def stream_ids(corpus, tokenizer, split: str, n: int) -> torch.Tensor:
    """n + 1 ids of the split ("val", "train" or "all": train then val), cycled when the split
    is shorter than the stream."""
    from speedlm.data import encode_split

    parts = ["train", "val"] if split == "all" else [split]
    ids = np.concatenate([np.asarray(encode_split(corpus, tokenizer, p)) for p in parts])
    if ids.size < 2:
        raise SpeedlmError(f"the {split} split has no tokens to stream")
    reps = -(-(n + 1) // ids.size)
    return torch.from_numpy(np.tile(ids, reps)[: n + 1].astype(np.int64))


def plot_stream(segments: list[dict], title: str, path: Path) -> None:
    """Perplexity, KV slots and process memory per segment. Slots and memory start at zero, so
    a flat line reads as flat (not as growth at the scale of a few kilobytes); the title, the
    policy's description, wraps inside the figure. Drawn on an Agg canvas: the global
    matplotlib backend is untouched."""
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 7), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 1, sharex=True)
    x = [s["tokens"] / 1000 for s in segments]
    for ax, key, label in zip(axes, ("ppl", "kv_mean", "rss_mb"), ("perplexity per segment", "KV slots per layer", "process RSS (MiB)")):
        ax.plot(x, [s[key] for s in segments], marker=".")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        if key != "ppl":
            ax.set_ylim(bottom=0, top=1.1 * max(s[key] for s in segments))
    fig.suptitle("\n".join(textwrap.wrap(title, 70)), fontsize=10)
    axes[-1].set_xlabel("tokens streamed (thousands)")
    fig.savefig(path, dpi=110)


def run_stream(args) -> dict:
    from speedlm.data import load_corpus
    from speedlm.generate.stream import stream_tokens

    if args.tokens < 1:
        raise SpeedlmError(f"--tokens must be positive, got {args.tokens}")
    device = resolve_device(args.device)
    model, tokenizer, state = load_trained(args.checkpoint, device)
    if not hasattr(model, "init_cache"):
        raise SpeedlmError("streaming evaluation runs a next-token model through its caches; this checkpoint (a diffusion LM) has none")
    if args.attention == "sepllm" and args.cap is None:
        args.cap = args.sinks + (args.separator_cache or 64) + args.window + 256  # room to grow between compressions
    policy = policy_from_args(args, model, tokenizer)
    if policy is None:
        raise SpeedlmError("streaming needs a bounded policy: --policy sepllm, sink or window")
    corpus = load_corpus(args.data or (state.get("data") or {}).get("spec", "stdlib"))
    ids = stream_ids(corpus, tokenizer, args.split, args.tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.attention
    jsonl = out / f"stream-{name}.jsonl"
    print(f"stream: {args.tokens:,} tokens of {corpus.name} ({args.split}) through {args.checkpoint} "
          f"under {describe_policy(policy)}, {args.chunk} tokens per call")
    with open(jsonl, "w") as f:
        def write(rec):
            f.write(json.dumps(vars(rec)) + "\n")
            f.flush()

        result = stream_tokens(model, ids, policy, chunk=args.chunk, segment=args.segment, on_segment=write)
    result["policy"] = describe_policy(policy)
    (out / f"stream-{name}.json").write_text(json.dumps({k: v for k, v in result.items() if k != "segments"}, indent=2) + "\n")
    plot_stream(result["segments"], f"{name}: {describe_policy(policy)}", out / f"stream-{name}.png")
    ppls = [s["ppl"] for s in result["segments"]]
    print(
        f"perplexity {result['ppl']:.3f} over {result['tokens']:,} tokens (segments {min(ppls):.2f}-{max(ppls):.2f}); "
        f"KV slots per layer {result['kv_mean']:.0f} on average, {result['kv_peak']} at peak; "
        f"{result['tokens_per_s']:,.0f} tokens/s; memory {result['rss_warm_mb']:.0f} MiB after the first segment, "
        f"{result['rss_end_mb']:.0f} MiB at the end ({result['rss_growth']:+.1%})"
    )
    print(f"records: {jsonl}\nplot: {out / f'stream-{name}.png'}")
    return result
