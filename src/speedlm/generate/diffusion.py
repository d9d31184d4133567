"""Parallel decoding for masked diffusion LMs (models/diffusion.py), LLaDA's sampler (Nie et
al. 2025, arXiv:2502.09992) with Fast-dLLM's confidence-threshold option (Wu et al. 2025,
arXiv:2505.22618).

The prompt is followed by `new_tokens` mask tokens, generated in semi-autoregressive blocks of
`block` positions, left to right; each block gets an equal share of the `steps` (denoising
forward passes). A step predicts every masked position of the block at once, an argmax over
the logits plus Gumbel noise in float64 scaled by the temperature (0: greedy), and unmasks
some of them, the rest staying masked (remasked) for the next step:

- `remasking="low_confidence"`: the ones whose predicted token has the highest probability;
  "random": random ones. A block's masks are spread evenly over its steps.
- `threshold=c`: every prediction whose probability exceeds c (at least the most confident
  one) at each step, until the block is filled (Fast-dLLM): easy spans go in one step, the
  step count adapts, and `steps` only sets the blocks' order of work (one block at a time).

`prefix_cache=True`: Fast-dLLM's approximate prefix KV cache (see `diffusion_generate`).

The prompt is never changed, and after the last step no position is masked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from speedlm.errors import SpeedlmError


@dataclass
class DiffusionResult:
    ids: torch.Tensor  # (B, P + new_tokens)
    new_tokens: int
    steps: int  # forward passes taken
    seconds: float

    @property
    def tokens_per_step(self) -> float:
        return self.new_tokens / max(self.steps, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


def _split(n: int, parts: int) -> list[int]:
    """n items over `parts` steps, as evenly as possible (the first steps take the remainder)."""
    base, extra = divmod(n, parts)
    return [base + (i < extra) for i in range(parts)]


def check_options(new_tokens: int, steps: int, block: int | None, remasking: str, threshold: float | None, temperature: float):
    if new_tokens < 1:
        raise SpeedlmError(f"--max-new-tokens must be >= 1, got {new_tokens}")
    block = new_tokens if block is None else block
    if block < 1:
        raise SpeedlmError(f"--block must be >= 1, got {block}")
    n_blocks = -(-new_tokens // block)
    if steps < n_blocks:
        raise SpeedlmError(f"--steps {steps} is fewer than the {n_blocks} blocks of {block} tokens; give at least one step per block")
    if remasking not in ("low_confidence", "random"):
        raise SpeedlmError(f"--remasking must be low_confidence or random, got {remasking!r}")
    if threshold is not None and not 0.0 < threshold < 1.0:
        raise SpeedlmError(f"--threshold is a probability in (0, 1), got {threshold}")
    if threshold is not None and remasking == "random":
        raise SpeedlmError("--threshold unmasks by confidence; it cannot be combined with --remasking random")
    if temperature < 0:
        raise SpeedlmError(f"--temperature must be >= 0, got {temperature}")
    return block, n_blocks


@torch.no_grad()
def diffusion_generate(model, prompt: torch.Tensor, new_tokens: int, steps: int, block: int | None = None,
                       remasking: str = "low_confidence", temperature: float = 0.0, threshold: float | None = None,
                       seed: int | None = None, prefix_cache: bool = False) -> DiffusionResult:
    """`prefix_cache`: each block's first step runs the whole sequence and records every layer's
    keys and values; the block's later steps run only the block and the masks after it, reading
    the prompt's and finished blocks' keys from that record (Fast-dLLM's approximate prefix
    cache: the prefix is not re-encoded as the block changes)."""
    block, n_blocks = check_options(new_tokens, steps, block, remasking, threshold, temperature)
    if prefix_cache and not model.supports_prefix_cache:
        raise SpeedlmError("--prefix-cache needs a diffusion model of pre-norm full-attention layers")
    if prompt.shape[1] + new_tokens > model.config.max_seq_len:
        raise SpeedlmError(f"prompt ({prompt.shape[1]}) + {new_tokens} new tokens is longer than this model allows "
                           f"(max_seq_len={model.config.max_seq_len})")
    was = model.training
    model.eval()
    g = torch.Generator().manual_seed(0 if seed is None else seed)
    b, p = prompt.shape
    x = torch.cat([prompt, prompt.new_full((b, new_tokens), model.mask_id)], dim=1)
    used, t0 = 0, time.perf_counter()
    try:
        for n, block_steps in enumerate(_split(steps, n_blocks)):
            lo, hi = p + n * block, p + min((n + 1) * block, new_tokens)
            schedule = _split(hi - lo, block_steps)
            caches = None

            def block_logits():
                nonlocal caches
                if not prefix_cache:
                    return model(x)[:, lo:hi].double()
                if caches is None:  # the block's first step: the whole sequence, recorded
                    caches = model.init_prefix_cache()
                    out = model(x, caches)[:, lo:hi].double()
                    for c in caches:
                        c.keep_prefix(lo)
                    return out
                return model(x[:, lo:], caches, start=lo)[:, : hi - lo].double()

            def predict(logits, masked):
                """Each masked position's token (Gumbel-max in float64: argmax(l / T + g) samples
                softmax(l / T)) and its confidence (random ones for random remasking)."""
                if temperature > 0:
                    u = torch.rand(logits.shape, generator=g, dtype=torch.float64).to(logits.device)
                    pred = (logits / temperature - torch.log(-torch.log(u.clamp_min(1e-300)))).argmax(-1)
                else:
                    pred = logits.argmax(-1)
                if remasking == "random" and threshold is None:
                    conf = torch.rand(masked.shape, generator=g, dtype=torch.float64).to(logits.device)
                else:
                    conf = torch.softmax(logits, -1).gather(-1, pred[..., None])[..., 0]
                return pred, conf.masked_fill(~masked, -1.0)  # only masked positions are candidates

            for k in ([] if threshold is not None else schedule):
                masked = x[:, lo:hi] == model.mask_id
                if not masked.any():
                    break
                pred, conf = predict(block_logits(), masked)
                take = torch.minimum(masked.sum(-1), torch.full_like(masked.sum(-1), max(k, 1)))
                rank = conf.argsort(-1, descending=True).argsort(-1)
                chosen = (rank < take[:, None]) & masked
                x[:, lo:hi] = torch.where(chosen, pred, x[:, lo:hi])
                used += 1
            while (x[:, lo:hi] == model.mask_id).any():  # threshold mode: until the block is filled
                masked = x[:, lo:hi] == model.mask_id
                pred, conf = predict(block_logits(), masked)
                chosen = ((conf > threshold) | (conf == conf.amax(-1, keepdim=True))) & masked
                x[:, lo:hi] = torch.where(chosen, pred, x[:, lo:hi])
                used += 1
    finally:
        model.train(was)
    return DiffusionResult(x, new_tokens, used, time.perf_counter() - t0)
