"""`speedlm eval --tasks NAMES`: lm-evaluation-harness tasks on a checkpoint (SpeedlmLM)."""

from __future__ import annotations

import json
from pathlib import Path

from speedlm.errors import SpeedlmError
from speedlm.harness import require_lm_eval


def task_manager(tasks: list[str], include_path: str | None, builtins: bool = True):
    """A TaskManager that knows every task in `tasks`. The tasks under `include_path` are
    looked for first: indexing the harness's own few thousand tasks takes seconds, so it is
    done only for names not found there (and never with builtins=False)."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if builtins and (manager is None or _unknown(manager, tasks)):
        manager = TaskManager(include_path=include_path)
    unknown = _unknown(manager, tasks) if manager is not None else tasks
    if unknown:
        where = f" under {include_path}" if include_path else ""
        builtin = "" if builtins else " (built-in tasks not searched)"
        raise SpeedlmError(f"unknown lm-eval task {', '.join(unknown)}{where}{builtin}; `lm_eval ls tasks` lists "
                           "them, --include-path DIR adds a folder of task YAMLs")
    return manager


def _unknown(manager, tasks: list[str]) -> list[str]:
    return [t for t in tasks if t not in manager.all_tasks and not Path(t).is_file()]


def run_harness(args) -> dict:
    """The tasks' metrics as lm_eval's results dict; prints its table, writes it as JSON to
    `args.output` if given."""
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable, make_table

    from speedlm.harness.model import SpeedlmLM

    if args.data is not None:
        raise SpeedlmError("--data is for the validation loss; lm-eval tasks (--tasks) bring their own data")
    manager = task_manager(args.tasks, args.include_path, builtins=not args.no_builtin_tasks)
    lm = SpeedlmLM(checkpoint=args.checkpoint, batch_size=args.batch_size, device=args.device, max_length=args.seq_len,
                   attention=args.attention, window=args.window, sinks=args.sinks, separators=args.separators,
                   separator_cache=args.separator_cache, cap=args.cap)
    results = simple_evaluate(model=lm, tasks=args.tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                              task_manager=manager, log_samples=False, bootstrap_iters=args.bootstrap_iters)
    print(make_table(results))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
        print(f"results: {args.output}")
    return results
