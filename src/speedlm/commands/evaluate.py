"""`speedlm eval`: validation loss and perplexity of a checkpoint."""

from __future__ import annotations

from speedlm.commands.common import load_trained
from speedlm.device import resolve_device


def run_eval(args) -> dict:
    from speedlm.data import encode_split, load_corpus
    from speedlm.train import evaluate

    device = resolve_device(args.device)
    model, tokenizer, state = load_trained(args.checkpoint, device)
    data = args.data or (state.get("data") or {}).get("spec", "stdlib")
    corpus = load_corpus(data)
    print(f"data: {corpus.name} (fingerprint {corpus.fingerprint}), tokenizer: {tokenizer.spec()['kind']}")
    val_ids = encode_split(corpus, tokenizer, "val")
    seq_len = args.seq_len or state.get("train_config", {}).get("seq_len", 256)
    result = evaluate(model, val_ids, args.batch_size, seq_len, max_batches=args.batches or None, device=device)
    print(
        f"step {state.get('step', '?')}: val loss {result['loss']:.4f} nats/token, "
        f"perplexity {result['ppl']:.3f} over {result['tokens']:,} tokens"
    )
    return result
