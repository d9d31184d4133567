"""`speedlm train`: corpus -> tokenizer -> model -> trainer, with a short report."""

from __future__ import annotations

import torch


def _model_config(args, resumed):
    """A resumed run rebuilds the model from its checkpoint's config; a new run from the
    user's config JSON (taken as is, so a mismatch with the tokenizer is reported rather than
    papered over) or the preset (its vocabulary is set from the tokenizer later)."""
    from speedlm.models import resolve_config
    from speedlm.models.build import require_language_model

    cfg = resumed.config if resumed is not None else resolve_config(args.config or args.preset)
    require_language_model(cfg, args.config or args.preset, diffusion=True)
    return cfg


def _tokenizer_for_run(args, corpus, resumed):
    from speedlm.data import load_tokenizer, make_tokenizer

    if resumed is not None:
        return load_tokenizer(resumed.trainer_state.get("tokenizer"), resumed.path)
    return make_tokenizer(args.tokenizer, corpus, args.vocab_size)


def encode_training_data(corpus, tokenizer, say=print):
    """(train_ids, val_ids) of `corpus` under `tokenizer`, with the line that counts them
    (`speedlm train` and `speedlm distill`)."""
    from speedlm.data import encode_corpus

    train_ids, val_ids = encode_corpus(corpus, tokenizer)
    say(f"tokenizer: {tokenizer.spec()['kind']} ({tokenizer.vocab_size} tokens): "
        f"{len(train_ids):,} train / {len(val_ids):,} validation tokens")
    return train_ids, val_ids


def say_done(summary: dict, model, say=print) -> None:
    """The closing lines of a `train(...)` run: losses, throughput, MFU, where the files are."""
    val = (f"val NELBO {summary['val_loss']:.4f} (ppl <= {summary['val_ppl']:.2f}, an upper bound)"
           if getattr(model, "bound", False) else f"val loss {summary['val_loss']:.4f} (ppl {summary['val_ppl']:.2f})")
    say(
        f"done: step {summary['step']}, train loss {summary['loss']:.4f}, {val}, "
        f"{summary['tok_per_s']:,.0f} tokens/s, {summary['flops_per_s'] / 1e9:,.1f} GFLOP/s = MFU {summary['mfu']:.1%} "
        f"of the {summary['peak_source']} {summary['dtype']} peak ({summary['peak_flops'] / 1e9:,.1f} GFLOP/s)"
    )
    say(f"checkpoint: {summary['checkpoint']}\nmetrics: {summary['metrics_path']}\nloss curve: {summary['plot_path']}")


def run_train(args) -> dict:
    from speedlm.data import TokenStream, load_corpus
    from speedlm.models import build_model, resolve_config
    from speedlm.train import TrainConfig, train
    from speedlm.train.checkpoint import load_resumable
    from speedlm.train.distributed import init_parallel

    parallel, device = init_parallel(getattr(args, "parallel", "none"), args.device, getattr(args, "dist_backend", "auto"))
    say = print if parallel.main else (lambda *a, **k: None)  # one report, from rank 0

    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        grad_accum=args.grad_accum,
        lr=args.lr,
        min_lr_ratio=args.min_lr_ratio,
        warmup_steps=min(args.warmup_steps, args.steps),
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        save_every=args.save_every,
        seed=args.seed,
        device=device,
        dtype=args.dtype,
        peak_flops=args.peak_flops,
        activation_checkpointing=args.activation_checkpointing,
        segments=args.segments,
        compile=args.compile,
        out_dir=args.out,
    )
    # everything that can be checked without data is checked before the corpus is read
    resumed = load_resumable(args.out) if args.resume else None  # read once: config, tokenizer, then the trainer
    model_cfg = _model_config(args, resumed)
    cfg.check_model(model_cfg)
    corpus = load_corpus(args.data)
    say(f"data: {corpus.name}: {corpus.files} files, fingerprint {corpus.fingerprint}")
    tokenizer = _tokenizer_for_run(args, corpus, resumed)
    train_ids, val_ids = encode_training_data(corpus, tokenizer, say)

    if not (args.config or args.resume):
        model_cfg = resolve_config(model_cfg, vocab_size=tokenizer.vocab_size)
    if not args.resume:
        from speedlm.data.separators import parse_separators, record_separators

        model_cfg = record_separators(model_cfg, tokenizer, parse_separators(args.separators))
    torch.manual_seed(args.seed)  # model init is part of the run's reproducibility
    model = build_model(model_cfg)
    c = model.config
    say(
        f"model: {args.config or args.preset}: {model.num_params():,} parameters, "
        f"{c.n_layers} layers x d={c.d_model}, pattern {c.pattern!r}, "
        f"{model.flops_per_token(cfg.seq_len) / 1e6:.1f} MFLOP/token (training)"
        + ("" if getattr(model, "context_reach", lambda: None)() is None
           else f", context reach {model.context_reach():,} tokens (the layers' reaches summed)")
    )
    summary = train(
        model, cfg, TokenStream(train_ids), val_ids, tokenizer=tokenizer, resume=resumed or False,
        data_info={"spec": args.data, "name": corpus.name, "fingerprint": corpus.fingerprint},
        parallel=parallel,
    )
    say_done(summary, model, say)
    return {k: v for k, v in summary.items() if k != "history"}
