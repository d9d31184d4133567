"""`speedlm eval`: validation loss and perplexity of a checkpoint."""

from __future__ import annotations

from speedlm.commands.common import describe_policy, load_trained, policy_from_args
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
    policy = policy_from_args(args, model, tokenizer)
    if policy is not None and not hasattr(model, "init_cache"):
        from speedlm.errors import SpeedlmError

        raise SpeedlmError("--attention runs the model through KV caches; this checkpoint (a diffusion LM) has none")
    result = evaluate(
        model, val_ids, args.batch_size, seq_len, max_batches=args.batches or None, device=device, kv_policy=policy
    )
    kv = ""
    if policy is not None:
        kv = (f"; {describe_policy(policy)}: KV cache {result['kv_ratio']:.1%} of the full cache on average, "
              f"{result['kv_peak_ratio']:.1%} at peak, {result['kv_bytes_ratio']:.1%} of its bytes at the end")
    if getattr(model, "bound", False):  # a diffusion LM: the NELBO, an upper bound on the NLL
        result["bound"] = True
        print(
            f"step {state.get('step', '?')}: val NELBO {result['loss']:.4f} nats/token, perplexity <= {result['ppl']:.3f} "
            f"(an upper bound, from the diffusion ELBO) over {result['tokens']:,} tokens (seq_len {seq_len})"
        )
        return result
    print(
        f"step {state.get('step', '?')}: val loss {result['loss']:.4f} nats/token, "
        f"perplexity {result['ppl']:.3f} over {result['tokens']:,} tokens (seq_len {seq_len}){kv}"
    )
    return result
