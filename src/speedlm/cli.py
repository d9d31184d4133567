"""`speedlm` command line. Thin: parses arguments and calls the library.

Every user mistake surfaces as `SpeedlmError` (or an OS error such as a missing file) and is
printed as one line on stderr with exit code 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys

from speedlm.errors import SpeedlmError


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


# ----------------------------------------------------------------------------- commands


def cmd_list(args) -> int:
    from speedlm.models import BLOCKS, FFNS, MIXERS, PRESETS, SIZES

    print("presets (use NAME or NAME-SIZE, sizes: " + ", ".join(SIZES) + ")\n")
    width = max(map(len, PRESETS))
    for p in PRESETS.values():
        print(f"  {p.name:<{width}}  {p.description}\n  {'':<{width}}  paper: {p.paper}")
    for registry, where in ((MIXERS, "mixer"), (FFNS, "ffn"), (BLOCKS, "block")):
        print(f"\n{registry.kind}s (the `{where}` of a layer spec in a config)\n")
        width = max(map(len, registry))
        for m in registry.values():
            opts = ", ".join(m.options()) or "-"
            print(f"  {m.name:<{width}}  [{m.family}] {m.description}\n  {'':<{width}}  options: {opts}; paper: {m.paper}")
    return 0


def cmd_train(args) -> int:
    from speedlm.commands.train import run_train

    run_train(args)
    return 0


def cmd_distill(args) -> int:
    from speedlm.commands.distill import run_distill

    run_distill(args)
    return 0


def cmd_eval(args) -> int:
    if args.tasks:  # lm-evaluation-harness tasks
        from speedlm.harness.run import run_harness

        run_harness(args)
        return 0
    from speedlm.commands.evaluate import run_eval

    run_eval(args)
    return 0


def cmd_generate(args) -> int:
    from speedlm.commands.generate import run_generate

    run_generate(args)
    return 0


def cmd_stream(args) -> int:
    from speedlm.commands.stream import run_stream

    run_stream(args)
    return 0


def cmd_hf(args) -> int:
    from speedlm.commands import hf

    {"export": hf.run_hf_export, "import": hf.run_hf_import, "eval": hf.run_hf_eval}[args.hf_command](args)
    return 0


def cmd_compare(args) -> int:
    import dataclasses
    import shlex

    from speedlm.compare import DEFAULT_MQAR, DEFAULT_PRESETS, CompareOptions, run_compare
    from speedlm.compare.sweep import SweepOptions, is_sweep, run_sweep

    mqar = None
    if not args.no_mqar:
        given = {"seq_len": args.mqar_len, "num_kv_pairs": args.mqar_pairs, "vocab_size": args.mqar_vocab,
                 "steps": args.mqar_steps}
        mqar = dataclasses.replace(DEFAULT_MQAR, **{k: v for k, v in given.items() if v is not None})
    options = CompareOptions(
        presets=args.presets or list(DEFAULT_PRESETS), budget=args.budget, time_budget=args.time_budget,
        resume=args.resume, data=args.data, tokenizer=args.tokenizer,
        vocab_size=args.vocab_size, out_dir=args.out, seq_len=args.seq_len, batch_size=args.batch_size,
        lr=args.lr, seed=args.seed, device=args.device, dtype=args.dtype, peak_flops=args.peak_flops,
        match=args.match_params, tokens_per_param=args.tokens_per_param, mqar=mqar, contexts=args.contexts,
        decode_tokens=args.decode_tokens, eval_points=args.eval_points, final_eval_batches=args.eval_batches,
        compile_decode=args.compile_decode, command="speedlm " + " ".join(shlex.quote(a) for a in args.argv),
    )
    sweep = SweepOptions(
        compare=options, budgets=args.budgets, time_budgets=args.time_budgets, seeds=args.seeds,
        target_budget=args.target_budget, executor=args.executor, cpus_per_run=args.cpus_per_run,
        gpus_per_run=args.gpus_per_run, ray_address=args.ray_address,
    )
    if is_sweep(sweep):
        run_sweep(sweep)
    else:
        run_compare(options)
    return 0


def cmd_bench_recall(args) -> int:
    from speedlm.bench.recall import run_recall_bench

    # --lrs, else the one --lr, else the sweep
    lrs = args.lrs or ([args.lr] if args.lr is not None else list(RECALL_LRS))
    run_recall_bench(
        presets=args.presets, lengths=args.lengths, pairs=args.pairs, widths=args.widths, steps=args.steps,
        batch_size=args.batch_size, lr=lrs[0], vocab_size=args.vocab_size, test_examples=args.test_examples,
        device=args.device, dtype=args.dtype, seed=args.seed, out_dir=args.out, lrs=lrs,
        checkpoints=args.checkpoints, heads=args.heads or None, stop_at=args.stop_at or None,
        random_non_queries=args.random_filler, workers=args.workers,
    )
    return 0


def cmd_bench_decode(args) -> int:
    from speedlm.bench.decode import run_decode_bench

    run_decode_bench(presets=args.presets, contexts=args.contexts, steps=args.steps, device=args.device,
                     dtype=args.dtype, seed=args.seed, out_dir=args.out, policies=args.policies, slots=args.slots,
                     sinks=args.sinks, compile=args.compile)
    return 0


def cmd_bench_ops(args) -> int:
    from speedlm.bench.ops import run_ops_bench

    run_ops_bench(lengths=args.lengths, repeats=args.repeats, device=args.device, out_dir=args.out, only=args.ops)
    return 0


def cmd_bench_mixers(args) -> int:
    from speedlm.bench.mixers import run_mixers_bench

    run_mixers_bench(args.presets, lengths=args.lengths, repeats=args.repeats, device=args.device, out_dir=args.out)
    return 0


def cmd_bench_flops(args) -> int:
    from speedlm.bench.flops import run_flops_bench
    from speedlm.models.presets import PRESETS

    presets = list(PRESETS) if args.presets == ["all"] else args.presets
    run_flops_bench(presets, lengths=args.lengths, training=not args.inference, batch_size=args.batch_size,
                    device=args.device, out_dir=args.out)
    return 0


def cmd_train_classifier(args) -> int:
    from speedlm.commands.classify import cmd_train_classifier as run

    return run(args)


def cmd_bench_diffusion(args) -> int:
    from speedlm.bench.diffusion import run_diffusion_bench

    run_diffusion_bench(args.checkpoint, args.judge, length=args.length, divisors=args.divisors, block=args.block,
                        prompts=args.prompts, prompt_len=args.prompt_len, temperature=args.temperature, seed=args.seed,
                        device=args.device, out_dir=args.out)
    return 0


def cmd_bench_depth(args) -> int:
    from speedlm.bench.depth import run_depth_bench

    run_depth_bench(args.preset, depths=args.depths, seq_len=args.seq_len, batch_size=args.batch_size,
                    repeats=args.repeats, device=args.device, out_dir=args.out)
    return 0


def cmd_bench_moe(args) -> int:
    from speedlm.bench.moe import run_moe_bench

    run_moe_bench(tokens=args.tokens, d_model=args.d_model, hidden=args.hidden, experts=args.experts, top_k=args.top_k,
                  repeats=args.repeats, device=args.device, out_dir=args.out)
    return 0


def cmd_bench_peak(args) -> int:
    from speedlm.bench.common import resolve_dtype
    from speedlm.device import resolve_device
    from speedlm.train.hardware_peak import _cache_path, machine_key, peak_flops

    dev = resolve_device(args.device)
    dtypes = [resolve_dtype(d, dev) for d in args.dtypes]
    for dt in dtypes:
        peak, source = peak_flops(dev, dt, remeasure=args.remeasure)
        print(f"{machine_key(dev, dt)}: {peak / 1e9:,.1f} GFLOP/s ({source})")
    print(f"cache: {_cache_path()}")
    return 0


def cmd_bench_speed(args) -> int:
    from speedlm.bench.speed import run_speed_bench

    run_speed_bench(
        presets=args.presets,
        lengths=args.lengths,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        decode_tokens=args.decode_tokens,
        repeats=args.repeats,
        warmup=args.warmup,
        out_dir=args.out,
        baseline=args.baseline,
    )
    return 0


# ----------------------------------------------------------------------------- parser


def _policy_options(p: argparse.ArgumentParser, window: int, flag: str = "--attention", default: str = "full") -> None:
    """--attention and its sizes: the KV-cache policy every attention layer of a checkpoint
    runs under, without retraining (generate, eval, stream)."""
    p.add_argument(flag, dest="attention", default=default,
                   choices=["full", "window", "sink", "sepllm", "h2o", "snapkv", "kivi"],
                   help="window (original positions), sink (StreamingLLM: --sinks initial tokens + the window, "
                   "shifted positions), sepllm (initial tokens + separators + the window; with --cap the "
                   "streaming cache with shifted positions), h2o (--heavy heavy hitters + the window's newest "
                   "keys, per head), snapkv (--budget keys per head chosen by the last --observe queries) or kivi "
                   "(every key in --bits-bit codes, the newest --residual in full precision); bounded caches run "
                   "past max_seq_len")
    p.add_argument("--window", type=int, default=window, help=f"local window, the query included (default {window})")
    p.add_argument("--sinks", "--initial", dest="sinks", type=int, default=4,
                   help="initial tokens kept by sink and sepllm (default 4)")
    p.add_argument("--separator-cache", type=int, help="sepllm streaming: separators kept past the window (default 64)")
    p.add_argument("--cap", type=int, help="sepllm streaming: cache slots before compression (bounded cache)")
    p.add_argument("--separators", help="separator ids (comma-separated) or characters (default: the model's, "
                   "recorded from its tokenizer)")
    p.add_argument("--heavy", type=int, help="h2o: heavy-hitter keys kept per head (default window - 1)")
    p.add_argument("--budget", dest="kv_budget", type=int,
                   help="snapkv: keys kept per head after compression (default 2 x (window - 1))")
    p.add_argument("--observe", type=int, default=32, help="snapkv: the observation window's queries (default 32)")
    p.add_argument("--bits", type=int, default=2, help="kivi: 2 or 4 (default 2)")
    p.add_argument("--group", type=int, default=32, help="kivi: tokens per key group, channels per value group")
    p.add_argument("--residual", type=int, default=32, help="kivi: newest tokens kept in full precision")


def _add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model (default: tiny transformer on the stdlib corpus)")
    p.add_argument("--preset", default="transformer-tiny", help="preset name, e.g. gqa-small (see `speedlm list`)")
    p.add_argument("--config", help="model config JSON instead of a preset")
    p.add_argument("--data", default="stdlib", help="'stdlib' (default), files/folders (comma-separated) or hf:NAME")
    p.add_argument("--tokenizer", default="byte", choices=["byte", "bpe"])
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary size (default 4096)")
    p.add_argument("--out", default="runs/train", help="run folder: checkpoints, metrics.jsonl, loss.png")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default="auto", help="auto (bf16 autocast on CUDA, float32 on CPU), bfloat16 or float32")
    p.add_argument("--peak-flops", type=float, help="FLOP/s that MFU divides by (default: datasheet or measured once)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass (less memory, more time)")
    p.add_argument("--compile", action="store_true", help="torch.compile every block (the first steps pay for compiling)")
    p.add_argument("--segments", type=int, default=0,
                   help="stateful segment mode: K consecutive windows of each stream per group, the model's cache "
                   "(Transformer-XL memory, recurrent state) carried between them, detached; validation runs with memory")
    p.add_argument("--parallel", default="none",
                   help="none, ddp or fsdp (FSDP2): data parallelism under torchrun (torchrun --nproc-per-node N -m speedlm train ... "
                   "--parallel ddp|fsdp); --batch-size is the global batch")
    p.add_argument("--dist-backend", default="auto",
                   help="torch.distributed backend under --parallel: auto (nccl on GPUs, gloo on CPU), nccl or gloo")
    p.add_argument("--separators", help="SepLLM separator ids (comma-separated) or characters, recorded in the "
                   "model config (default: tokens made of . , ? ! ; : newline tab space)")
    p.set_defaults(func=cmd_train)


def _add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="validation loss and perplexity of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="run folder or step folder")
    p.add_argument("--data", help="corpus (default: the one the model was trained on)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, help="default: the training sequence length")
    p.add_argument("--batches", type=int, default=50, help="at most this many batches (0 = whole split)")
    _policy_options(p, window=256)
    p.add_argument("--device", default="auto")
    h = p.add_argument_group("lm-evaluation-harness tasks (the `eval` extra) instead of the validation loss")
    h.add_argument("--tasks", type=_csv, help="task names, comma-separated (lm_eval's, or YAMLs under --include-path); "
                   "--seq-len is then the loglikelihood_rolling window")
    h.add_argument("--include-path", help="a folder of task YAMLs, searched before lm_eval's own tasks")
    h.add_argument("--no-builtin-tasks", action="store_true",
                   help="look only under --include-path (skips indexing lm_eval's tasks, some seconds)")
    h.add_argument("--limit", type=float, help="at most this many documents per task (a fraction if < 1)")
    h.add_argument("--num-fewshot", type=int)
    h.add_argument("--bootstrap-iters", type=int, default=100000, help="resamples for the standard errors (0: none)")
    h.add_argument("--output", help="write lm_eval's results as JSON to this file")
    p.set_defaults(func=cmd_eval)


def _add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="sample from a checkpoint: prefill, then decode through the caches")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt", default="def ")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop once the new text contains TEXT, printed without it (repeatable)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step (reference)")
    p.add_argument("--compile", action="store_true",
                   help="compile the single-token decoding step with torch.compile (the first two steps compile; "
                        "2-7x fewer ms per token for tiny models on a CPU, BENCHMARKS.md)")
    p.add_argument("--steps", type=int, help="diffusion checkpoints: denoising steps (default: one per new token)")
    p.add_argument("--block", type=int, help="diffusion: semi-autoregressive block length (default: all new tokens)")
    p.add_argument("--remasking", default="low_confidence", help="diffusion: low_confidence or random")
    p.add_argument("--threshold", type=float, help="diffusion: unmask every prediction above this probability")
    p.add_argument("--prefix-cache", action="store_true",
                   help="diffusion: reuse the prompt's and finished blocks' keys within a block (approximate, Fast-dLLM)")
    _policy_options(p, window=1024)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_generate)


def _add_stream_parser(sub) -> None:
    p = sub.add_parser("stream", help="stream a long token sequence through a checkpoint under a bounded KV cache")
    p.add_argument("--checkpoint", required=True)
    _policy_options(p, window=256, flag="--policy", default="sepllm")
    p.add_argument("--tokens", type=int, default=100_000, help="tokens to stream (default 100k)")
    p.add_argument("--data", help="corpus (default: the one the model was trained on), cycled if shorter")
    p.add_argument("--split", default="val", choices=["val", "train", "all"])
    p.add_argument("--chunk", type=int, default=64, help="tokens per call (1: token by token)")
    p.add_argument("--segment", type=int, default=10_000, help="tokens per reported segment")
    p.add_argument("--out", default="runs/stream", help="folder for stream-POLICY.jsonl/.json/.png")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_stream)


def _add_hf_parser(sub) -> None:
    h = sub.add_parser("hf", help="Hugging Face: export a checkpoint, import a Llama model, SepLLM on a HF model")
    hsub = h.add_subparsers(dest="hf_command", required=True)
    _add_hf_export_parser(hsub)
    _add_hf_import_parser(hsub)
    _add_hf_eval_parser(hsub)


def _add_hf_export_parser(hsub) -> None:
    p = hsub.add_parser("export", help="a checkpoint as a Hugging Face model folder (config, safetensors, tokenizer)")
    p.add_argument("--checkpoint", required=True, help="run folder or step folder")
    p.add_argument("--out", required=True, help="new folder for the Hugging Face files")
    p.add_argument("--format", default="speedlm", choices=["speedlm", "llama", "native"],
                   help="speedlm (any model; load after `import speedlm.hf`), llama (full-attention "
                   "transformers as a plain LlamaForCausalLM) or native (a checkpoint from `speedlm hf import`, "
                   "as its original transformers class)")
    p.set_defaults(func=cmd_hf)


def _add_hf_import_parser(hsub) -> None:
    p = hsub.add_parser("import", help="a Hugging Face folder (Llama, Mistral, Mamba, Mamba-2, Mixtral, Qwen-MoE) as a speedlm checkpoint")
    p.add_argument("--model", required=True, help="Hugging Face model folder (with tokenizer.json)")
    p.add_argument("--out", required=True, help="speedlm run folder to write")
    p.set_defaults(func=cmd_hf)


def _add_hf_eval_parser(hsub) -> None:
    p = hsub.add_parser("eval", help="perplexity and KV size of a Hugging Face Llama/Mistral/Qwen2 model under "
                        "SepLLM or sink caches, training-free")
    p.add_argument("--model", required=True, help="Hugging Face model folder")
    p.add_argument("--data", default="stdlib", help="corpus whose validation text is scored (default stdlib)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens scored (default 1024)")
    p.add_argument("--chunk", type=int, help="tokens per streamed call (default: the window, at most 256)")
    _policy_options(p, window=256, default="sepllm")
    p.add_argument("--out", help="also write the rows as JSONL here")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_hf)


def _add_distill_parser(sub) -> None:
    p = sub.add_parser("distill", help="a checkpoint's chosen attention layers replaced by other mixers, started "
                       "from the attention weights (a student for distillation)")
    p.add_argument("--teacher", required=True, help="run folder or step folder of a trained causal LM")
    p.add_argument("--replace",
                   help='LAYERS=MIXER[{json options}] groups separated by ";", LAYERS as 1,3,5 or 0-3 or odd, even, '
                   'all (0-based), e.g. "odd=gated_deltanet" or \'1,3=gla;5=sliding_window{"window": 64}\'; or the '
                   'full student, one entry per layer: "pattern=keep,gated_deltanet,keep,mamba2"')
    p.add_argument("--graft", help="LAYERS=CHECKPOINT[@SOURCE_LAYERS] groups separated by \";\": those layers are "
                   "whole blocks of other checkpoints of the same width, positions and tokenizer (e.g. 1,3=runs/hyena "
                   "or 1,3=runs/mamba@0,1); with or without --replace")
    p.add_argument("--out", required=True, help="run folder: the student checkpoint, distill_report.json and a folder "
                   "per stage (stage1-transfer, stage2-distill); rerun the same command to resume")
    p.add_argument("--stages", default="transfer,distill",
                   help="none (build and save the student only), transfer (stage 1: the new mixers learn the attention "
                   "they replace), distill (stage 2: KL to the teacher + LM loss) or transfer,distill (default)")
    p.add_argument("--tokens", type=int, default=2_000_000, help="training tokens per stage (default 2M)")
    p.add_argument("--data", help="corpus (default: the one the teacher was trained on)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, help="default: the teacher's training sequence length")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1.0, help="stage 2: weight of KL(teacher || student)")
    p.add_argument("--lm-weight", type=float, default=0.1, help="stage 2: weight of the student's LM loss")
    p.add_argument("--temperature", type=float, default=1.0, help="stage 2: softmax temperature of the KL")
    p.add_argument("--train", default="all", help="stage 2 trains: new (only the new mixers), all (default), or lora "
                   "(the new mixers and LoRA adapters on the kept layers' linear weights, merged in after the stage)")
    p.add_argument("--lora-rank", type=int, default=8, help="--train lora: the adapters' rank (default 8)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="--train lora: scale alpha / rank (default 16)")
    p.add_argument("--eval-batches", type=int, default=20, help="validation batches (end of each stage, final report)")
    p.add_argument("--save-every", type=int, default=500, help="steps between checkpoints within a stage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default="auto", help="auto (bf16 autocast on CUDA, float32 on CPU), bfloat16 or float32")
    p.add_argument("--parallel", default="none", help="none or ddp, under torchrun (attention transfer cannot run "
                   "under fsdp); --batch-size is the global batch")
    p.add_argument("--dist-backend", default="auto", help="torch.distributed backend under --parallel: auto, nccl or gloo")
    p.add_argument("--scratch", action="store_true", help="also train the student's architecture from scratch on as "
                   "many tokens as all its stages, with the teacher's recipe, in --out/scratch (the control)")
    p.add_argument("--baseline", action="append", metavar="SPEC", help="a training-free baseline for the report: the "
                   "teacher with --replace SPEC and no training (e.g. 'all=sliding_window{\"window\": 128}' or "
                   "all=sepllm); repeatable; built in --out/baselines")
    p.add_argument("--report", action="store_true", help="write --out/report (speedlm compare over the teacher, the "
                   "student, its from-scratch twin, the baselines and --compare-with, plus each stage's losses)")
    p.add_argument("--compare-with", type=_csv, default=None, metavar="CKPT,...",
                   help="more checkpoint folders in the report (e.g. other distilled students)")
    p.add_argument("--contexts", type=_ints, default=[1024, 4096, 16384],
                   help="report: context lengths of the prefill / decode / cache columns (default 1024,4096,16384)")
    p.add_argument("--decode-tokens", type=int, default=16, help="report: timed decode steps per context")
    p.set_defaults(func=cmd_distill)


def _add_compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="train architectures at equal FLOPs; quality, recall, speed and memory in one report")
    p.add_argument("--presets", type=_csv, default=None, help="comma-separated presets, config JSON paths or "
                   "checkpoint folders (measured as saved, not trained; default: one per family, see README)")
    p.add_argument("--budget", type=float, default=None, help="training FLOPs per model (default 5e11: the twelve default models in about 10 min on 2 CPU cores)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="instead of --budget: seconds of training per model on this machine (steps calibrated per model)")
    p.add_argument("--resume", action="store_true", help="continue the compare run in --out (a rerun with the same "
                   "arguments into the same --out does so anyway); its finished models and stages are reused")
    # a scaling sweep (compare/sweep.py): several budgets and seeds, statistics and fitted laws
    p.add_argument("--budgets", type=_floats, default=None, metavar="A,B,C",
                   help="a ladder of training-FLOP budgets (increasing): every model at each; 3+ fit L = E + A C^-alpha")
    p.add_argument("--time-budgets", type=_floats, default=None, metavar="S1,S2,S3",
                   help="a ladder of seconds of training per model, instead of --budgets")
    p.add_argument("--seeds", type=int, default=1, help="train every model this many times (seeds --seed, --seed+1, ...): "
                   "means and 95%% intervals, ties, rank stability")
    p.add_argument("--tokens-per-param", type=float, default=None,
                   help="size the first model at each budget for this many training tokens per active non-embedding "
                   "parameter (the others are matched to it); 20 is Chinchilla's compute-efficient ratio")
    p.add_argument("--target-budget", type=float, default=None,
                   help="predict every model's loss at this budget from its fitted law (needs 3+ budgets)")
    p.add_argument("--executor", default="local", choices=["local", "ray"],
                   help="run a sweep's trainings one after another here (local) or as Ray tasks (extra 'sweep')")
    p.add_argument("--cpus-per-run", type=float, default=None, help="Ray: CPUs per training task (default 1)")
    p.add_argument("--gpus-per-run", type=float, default=None, help="Ray: GPUs per training task (default 0)")
    p.add_argument("--ray-address", default=None, help="Ray: a cluster's address (default: RAY_ADDRESS, else a "
                   "local instance)")
    p.add_argument("--data", default="stdlib", help="'stdlib' (default), files/folders (comma-separated) or hf:NAME")
    p.add_argument("--tokenizer", default="byte", choices=["byte", "bpe"])
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary size")
    p.add_argument("--out", default="runs/compare", help="report folder: report.md, report.json, plots, models/")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--match-params", default="first", choices=["first", "none"],
                   help="first: widths chosen so non-embedding parameters match the first model's; none: preset widths")
    p.add_argument("--eval-points", type=int, default=8, help="validations along training (the loss-vs-FLOPs curve)")
    p.add_argument("--eval-batches", type=int, default=40, help="batches of the final validation loss")
    # MQAR defaults: speedlm.compare.DEFAULT_MQAR (one place)
    p.add_argument("--mqar-len", type=int, help="MQAR sequence length (default 48)")
    p.add_argument("--mqar-pairs", type=int, help="MQAR key-value pairs (default 4)")
    p.add_argument("--mqar-vocab", type=int, help="MQAR vocabulary (default 32)")
    p.add_argument("--mqar-steps", type=int, help="MQAR training steps (default 800)")
    p.add_argument("--no-mqar", action="store_true", help="skip the associative-recall column")
    p.add_argument("--contexts", type=_ints, default=[1024, 4096, 16384], help="decode-latency context lengths")
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--compile-decode", action="store_true",
                   help="time the decode column through the compiled single-token step (off by default: on a CPU "
                        "it is 1.6-3x faster for every model measured, but each model compiles for 10-70 s)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto, bfloat16 (autocast; CPUs with AMX/AVX-512-BF16) or float32")
    p.add_argument("--peak-flops", type=float, help="FLOP/s that MFU divides by (default: datasheet or measured once)")
    p.set_defaults(func=cmd_compare)


def _add_train_classifier_parser(sub) -> None:
    p = sub.add_parser("train-classifier", help="presets as bidirectional encoders on a non-text task (digits, spoken-digits)")
    p.add_argument("--task", required=True, help="digits (scikit-learn's 8x8 digits) or spoken-digits (espeak-ng speech)")
    p.add_argument("--presets", type=_csv, default=None, help="comma-separated presets (default: one per family for the task)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--pooling", default="mean", help="mean or cls")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/classify")
    p.set_defaults(func=cmd_train_classifier)


def _add_bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    _add_bench_speed_parser(bsub)
    _add_bench_recall_parser(bsub)
    _add_bench_decode_parser(bsub)
    _add_bench_ops_parser(bsub)
    _add_bench_mixers_parser(bsub)
    _add_bench_flops_parser(bsub)
    _add_bench_diffusion_parser(bsub)
    _add_bench_depth_parser(bsub)
    _add_bench_moe_parser(bsub)
    _add_bench_peak_parser(bsub)


def _add_bench_speed_parser(bsub) -> None:
    p = bsub.add_parser("speed", help="forward, forward+backward, decode latency and peak memory vs length")
    p.add_argument("--presets", type=_csv, default=_csv("transformer-tiny,sliding-window-tiny,linear-attention-tiny"))
    p.add_argument("--lengths", type=_ints, default=[128, 256, 512, 1024])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--baseline", help="preset the ratios are taken against (default: the first)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, float32 on CPU), float32, bfloat16, float16")
    p.add_argument("--out", default="runs/bench")
    p.set_defaults(func=cmd_bench_speed)


RECALL_LRS = (1e-3, 3e-3)
RECALL_PRESETS = ("transformer-tiny,sliding-window-tiny,linear-attention-tiny,based-tiny,gla-tiny,gated-deltanet-tiny,"
                  "mamba2-tiny,hgrn-tiny")


def _add_bench_recall_parser(bsub) -> None:
    # The defaults are the grid in BENCHMARKS.md ("Associative recall by Zoology's protocol"):
    # Zoology's eight-architecture comparison at two widths, finishing in 25 minutes on
    # 2 CPU cores with --workers 2 (`make recall`).
    p = bsub.add_parser("recall", help="MQAR associative recall: accuracy vs length, pairs, width and state size")
    p.add_argument("--presets", type=_csv, default=_csv(RECALL_PRESETS))
    p.add_argument("--lengths", type=_ints, default=[64])
    p.add_argument("--pairs", type=_ints, default=[4])
    p.add_argument("--widths", type=_ints, default=[48, 64],
                   help="model widths; with one head, attention left the plateau within 2000 steps from 48 up (not at 32)")
    p.add_argument("--steps", type=int, default=2000, help="training steps per setting (the most; see --stop-at)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="one learning rate instead of the sweep")
    p.add_argument("--lrs", type=_floats, default=None, metavar="A,B,...",
                   help="Zoology's sweep: train each setting at every learning rate, report the best (default "
                        + ",".join(f"{v:g}" for v in RECALL_LRS) + ")")
    p.add_argument("--checkpoints", type=int, default=20,
                   help="held-out scores along training that flag a run still rising or on a plateau (0: none)")
    p.add_argument("--heads", type=int, default=1,
                   help="heads in every model (Zoology's figure 2: one); 0 keeps each preset's")
    p.add_argument("--stop-at", type=float, default=0.99,
                   help="end a run at the first checkpoint that scores this accuracy (0: train every step)")
    p.add_argument("--random-filler", action="store_true",
                   help="random tokens between the queries (the generator's default) instead of Zoology's figure-2 zeros")
    p.add_argument("--workers", type=int, default=1,
                   help="trainings at once, each in its own process with its share of the threads")
    p.add_argument("--vocab-size", type=int, default=64)
    p.add_argument("--test-examples", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto, bfloat16 or float32 (training autocast)")
    p.add_argument("--out", default="runs/recall")
    p.set_defaults(func=cmd_bench_recall)


def _add_bench_decode_parser(bsub) -> None:
    p = bsub.add_parser("decode", help="per-token decode latency at several contexts, steps interleaved in one process")
    p.add_argument("--presets", type=_csv, default=_csv("transformer-tiny,linear-attention-tiny,hgrn-tiny"))
    p.add_argument("--contexts", type=_ints, default=[1024, 16384])
    p.add_argument("--steps", type=int, default=64, help="timed single-token steps per context")
    p.add_argument("--policies", type=_csv, default=["full"],
                   help="KV policies to decode under, side by side: full (each mixer's own cache), window, sink, h2o, "
                   "snapkv (sized to hold --slots keys) or kivi (every key in 2-bit codes)")
    p.add_argument("--slots", type=int, default=1023, help="KV slots every lossy policy holds once full")
    p.add_argument("--sinks", type=int, default=4, help="of those slots, the attention sinks")
    p.add_argument("--compile", action="store_true",
                   help="also decode through the compiled step (rows [policy compiled], same rotation) and report "
                        "each model's weight-read bound")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, float32 on CPU), float32, bfloat16, float16")
    p.add_argument("--out", default="runs/bench")
    p.set_defaults(func=cmd_bench_decode)


def _add_bench_ops_parser(bsub) -> None:
    p = bsub.add_parser("ops", help="each sequence op's chunked form vs its naive recurrent loop, in one process")
    p.add_argument("--lengths", type=_ints, default=[4096])
    p.add_argument("--ops", type=lambda v: [x.strip() for x in v.split(",") if x.strip()], default=None,
                   help="comma-separated substrings of op names to run (default: all), e.g. mamba,hyena")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/bench")
    p.set_defaults(func=cmd_bench_ops)


def _add_bench_mixers_parser(bsub) -> None:
    p = bsub.add_parser("mixers", help="one mixer's forward alone (the first layer's of each preset): time and memory vs length")
    p.add_argument("--presets", type=_csv, default=_csv("transformer-small,dilated-window-small,logsparse-small,longformer-small"))
    p.add_argument("--lengths", type=_ints, default=[4096, 16384])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/bench")
    p.set_defaults(func=cmd_bench_mixers)


def _add_bench_flops_parser(bsub) -> None:
    p = bsub.add_parser("flops", help="counted (analytic) vs executed FLOPs per token (FlopCounterMode), per layer kind")
    p.add_argument("--presets", type=_csv, default=["all"], help="comma-separated presets, or all (every preset, tiny)")
    p.add_argument("--lengths", type=_ints, default=[256, 1024])
    p.add_argument("--inference", action="store_true", help="one inference forward instead of a training step")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/bench")
    p.set_defaults(func=cmd_bench_flops)


def _add_bench_diffusion_parser(bsub) -> None:
    p = bsub.add_parser("diffusion", help="a diffusion LM's generation speed vs quality over denoising steps, beside an AR model")
    p.add_argument("--checkpoint", required=True, help="the diffusion run")
    p.add_argument("--judge", required=True, help="an autoregressive run (same tokenizer): the baseline and the judge")
    p.add_argument("--length", type=int, default=64, help="new tokens per prompt")
    p.add_argument("--divisors", type=_ints, default=[1, 2, 4, 8], help="steps = length / d for each d")
    p.add_argument("--block", type=int, help="semi-autoregressive block (default: the whole length)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/bench")
    p.set_defaults(func=cmd_bench_diffusion)


def _add_bench_depth_parser(bsub) -> None:
    p = bsub.add_parser("depth", help="a training step's peak memory and time against depth, reversible layers on and off")
    p.add_argument("--preset", default="reformer-small")
    p.add_argument("--depths", type=_ints, default=[2, 4, 8])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/bench")
    p.set_defaults(func=cmd_bench_depth)


def _add_bench_moe_parser(bsub) -> None:
    p = bsub.add_parser("moe", help="MoE dispatch: sorted grouped matmul vs the per-expert loop, forward and backward")
    p.add_argument("--tokens", type=_ints, default=[8192])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--hidden", type=int, default=704, help="expert hidden width (default: mixtral-small's)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/bench")
    p.set_defaults(func=cmd_bench_moe)


def _add_bench_peak_parser(bsub) -> None:
    p = bsub.add_parser("peak", help="the matmul peak FLOP/s that MFU divides by (measured once per machine, cached)")
    p.add_argument("--dtypes", type=_csv, default=["float32", "bfloat16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--remeasure", action="store_true", help="measure again and replace the cached value")
    p.set_defaults(func=cmd_bench_peak)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="speedlm", description="Efficient LLM architectures behind one contract.")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("list", help="presets and mixers, with descriptions and papers").set_defaults(func=cmd_list)
    _add_train_parser(sub)
    _add_eval_parser(sub)
    _add_generate_parser(sub)
    _add_stream_parser(sub)
    _add_hf_parser(sub)
    _add_distill_parser(sub)
    _add_compare_parser(sub)
    _add_train_classifier_parser(sub)
    _add_bench_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command line as given, for reports
    try:
        return args.func(args)
    except SpeedlmError as e:
        print(f"speedlm: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        print(f"speedlm: error: {e.strerror or e}: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("speedlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
