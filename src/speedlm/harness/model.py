"""`SpeedlmLM`: a speedlm checkpoint as lm-evaluation-harness's `LM` (model name "speedlm").

Everything runs through speedlm's own paths, so what the harness measures is what speedlm
computes, caches and KV policies included:

- loglikelihood: each context is prefilled once into the model's cache (`init_cache`, then
  `model(ids, cache)`) and its continuations are read from that state, so recurrent, SSM and
  KV-policy caches serve the scoring. A context with several continuations (multiple choice)
  is prefilled once and its cache copied for each; single-continuation requests of equal
  context and continuation lengths share one batched cache.
- loglikelihood_rolling: the text in disjoint windows of `max_length` predicted tokens, each
  read afresh exactly as `speedlm eval` reads its validation windows (train/evaluate.py), so the
  two agree token for token; the text's first token is not scored (speedlm tokenizers have no
  BOS token to predict it from), as in `speedlm eval`.
- generate_until: `speedlm.generate.generate` with its stop strings (generate/stop.py).

A request with an empty context is refused: with no BOS token nothing predicts the first token.
Under a policy with original positions (window, training-free sepllm) a score does not depend on
how the calls are cut; under shifted positions (sink, sepllm with a cap) it does, by design of
those caches: here the context is one call and the continuation another.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections import defaultdict
from types import SimpleNamespace

import torch

from speedlm.errors import SpeedlmError
from speedlm.harness import require_lm_eval

require_lm_eval()

import lm_eval.models  # noqa: E402  the built-in models' lazy entries, before ours makes the registry non-empty
from lm_eval.api.model import LM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")


@register_model("speedlm")
class SpeedlmLM(LM):
    """checkpoint: a run or step folder. max_length: the rolling window (default: the training
    seq_len, as `speedlm eval`). attention (+ window, sinks, separators, separator_cache, cap):
    the KV policy of `speedlm eval --attention`. dtype: float32, float64 or bfloat16 weights."""

    def __init__(self, checkpoint: str, batch_size: int | str = 16, device: str | None = "auto",
                 max_length: int | None = None, max_gen_toks: int = 256, attention: str = "full", window: int = 256,
                 sinks: int = 4, separators: str | None = None, separator_cache: int | None = None,
                 cap: int | None = None, dtype: str = "float32", max_batch_size: int | None = None, **unknown):
        super().__init__()
        from speedlm.commands.common import load_trained, policy_from_args
        from speedlm.device import resolve_device

        # max_batch_size is accepted and unused: the harness passes it for "auto" batch sizes, which speedlm refuses
        if unknown:
            raise SpeedlmError(f"model_args {', '.join(sorted(unknown))}: not options of speedlm (checkpoint, "
                               "batch_size, device, max_length, max_gen_toks, attention, window, sinks, separators, "
                               "separator_cache, cap, dtype)")
        if isinstance(batch_size, str) and not batch_size.isdigit():
            raise SpeedlmError(f"batch_size={batch_size!r}: speedlm takes a number of rows, not 'auto'")
        if dtype not in DTYPES:
            raise SpeedlmError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
        self.batch_size = int(batch_size)
        self._device = resolve_device(device)
        self.model, self.tokenizer, state = load_trained(str(checkpoint), self._device)
        if not hasattr(self.model, "init_cache"):
            raise SpeedlmError("lm-evaluation-harness scores autoregressive checkpoints; this one "
                               f"({type(self.model).__name__}) has no causal caches")
        self.model.to(DTYPES[dtype]).eval()
        options = SimpleNamespace(attention=attention, window=window, sinks=sinks, separators=separators,
                                  separator_cache=separator_cache, cap=cap)
        self.policy = policy_from_args(options, self.model, self.tokenizer)
        self.limit = self.model.max_context(self.policy)  # None: bounded caches, any length
        self.max_length = int(max_length or state.get("train_config", {}).get("seq_len") or self.limit or 2048)
        self.max_gen_toks = int(max_gen_toks)
        self.checkpoint = state["checkpoint_path"]

    # ----- what the harness records about the model -----
    @property
    def tokenizer_name(self) -> str:
        return f"speedlm-{self.tokenizer.spec()['kind']}-{self.tokenizer.fingerprint()}"

    def get_model_info(self) -> dict:
        return {"checkpoint": self.checkpoint, "max_length": self.max_length,
                "attention": "full" if self.policy is None else type(self.policy).__name__}

    # ----- tokens -----
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).tolist()

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """As the harness's causal models: trailing spaces of the context move to the
        continuation, and the continuation's ids are the whole text's after the context's."""
        if not context:
            raise SpeedlmError("a loglikelihood request with an empty context: speedlm tokenizers have no BOS "
                               "token to predict the first token from")
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx, whole[len(ctx):]

    def _logprobs(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (B, T, V), targets (B, T) -> summed log-probabilities (B,) float64 and whether
        every target is the argmax (B,). Log-softmax in float32 at least, as `speedlm eval`."""
        logits = logits.float() if logits.dtype != torch.float64 else logits
        lp = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        return lp.double().sum(-1), (logits.argmax(-1) == targets).all(-1)

    def _tensor(self, rows) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self._device)

    # ----- loglikelihood -----
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._truncate(*self._encode_pair(*r.args)) for r in requests]
        results = self.score_pairs(pairs)
        for r, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", r.args, res)
        return results

    def _truncate(self, ctx: list[int], cont: list[int]) -> tuple[list[int], list[int]]:
        """The context's oldest tokens dropped where the model's length limit requires."""
        if not cont:
            raise SpeedlmError("a loglikelihood request with an empty continuation; there is nothing to score")
        if self.limit is not None and len(ctx) + len(cont) > self.limit:
            if len(cont) >= self.limit:
                raise SpeedlmError(f"a continuation of {len(cont)} tokens does not fit the model's "
                                   f"max_seq_len={self.limit} after a context token")
            ctx = ctx[len(ctx) + len(cont) - self.limit:]
        return ctx, cont

    @torch.no_grad()
    def score_pairs(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (log-likelihood of the continuation, greedy?)."""
        results: list = [None] * len(pairs)
        by_context = defaultdict(list)
        for i, (ctx, _) in enumerate(pairs):
            by_context[tuple(ctx)].append(i)
        rows = defaultdict(list)  # one continuation per context: rows batched by (context, continuation) lengths
        for ctx, idx in by_context.items():
            if len(idx) == 1:
                rows[len(ctx), len(pairs[idx[0]][1])].append(idx[0])
            else:
                self._score_shared(ctx, idx, pairs, results)
        for group in rows.values():
            for at in range(0, len(group), self.batch_size):
                chunk = group[at:at + self.batch_size]
                cache = self.model.init_cache(self.policy)
                first = self.model(self._tensor([pairs[i][0] for i in chunk]), cache)[:, -1:]
                lp, greedy = self._continue(first, self._tensor([pairs[i][1] for i in chunk]), cache)
                for j, i in enumerate(chunk):
                    results[i] = (float(lp[j]), bool(greedy[j]))
        return results

    def _score_shared(self, ctx, idx, pairs, results) -> None:
        """One prefill of `ctx`; each continuation continues from a copy of its cache."""
        cache = self.model.init_cache(self.policy)
        first = self.model(self._tensor([list(ctx)]), cache)[:, -1:]
        # the copies share the model's modules and weights (a KV cache may hold its rotary module)
        model = self.model
        shared = {id(t): t for t in itertools.chain(model.modules(), model.parameters(), model.buffers())}
        for n, i in enumerate(idx):
            fork = cache if n == len(idx) - 1 else copy.deepcopy(cache, dict(shared))
            lp, greedy = self._continue(first, self._tensor([pairs[i][1]]), fork)
            results[i] = (float(lp[0]), bool(greedy[0]))

    def _continue(self, first: torch.Tensor, cont: torch.Tensor, cache):
        """Scores `cont` (B, K) after a prefill whose last logits are `first` (B, 1, V)."""
        logits = first if cont.shape[1] == 1 else torch.cat([first, self.model(cont[:, :-1], cache)], dim=1)
        return self._logprobs(logits, cont)

    # ----- loglikelihood_rolling -----
    @torch.no_grad()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        totals = self.rolling_logprobs([r.args[0] for r in requests])
        for r, res in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, res)
        return totals

    @torch.no_grad()
    def rolling_logprobs(self, texts: list[str]) -> list[float]:
        """Per text, the summed log-probability of its tokens after the first, in disjoint windows
        of `max_length` targets (window i: inputs ids[iL:(i+1)L], targets one ahead): `speedlm
        eval`'s windows, the last one shorter rather than dropped."""
        windows = defaultdict(list)  # length -> [(text index, start)]
        ids = [self.encode(t) for t in texts]
        for k, seq in enumerate(ids):
            for start in range(0, len(seq) - 1, self.max_length):
                windows[min(self.max_length, len(seq) - 1 - start)].append((k, start))
        totals = [0.0] * len(texts)
        for length, group in windows.items():
            for at in range(0, len(group), self.batch_size):
                chunk = group[at:at + self.batch_size]
                x = self._tensor([ids[k][s:s + length] for k, s in chunk])
                y = self._tensor([ids[k][s + 1:s + length + 1] for k, s in chunk])
                # as train/evaluate.py: one call through fresh caches under a policy, else the plain forward
                logits = self.model(x) if self.policy is None else self.model(x, self.model.init_cache(self.policy))
                lp, _ = self._logprobs(logits, y)
                for j, (k, _) in enumerate(chunk):
                    totals[k] += float(lp[j])
        return totals

    # ----- generate_until -----
    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups = defaultdict(list)  # rows generated together: equal prompt lengths and settings
        prompts = []
        for i, r in enumerate(requests):
            context, gen_kwargs = r.args
            settings = self._settings(gen_kwargs)
            prompt = self._prompt(context, settings["max_gen_toks"])
            prompts.append(prompt)
            groups[len(prompt), json.dumps(settings, sort_keys=True)].append(i)
        out: list = [None] * len(requests)
        for (_, key), group in groups.items():
            settings = json.loads(key)
            for at in range(0, len(group), self.batch_size):
                chunk = group[at:at + self.batch_size]
                for i, text in zip(chunk, self.generate_texts([prompts[i] for i in chunk], **settings)):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def _settings(self, gen_kwargs: dict) -> dict:
        unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
        if unknown:
            raise SpeedlmError(f"generation_kwargs {', '.join(unknown)}: speedlm generates with "
                               f"{', '.join(GEN_KWARGS)} only")
        until = gen_kwargs.get("until") or []
        sample = bool(gen_kwargs.get("do_sample", False)) and float(gen_kwargs.get("temperature") or 0.0) > 0
        return {"until": [until] if isinstance(until, str) else list(until),
                "max_gen_toks": int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)),
                "temperature": float(gen_kwargs["temperature"]) if sample else 0.0,
                "top_k": gen_kwargs.get("top_k") if sample else None,
                "top_p": gen_kwargs.get("top_p") if sample else None}

    def _prompt(self, context: str, max_gen_toks: int) -> list[int]:
        prompt = self.encode(context)
        if not prompt:
            raise SpeedlmError("a generate_until request with an empty context: speedlm tokenizers have no BOS "
                               "token to start from")
        if self.limit is not None:  # room for the new tokens: the context's oldest tokens go first
            if max_gen_toks >= self.limit:
                raise SpeedlmError(f"max_gen_toks={max_gen_toks} leaves no room for a context within the "
                                   f"model's max_seq_len={self.limit}")
            prompt = prompt[-(self.limit - max_gen_toks):]
        return prompt

    def generate_texts(self, prompts: list[list[int]], until: list[str], max_gen_toks: int, temperature: float = 0.0,
                       top_k: int | None = None, top_p: float | None = None) -> list[str]:
        """Prompts of equal length -> each row's new text up to its first stop string."""
        from speedlm.generate import generate
        from speedlm.generate.stop import StopStrings, cut_at_stop

        ids = self._tensor(prompts)
        result = generate(self.model, ids, max_gen_toks, temperature=temperature, top_k=top_k, top_p=top_p,
                          kv_policy=self.policy, stop=StopStrings(self.tokenizer, until) if until else None)
        return [cut_at_stop(self.tokenizer.decode(row.tolist()), until) for row in result.ids[:, ids.shape[1]:]]
