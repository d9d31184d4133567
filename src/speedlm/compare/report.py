"""The compare report: report.json (every number) and report.md (the leaderboard, the plan that
made the compute fair, the environment and the plots)."""

from __future__ import annotations

import json
import math
import os

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
TABLE_STATE_CONTEXTS = (4096, 65536)


def human_bytes(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}" if n / size < 100 else f"{n / size:,.0f} {unit}"
    return f"{n} B"


def _ctx(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _get(d: dict | None, n: int):
    """Dict keyed by context length, whether keys are ints (in memory) or strings (from JSON)."""
    if not d:
        return None
    return d.get(n, d.get(str(n)))


def _num(v, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


PRETRAINED_MARK = "†"
ZERO_SHOT_MARK = "ᶻ"


def _zero_shot(m: dict) -> str:
    """A pretrained row's MQAR cell: its zero-shot probe (compare/zero_shot_recall.py), or — without one."""
    z = m.get("mqar_zero_shot")
    return "—" if z is None else f"{z:.3f}{ZERO_SHOT_MARK}"


def ranked(models: list[dict]) -> list[dict]:
    """Finished models trained by the compare by validation loss (best first), then finished
    pretrained entries (their loss is per token of their own tokenizer, not ranked against the
    others), then the others, each in their given order."""
    ok = sorted((m for m in models if m["status"] == "ok" and not m.get("pretrained")), key=lambda m: m["val_loss"])
    pretrained = [m for m in models if m["status"] == "ok" and m.get("pretrained")]
    return ok + pretrained + [m for m in models if m["status"] != "ok"]


def pretrained_note(report: dict) -> str:
    """The footnote of the leaderboard's pretrained rows (empty without any)."""
    rows = [m for m in report["models"] if m["status"] == "ok" and m.get("pretrained")]
    if not rows:
        return ""
    tokens = "; ".join(f"{m['name']}: {_tokenizer_text(m)}" for m in rows)
    return (f"{PRETRAINED_MARK} A pretrained entry (a checkpoint folder in `--presets`) is measured as saved: not trained "
            "by this compare (0 steps; no trained MQAR probe, the zero-shot one on its weights), not resized. Its loss "
            f"and perplexity are per token of its own tokenizer ({tokens}) on the same validation text, so it is listed "
            "unranked below the models trained here; "
            "bits per byte compare across tokenizers. Its inference columns are measured on its weights as for the others.")


def _tokenizer_text(m: dict) -> str:
    spec = m.get("tokenizer") or {}
    same = " (the compare's own)" if m.get("same_tokenizer") else ""
    return f"{spec.get('kind', '?')}, {spec.get('vocab_size', 0):,} tokens{same}"


def leaderboard_markdown(report: dict) -> str:
    opts = report["meta"]["options"]
    contexts = opts["contexts"]
    short, long = contexts[0], contexts[-1]
    head = (
        "| # | model | params | train MFLOP/token | steps | val loss | ppl | bits/byte | MQAR acc | train tok/s | "
        f"prefill tok/s @{_ctx(long)} | decode ms @{_ctx(short)} | decode ms @{_ctx(long)} | "
        + " | ".join(f"state @{_ctx(n)}" for n in TABLE_STATE_CONTEXTS)
        + " |"
    )
    # a state column holds what the trained model's cache held where that context was measured,
    # else what the trained model declares (analytic); `state_note` says which
    lines = [head, "|" + "---|" * (13 + len(TABLE_STATE_CONTEXTS))]
    for i, m in enumerate(ranked(report["models"]), 1):
        if m["status"] != "ok":
            params = format(m["params"], ",") if m.get("params") else "-"
            lines.append(f"| - | {m['name']} | {params} | {m['status']}: {m.get('reason', '')} |"
                         + " |" * (9 + len(TABLE_STATE_CONTEXTS)))
            continue
        pre = bool(m.get("pretrained"))  # unranked: its loss is in its own tokens (pretrained_note)
        mqar = (_zero_shot(m) if m.get("mqar_skipped") else
                _num(m.get("mqar_accuracy"), ".3f") + ("*" if m.get("mqar_flag") else ""))
        lines.append(
            f"| {PRETRAINED_MARK if pre else i} | {m['name']} | {_params(m)} | {m['train_flops_per_token'] / 1e6:.3f} | "
            f"{m['steps']:,}{' (pretrained)' if pre else ''} | "
            f"{m['val_loss']:.4f}{' (bound)' if m.get('bound') else ''}{f' (own tokens){PRETRAINED_MARK}' if pre else ''} | "
            f"{'≤ ' if m.get('bound') else ''}{m['val_ppl']:.3f} | {_num(m.get('val_bits_per_byte'), '.3f')} | {mqar} | "
            f"{_num(m['train_tok_per_s'], ',.0f')} | {_num(_get(m['prefill_tok_s'], long), ',.0f')} | "
            f"{_num(_get(m['decode_ms'], short), '.2f')} | {_num(_get(m['decode_ms'], long), '.2f')} | "
            + " | ".join(human_bytes(state_at(m, n)) for n in TABLE_STATE_CONTEXTS)
            + " |"
        )
    return "\n".join(lines)


def state_at(m: dict, n: int):
    """The cache the trained model held after n tokens where it was measured, else its declared
    (analytic) state."""
    held = _get(m.get("cache_bytes"), n)
    return held if held is not None else _get(m.get("state_bytes"), n)


def state_note(report: dict) -> str:
    contexts = set(report["meta"]["options"]["contexts"])
    held = [f"@{_ctx(n)}" for n in TABLE_STATE_CONTEXTS if n in contexts]
    declared = [f"@{_ctx(n)}" for n in TABLE_STATE_CONTEXTS if n not in contexts]
    parts = []
    if held:
        parts.append(f"state {', '.join(held)} is what the trained model's caches held after that many tokens (measured)")
    if declared:
        parts.append(f"state {', '.join(declared)} is what the trained model declares (analytic, `state_bytes`)")
    return "; ".join(parts)


def learned_markdown(report: dict) -> str:
    """The data-dependent models as trained: their learned values, and their state declared
    against held where the two differ."""
    lines = []
    for m in report["models"]:
        if m["status"] != "ok":
            continue
        layers = [(i, d) for i, d in enumerate(m.get("learned") or []) if d]
        gaps = [
            (n, _get(m.get("state_bytes"), n), _get(m.get("cache_bytes"), n)) for n in sorted(
                int(k) for k in (m.get("cache_bytes") or {}))
        ]
        gaps = [(n, d, h) for n, d, h in gaps if d is not None and h is not None and d != h]
        if not layers and not gaps:
            continue
        lines.append(f"- **{m['name']}**")
        for i, d in layers:
            parts = []
            if "spans" in d:
                parts.append(f"spans {', '.join(f'{z:g}' for z in d['spans'])} tokens (window {d['span_window']})")
            if "routed_fraction" in d:
                parts.append(f"routes {d['routed_fraction']:.1%} of the tokens of a validation sequence "
                             f"(capacity {d.get('capacity', 0):.1%})")
            if parts:
                lines.append(f"  - layer {i}: " + "; ".join(parts))
        for n, declared, held in gaps:
            lines.append(f"  - after {n:,} tokens: declared {human_bytes(declared)}, held {human_bytes(held)}")
        if m.get("mqar_cache_bytes") is not None and m.get("mqar_cache_bytes") != m.get("mqar_state_bytes"):
            lines.append(f"  - MQAR model: declared {human_bytes(m['mqar_state_bytes'])}, held "
                         f"{human_bytes(m['mqar_cache_bytes'])}")
    return "\n".join(lines)


def executed_markdown(report: dict) -> str:
    """Counted against executed training FLOPs per token, per finished model that measured them."""
    rows = [m for m in report["models"] if m["status"] == "ok" and m.get("executed_flops_per_token") is not None]
    if not rows:
        return ""
    lines = ["| model | counted MFLOP/token | visible MFLOP/token | executed MFLOP/token | executed / visible |",
             "|---|---|---|---|---|"]
    for m in rows:
        visible = m["counted_visible_flops_per_token"]
        lines.append(f"| {m['name']} | {m['counted_flops_per_token'] / 1e6:.3f} | {visible / 1e6:.3f} | "
                     f"{m['executed_flops_per_token'] / 1e6:.3f} | {m['executed_flops_per_token'] / visible:.2f} |")
    return "\n".join(lines)


def mqar_cost_text(report: dict) -> str:
    """What the recall probe cost, beside the language-model training it sits next to."""
    rows = [m for m in report["models"] if m["status"] == "ok" and m.get("mqar_train_flops")]
    if not rows:
        return ""
    flops = sum(m["mqar_train_flops"] for m in rows)
    train = sum(m["train_flops"] for m in rows)
    seconds = sum((m.get("seconds") or {}).get("mqar", 0.0) for m in rows)
    train_s = sum((m.get("seconds") or {}).get("train", 0.0) for m in rows)
    return (f"What it cost: {flops:.3g} training FLOPs over the {len(rows)} models ({flops / train:.2f}x their "
            f"language-model training) and {seconds:.0f} s on this machine ({seconds / max(train_s, 1e-9):.2f}x the "
            f"{train_s:.0f} s of language-model training and its validation).")


def _params(m: dict) -> str:
    """Total parameters, and the active ones where a token passes through fewer (MoE)."""
    active = m.get("params_active", m["params"])
    return f"{m['params']:,}" if active == m["params"] else f"{m['params']:,} ({active:,} active)"


def _active_non_embedding(m: dict) -> int:
    return m.get("params_active_non_embedding", m["params_non_embedding"])  # reports before active params


def _plan_markdown(report: dict) -> str:
    models = [m for m in report["models"] if "d_model" in m]
    trained = [m for m in models if not m.get("pretrained")]  # a pretrained entry is never the width target
    first = _active_non_embedding(trained[0]) if trained else None
    match = report["meta"]["options"]["match"]
    lines = [
        "| model | d_model (preset) | params | non-embedding (active) | vs first | train MFLOP/token | steps | tokens | train FLOPs |",
        "|---|---|---|---|---|---|---|---|---|",
        # (steps, tokens and FLOPs as trained: a data-dependent model may stop before its planned steps)
    ]
    for m in models:
        ratio = f"{_active_non_embedding(m) / first:.3f}" if first and match == "first" else "-"
        lines.append(
            f"| {m['name']} | {m['d_model']} ({'as saved' if m.get('pretrained') else m['preset_d_model']}) | {m['params']:,} | "
            f"{m['params_non_embedding']:,} ({_active_non_embedding(m):,}) | "
            f"{ratio} | {m['train_flops_per_token'] / 1e6:.3f} | {m['steps']:,} | {m['tokens']:,} | {m['train_flops']:.3g} |"
        )
    return "\n".join(lines)


def report_markdown(report: dict, plots: dict[str, str] | None = None) -> str:
    meta, opts = report["meta"], report["meta"]["options"]
    data = meta["data"]
    mqar = opts.get("mqar")
    lines = [
        "# speedlm compare",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {meta['machine']}; device {meta['device']}, training dtype {meta['train_dtype']}; Python {meta['python']}, torch {meta['torch']}, speedlm {meta['speedlm']}; {meta['date']}.",
        "",
        f"Data: {data['name']} ({data['files']} files, fingerprint `{data['fingerprint']}`), "
        f"{opts['tokenizer']} tokenizer. Every model: {_budget_text(opts)}, batches of "
        f"{opts['batch_size']} x {opts['seq_len']} tokens in the same order, seed {opts['seed']}, peak lr {opts['lr']} "
        f"with {opts['warmup_fraction']:.0%} warmup then cosine to {opts['min_lr_ratio']} x.",
        "",
        "Timing columns (train, prefill and decode) were measured in one process, one model after another, on this "
        "machine: compare them with each other, not with other machines. Every other number repeats exactly when "
        "the command is run again with the same seed.",
        "",
        "## Leaderboard (by validation loss)",
        "",
        leaderboard_markdown(report),
        "",
        f"Validation loss: nats per token over {opts['final_eval_batches']} x {opts['batch_size']} x {opts['seq_len']} "
        "held-out tokens. Decode: median ms per token after a prefill of that many tokens, batch 1, on the trained "
        f"model. Bits per byte: the summed loss over the bytes of the text those tokens hold, in bits. "
        f"State, batch 1, in {_state_dtype(report)}: {state_note(report)}.",
        "",
        *([pretrained_note(report), ""] if pretrained_note(report) else []),
        "## Fair compute",
        "",
        "The first model keeps its preset's width; each other model takes the width (in steps that keep its "
        "heads even) whose non-embedding parameters are closest to the first model's"
        + (" (`--match-params none`: every preset kept its width)." if opts["match"] == "none" else ".")
        + (" Each then trains for as many steps as the budget pays for at its own analytic cost per token "
           "(`flops_per_token`), so a cheaper model sees more tokens; a model whose cost follows what it learns "
           "(adaptive span's spans) spends the budget step by step at the cost each step ran at, and stops when it "
           "is spent (its steps and FLOPs per token below are the ones it ran)."
           if opts.get("time_budget") is None else
           f" Each then trains for {opts['time_budget']:g} s on this machine: its steps were calibrated on a few "
           "steps of a throwaway copy and fixed before training (the FLOPs below are what those steps cost)."),
        "",
        *(["A pretrained entry keeps its saved width, is not the width target and takes 0 steps (its training "
           "FLOPs per token are what a token of training would cost it)."]
          if any(m.get("pretrained") for m in report["models"]) else []),
        "",
        _plan_markdown(report),
        "",
    ]
    executed = executed_markdown(report)
    if executed:
        lines += [
            "## Counted and executed FLOPs",
            "",
            f"One training step (forward + backward) of each trained model on a {opts['seq_len']}-token validation "
            "sequence under `torch.utils.flop_counter.FlopCounterMode`, per token. Counted: what the budget spends "
            "(README, \"How FLOPs are counted\"); visible: the part of that count made of matrix products, which the "
            "counter sees (scans, FFTs and solves are elementwise to it); executed / visible above 1 is what the "
            "implementation computes beyond the mechanism's visible pairs (whole key blocks, dense chunks, padding).",
            "",
            executed,
            "",
        ]
    if mqar:
        from speedlm.compare.run import MQAR_CHECKPOINTS, MQAR_STOP_AT

        lines += [
            "## Associative recall (MQAR)",
            "",
            f"A probe, not Zoology's full protocol: each architecture at its compare width with one head, trained up to "
            f"{mqar['steps']} steps x {mqar['batch_size']} fresh sequences (T={mqar['seq_len']}, {mqar['num_kv_pairs']} "
            f"key-value pairs, vocabulary {mqar['vocab_size']}, {'random' if mqar.get('random_non_queries') else 'zero'} "
            f"filler, lr {mqar['lr']}), scored on {mqar['test_examples']} held-out sequences at {MQAR_CHECKPOINTS} "
            f"checkpoints; a run stops at the first that scores {MQAR_STOP_AT:g}. Chance is "
            f"{1 / (mqar['vocab_size'] - mqar['vocab_size'] // 2):.3f}. * marks a run still rising or on a plateau when "
            "the probe ended: its number says when training stopped, not what the architecture can hold. "
            "`speedlm bench recall` runs Zoology's protocol (a learning-rate sweep, widths, accuracy against state size).",
            "",
        ]
        flagged = [f"{m['name']} ({m['mqar_flag']})" for m in report["models"] if m.get("mqar_flag")]
        if flagged:
            lines += ["Still learning when the probe ended: " + ", ".join(flagged) + ".", ""]
        zero = [m["name"] for m in report["models"] if m["status"] == "ok" and m.get("mqar_zero_shot") is not None]
        if zero:
            lines += [f"{ZERO_SHOT_MARK} Zero-shot, on the checkpoint's own weights ({', '.join(zero)}): the same task, "
                      "untrained, written in the checkpoint's most frequent validation tokens (MQAR's token i is its "
                      "i-th commonest), scored by its argmax over its whole vocabulary on the queries; a model that "
                      "learned to copy from context (induction) recalls, one whose state lost the pair does not. "
                      "It ranks pretrained rows against each other, not against the trained probe's column.", ""]
        skipped = [f"{m['name']} ({m['mqar_skipped']})" for m in report["models"]
                   if m["status"] == "ok" and m.get("mqar_skipped") and m.get("mqar_zero_shot") is None]
        if skipped:  # "—" in the leaderboard
            lines += ["Not probed (— in the leaderboard): " + "; ".join(skipped) + ".", ""]
        cost = mqar_cost_text(report)
        if cost:
            lines += [cost, ""]
    learned = learned_markdown(report)
    if learned:
        lines += [
            "## Data-dependent models as trained",
            "",
            "What the trained weights do where cost and state depend on them (inference and MQAR columns are measured "
            "on these weights), and where the declared state differs from what the caches held:",
            "",
            learned,
            "",
        ]
    failed = [m for m in report["models"] if m["status"] != "ok"]
    if failed:
        lines += ["## Models that did not finish", ""]
        lines += [f"- {m['name']}: {m['status']}: {m.get('reason', '')}" for m in failed]
        lines += ["", "Tracebacks, where there were any, are in `errors.log`.", ""]
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{key}]({os.path.basename(path)})" for key, path in plots.items()]
        lines.append("")
    return "\n".join(lines)


def _budget_text(opts: dict) -> str:
    if opts.get("time_budget") is not None:
        return f"{opts['time_budget']:g} s of training on this machine (equal wall-clock; FLOPs spent and tokens seen in the plan)"
    return f"{opts['budget']:.3g} training FLOPs"


def _state_dtype(report: dict) -> str:
    for m in report["models"]:
        if m.get("state_dtype"):
            return m["state_dtype"]
    return "the inference dtype"


def jsonable(obj):
    """A report as JSON: string keys, NaN and infinities as null, and keys starting with "_"
    (in-memory only: a sweep's fitted curves, an executor's tags) left out."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_report(report: dict, out_dir: str, plots: dict[str, str] | None = None) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    files = {"json": os.path.join(out_dir, REPORT_JSON), "md": os.path.join(out_dir, REPORT_MD)}
    with open(files["json"], "w") as f:
        json.dump(jsonable(report), f, indent=2)
    with open(files["md"], "w") as f:
        f.write(report_markdown(report, plots))
    return files
