"""Pretrained entries: a checkpoint folder in `speedlm compare --presets` is measured as it is.

A run or step folder (one `speedlm train` wrote, or `speedlm hf import`) joins the comparison
with its own weights and its own tokenizer. It is never resized by width matching nor the width
target, never trained (0 steps, 0 training FLOPs) and gets no trained MQAR probe (the probe trains a
fresh model of the architecture on a synthetic task, which says nothing about these weights):
its MQAR column is the zero-shot probe instead, the same task in its own frequent tokens read by
its own weights (compare/zero_shot_recall.py).
Its first stage evaluates it instead of training it: the validation loss on the compare's own
validation text, encoded with the checkpoint's tokenizer (`speedlm eval`'s number on that
text), so the loss is in nats per token *of its tokens* and ranks against nothing the compare
trained; bits per byte (every row has them) put both on the text's bytes. The inference stage
then runs on its weights like on any trained model's.
"""

from __future__ import annotations

import hashlib
import math
import os
import time

import torch

from speedlm.errors import SpeedlmError

MQAR_SKIPPED = ("pretrained entry: the MQAR probe trains a fresh model of the architecture on a synthetic task, "
                "not these weights; its column shows the zero-shot probe on them (compare/zero_shot_recall.py)")


def pretrained_inside(path: str, out_dir: str) -> bool:
    """Whether checkpoint `path` lies in `out_dir`'s models/ folder, which compare rewrites."""
    models = os.path.realpath(os.path.join(out_dir, "models"))
    return os.path.commonpath([os.path.realpath(path), models]) == models


def checkpoint_identity(path: str) -> dict:
    """What a resumed compare must find again in checkpoint `path` (JSON-able): its step folder,
    hashes of its config and saved state, its weights' size. A corrupt folder is its error (its
    row fails in the run, and the same error resumes)."""
    from speedlm.bench.common import one_line
    from speedlm.checkpoint.files import CONFIG_FILE, MODEL_FILE, STATE_FILE, resolve_checkpoint

    def digest(p) -> str | None:
        return hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.is_file() else None

    try:
        folder = resolve_checkpoint(path)
        weights = folder / MODEL_FILE
        return {"step_folder": os.path.realpath(folder), "config": digest(folder / CONFIG_FILE),
                "state": digest(folder / STATE_FILE),
                "weights_bytes": weights.stat().st_size if weights.is_file() else None}
    except (SpeedlmError, OSError) as e:
        return {"error": one_line(e)}


def scored_bytes(tokenizer, ids, tokens: int) -> int:
    """UTF-8 bytes of the text whose tokens an evaluation over `ids` scored: the targets
    ids[1 : tokens + 1] (`iter_eval_batches` tiles them without gap). Bytes are exact for the
    byte tokenizer; other tokenizers decode the span (a character cut at its ends counts as
    the replacement character: a few bytes in many thousands)."""
    span = ids[1 : tokens + 1]
    if tokenizer.kind == "byte":
        return int(len(span))
    return len(tokenizer.decode(span).encode("utf-8"))


def bits_per_byte(loss: float, tokens: int, nbytes: int) -> float:
    """Total nats over the scored tokens, per byte of their text, in bits: a figure two
    tokenizers share."""
    return loss * tokens / max(nbytes, 1) / math.log(2)


def tokenizer_label(spec: dict) -> str:
    return f"{spec.get('kind', '?')}, {spec.get('vocab_size', 0):,} tokens"


def own_val_ids(corpus, tokenizer, seq_len: int, name: str):
    """The compare's validation split in the checkpoint's own tokens (cached like `speedlm eval`'s)."""
    from speedlm.data import encode_split, require_tokens

    ids = encode_split(corpus, tokenizer, "val")
    require_tokens(len(ids), seq_len, f"the validation split in {name}'s tokenizer")
    return ids


def check_entry(name: str) -> None:
    """Read what loading checkpoint `name` needs besides its weights (saved state, tokenizer)
    before any work: a corrupt folder fails its row at planning. Weights are checked when loaded."""
    from speedlm.checkpoint.files import STATE_FILE, read_config, read_json, resolve_checkpoint
    from speedlm.data import load_tokenizer

    folder = resolve_checkpoint(name)
    tokenizer = load_tokenizer(read_json(folder / STATE_FILE).get("tokenizer"), folder)
    read_config(folder).check_vocab(tokenizer.vocab_size, "checkpoint's tokenizer")


def load_entry(name: str, dev):
    """(model in eval mode on `dev`, tokenizer, the loaded Pretrained) of checkpoint `name`; a
    corrupt or mismatched folder raises a one-line SpeedlmError (its row fails)."""
    from speedlm.checkpoint import load_pretrained

    loaded = load_pretrained(name, dev)
    return loaded.model, loaded.tokenizer, loaded


def pretrained_stage(o, plan, corpus, compare_tokenizer, dev, autocast_dtype) -> tuple:
    """Evaluate checkpoint `plan.name` on the validation split in its own tokens, as the
    compare's final validation does for a trained model (same batches, length and count):
    (the model, the validation ids in its tokens, the stage's results)."""
    from speedlm.compare.inference import learned_on
    from speedlm.compare.zero_shot_recall import zero_shot_mqar
    from speedlm.train import evaluate

    t0 = time.perf_counter()
    model, tokenizer, loaded = load_entry(plan.name, dev)
    ids = own_val_ids(corpus, tokenizer, o.seq_len, plan.name)
    final = evaluate(model, ids, o.batch_size, o.seq_len, o.final_eval_batches, dev, autocast_dtype)
    nbytes = scored_bytes(tokenizer, ids, final["tokens"])
    text = torch.as_tensor(ids[: o.seq_len].astype("int64"), dtype=torch.long)[None].to(dev)
    spec = tokenizer.spec()
    state = loaded.trainer_state
    results = dict(
        checkpoint=str(loaded.path),
        pretrained=True,
        tokenizer=spec,
        same_tokenizer=spec == compare_tokenizer.spec(),
        checkpoint_step=state.get("step"),
        imported_from=state.get("imported_from"),
        curve=[],
        val_loss=final["loss"],
        val_ppl=final["ppl"],
        val_tokens=final["tokens"],
        val_bytes=nbytes,
        val_bits_per_byte=bits_per_byte(final["loss"], final["tokens"], nbytes),
        steps=0,
        tokens=0,
        train_flops=0.0,
        train_tok_per_s=None,
        train_flops_per_s=None,
        mfu=None,
        learned=learned_on(model, text),
    )
    if o.mqar is not None and model.config.objective == "ar":
        z = zero_shot_mqar(model, ids, o.mqar, seed=o.seed)
        results.update(mqar_zero_shot=z["accuracy"], mqar_zero_shot_queries=z["queries"])
    results["seconds"] = time.perf_counter() - t0
    return model, ids, results


def evaluation_flops(plan, o) -> float:
    """Forward FLOPs of the evaluation (for the overall progress bar): a third of the training cost."""
    return plan.flops_per_token / 3 * o.final_eval_batches * o.batch_size * o.seq_len
