"""`speedlm bench diffusion`: a masked diffusion LM's generation speed against its quality, as the
number of denoising steps falls (steps = length, length / 2, ... : more tokens unmasked per
step), next to an autoregressive model decoding the same prompts through its KV cache.

Quality is the autoregressive "judge" model's perplexity of each generated continuation given
its prompt (lower: text the judge finds more likely), beside the share of distinct tokens in
each continuation (repetitive text has a low judge perplexity too). Prompts are windows of the validation
split. Everything runs in one process on the same prompts; writes bench_diffusion.json, .md and
a plot of judge perplexity against tokens/s.
"""

from __future__ import annotations

import datetime
import math
import os
import platform

import torch
import torch.nn.functional as F

from speedlm.bench.common import check_int, check_ints, write_results
from speedlm.errors import SpeedlmError


@torch.no_grad()
def judge_perplexity(judge, prompts: torch.Tensor, generated: torch.Tensor) -> float:
    """exp of the judge's mean NLL of `generated` (B, N) after `prompts` (B, P)."""
    x = torch.cat([prompts, generated], dim=1)
    logits = judge(x[:, :-1]).float()
    p = prompts.shape[1]
    nll = F.cross_entropy(logits[:, p - 1 :].flatten(0, 1), x[:, p:].flatten())
    return math.exp(float(nll))


def distinct(generated: torch.Tensor) -> float:
    """Distinct tokens per position of each continuation, averaged: low values flag the repetitive
    text that a judge's perplexity alone rewards."""
    return sum(len(set(row.tolist())) / len(row) for row in generated) / len(generated)


def _plot(rows: list[dict], path: str, title: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from speedlm.bench.styles import plain_numbers

    fig = Figure(figsize=(7, 4.5), dpi=100, layout="constrained")  # labels and title inside the image
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    diff = [r for r in rows if r["model"] == "diffusion"]
    ax.plot([r["tokens_per_s"] for r in diff], [r["judge_ppl"] for r in diff], "o-", label="diffusion (steps)")
    for r in diff:
        ax.annotate(f"{r['steps']} steps", (r["tokens_per_s"], r["judge_ppl"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    for r in rows:
        if r["model"] == "autoregressive":
            ax.plot([r["tokens_per_s"]], [r["judge_ppl"]], "s", markersize=8, label="autoregressive (KV cache)")
    ax.set_xscale("log")
    ax.set_xlabel("generation throughput (new tokens/s, batch of prompts; log scale)")
    ax.set_ylabel("judge perplexity of the continuation (lower is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    plain_numbers(ax)
    fig.savefig(path)
    return path


def run_diffusion_bench(diffusion_ckpt: str, judge_ckpt: str, length: int = 64, divisors=(1, 2, 4, 8), block: int | None = None,
                        prompts: int = 8, prompt_len: int = 32, temperature: float = 1.0, seed: int = 0, device="auto",
                        out_dir: str = "runs/bench") -> dict:
    from speedlm.checkpoint import load_pretrained
    from speedlm.data import encode_split, load_corpus
    from speedlm.device import resolve_device
    from speedlm.generate import generate
    from speedlm.generate.diffusion import diffusion_generate

    length, prompts, prompt_len = check_int("length", length, 1), check_int("prompts", prompts, 1), check_int("prompt_len", prompt_len, 1)
    divisors = check_ints("divisors", divisors)
    dev = resolve_device(device)
    diffusion, judged = load_pretrained(diffusion_ckpt, dev), load_pretrained(judge_ckpt, dev)
    dm, tok, state = diffusion.model, diffusion.tokenizer, diffusion.trainer_state
    judge, judge_tok = judged.model, judged.tokenizer
    if getattr(dm, "mask_id", None) is None:
        raise SpeedlmError(f"{diffusion_ckpt} is not a diffusion checkpoint (objective {dm.config.objective!r})")
    if getattr(judge, "mask_id", None) is not None or not hasattr(judge, "init_cache"):
        raise SpeedlmError(f"the judge {judge_ckpt} must be an autoregressive checkpoint")
    if tok.spec() != judge_tok.spec():
        raise SpeedlmError("the diffusion model and the judge must share a tokenizer")
    corpus = load_corpus((state.get("data") or {}).get("spec", "stdlib"))
    val = torch.as_tensor(encode_split(corpus, tok, "val").astype("int64"))
    if len(val) <= prompt_len + 1:
        raise SpeedlmError(f"--prompt-len {prompt_len} is longer than the validation split ({len(val)} tokens)")
    if prompt_len + length > min(dm.config.max_seq_len, judge.config.max_seq_len):
        raise SpeedlmError(f"--prompt-len {prompt_len} + --length {length} is longer than the models allow")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(val) - prompt_len - 1, (prompts,), generator=g)
    batch = torch.stack([val[s : s + prompt_len] for s in starts]).to(dev)
    rows = []
    generate(judge, batch[:, :8], 4, temperature=temperature, seed=seed)  # untimed warm-up of both paths
    diffusion_generate(dm, batch[:, :8], 4, 2, temperature=temperature, seed=seed)
    ar = generate(judge, batch, length, temperature=temperature, seed=seed)
    ar_new = ar.ids[:, prompt_len:]
    rows.append({"model": "autoregressive", "steps": length, "tokens_per_step": 1.0,
                 "tokens_per_s": prompts * length / (ar.prefill_s + ar.decode_s),
                 "judge_ppl": judge_perplexity(judge, batch, ar_new), "distinct": distinct(ar_new)})
    for d in divisors:
        steps = max(1, length // d)
        blk = block if block is not None else length
        steps = max(steps, -(-length // blk))
        out = diffusion_generate(dm, batch, length, steps, block=blk, temperature=temperature, seed=seed)
        rows.append({"model": "diffusion", "steps": out.steps, "tokens_per_step": out.tokens_per_step,
                     "tokens_per_s": prompts * length / out.seconds, "judge_ppl": judge_perplexity(judge, batch, out.ids[:, prompt_len:]),
                     "distinct": distinct(out.ids[:, prompt_len:])})
    result = {
        "meta": {"diffusion": diffusion_ckpt, "judge": judge_ckpt, "length": length, "block": block, "prompts": prompts,
                 "prompt_len": prompt_len, "temperature": temperature, "device": str(dev), "torch": torch.__version__,
                 "python": platform.python_version(), "threads": torch.get_num_threads(),
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        "results": rows,
    }
    lines = [f"{prompts} prompts of {prompt_len} tokens, {length} new tokens each, temperature {temperature}", "",
             "| model | denoising steps | tokens / step | new tokens/s | judge perplexity | distinct tokens |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['steps']} | {r['tokens_per_step']:.2f} | {r['tokens_per_s']:,.1f} | {r['judge_ppl']:.2f} | "
              f"{r['distinct']:.2f} |" for r in rows]
    os.makedirs(out_dir, exist_ok=True)
    files = {"json": os.path.join(out_dir, "bench_diffusion.json"), "md": os.path.join(out_dir, "bench_diffusion.md"),
             "plot": os.path.join(out_dir, "bench_diffusion.png")}
    _plot(rows, files["plot"], "masked diffusion: quality against speed")
    return write_results(result, "\n".join(lines) + "\n", files)
