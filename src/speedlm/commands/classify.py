"""`speedlm train-classifier --task TASK --presets A,B,...`: every preset's layers as a
bidirectional encoder (objective "classify") trained on the same task data with the same
seed; a table of test accuracy, parameters and training time (results.md, results.json) and a
plot of test accuracy over training (accuracy.png) in --out."""

from __future__ import annotations

import json
import os

import torch

from speedlm.errors import SpeedlmError

DEFAULT_PRESETS = {
    "digits": "transformer-tiny,linformer-tiny,sliding-window-tiny,linear-attention-tiny,conformer-tiny,lite-transformer-tiny",
    "spoken-digits": "conformer-tiny,transformer-tiny,linformer-tiny,lite-transformer-tiny",
}


def encoder_config(preset: str, data, pooling: str = "mean", d_model: int | None = None):
    """The preset's layers as an encoder for `data`: its front-end reads the task's features."""
    from speedlm.models import resolve_config

    overrides = dict(objective="classify", num_classes=data.num_classes, input_dim=data.features, pooling=pooling,
                     max_seq_len=max(data.tokens + 1, 16))
    if d_model is not None:
        overrides["d_model"] = d_model
    return resolve_config(preset, **overrides)


def plot_accuracy(results: dict, path: str, title: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, r in results.items():
        pts = [(h["step"], h["test_acc"]) for h in r["history"] if "test_acc" in h]
        ax.plot(*zip(*pts), "o-", label=f"{name} ({r['test_acc']:.3f})", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.savefig(path)
    return path


def run_classifier_suite(task: str, presets: list[str], out_dir: str, cfg, pooling: str = "mean", seed: int = 0,
                         progress: bool = True, **task_options) -> dict:
    from speedlm.models import build_model
    from speedlm.tasks import load_task
    from speedlm.train.classifier import train_classifier

    data = load_task(task, seed=seed, **task_options)  # an unknown task fails first
    if not presets:
        raise SpeedlmError("give at least one preset")
    configs = {p: encoder_config(p, data, pooling) for p in presets}  # every config is checked before any training
    print(f"task {data.name}: {data.description}; {len(data.y_train)} train / {len(data.y_test)} test examples of "
          f"{data.tokens} tokens x {data.features} features, {data.num_classes} classes")
    results = {}
    for p, mcfg in configs.items():
        torch.manual_seed(seed)
        model = build_model(mcfg)
        r = train_classifier(model, data, cfg, progress=progress, desc=p)
        results[p] = r
        print(f"{p}: test accuracy {r['test_acc']:.3f} (train {r['train_acc']:.3f}), {r['params']:,} parameters, {r['train_s']:.0f} s")
    os.makedirs(out_dir, exist_ok=True)
    lines = [f"Task `{task}` ({data.description}): {len(data.y_train)} train / {len(data.y_test)} test, "
             f"{cfg.steps} steps of {cfg.batch_size}, seed {seed}, chance {1 / data.num_classes:.2f}", "",
             "| preset (as an encoder) | test accuracy | train accuracy | parameters | training time (s) |",
             "|---|---|---|---|---|"]
    lines += [f"| {p} | {r['test_acc']:.3f} | {r['train_acc']:.3f} | {r['params']:,} | {r['train_s']:.0f} |" for p, r in results.items()]
    md = "\n".join(lines) + "\n"
    files = {"md": os.path.join(out_dir, "results.md"), "json": os.path.join(out_dir, "results.json"),
             "plot": os.path.join(out_dir, "accuracy.png")}
    with open(files["md"], "w") as f:
        f.write(md)
    with open(files["json"], "w") as f:
        json.dump({"task": task, "train_config": cfg.to_dict(), "pooling": pooling, "seed": seed, "results": results}, f, indent=1)
    plot_accuracy(results, files["plot"], f"{task}: test accuracy over training")
    print(md)
    print("wrote " + ", ".join(files.values()))
    return {"results": results, "files": files, "data": data}


def cmd_train_classifier(args) -> int:
    from speedlm.train.classifier import ClassifierConfig

    cfg = ClassifierConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                           warmup_steps=min(args.warmup_steps, args.steps), eval_every=args.eval_every, seed=args.seed)
    presets = args.presets or [p for p in DEFAULT_PRESETS.get(args.task, "").split(",") if p]
    run_classifier_suite(args.task, presets, args.out, cfg, pooling=args.pooling, seed=args.seed)
    return 0
