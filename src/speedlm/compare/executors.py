"""Who runs a sweep's compare runs: this process, one after another (`local`), or Ray.

Every (model, budget, seed) training is independent. Under Ray each is one task
(`--cpus-per-run`, `--gpus-per-run`) that plans the whole run (widths are matched to the first
model) but trains only its model into the run's folder; when all have finished, this process
runs each (budget, seed) compare once more, which finds every stage done (compare/resume.py)
and writes the run's merged report. A sweep resumed under either executor skips what is
finished. Ray starts a local instance unless `--ray-address` (or RAY_ADDRESS) names a cluster,
whose workers must see the output folder (a shared filesystem).

Timings under Ray are measured with other runs beside them on the same machine: compare
them within one run, not between a Ray sweep and a local one. Every other number is the
local executor's (each task uses as many threads as `--cpus-per-run`). Time budgets need a
speed measured with nothing beside it, so under Ray this process calibrates every run's steps
first, one model at a time with a task's threads, and saves them in the run's plan; the tasks
then train those steps.
"""

from __future__ import annotations

import os

from speedlm.errors import SpeedlmError
from speedlm.schema import is_number

EXECUTORS = ("local", "ray")
RAY_HINT = "pip install 'speedlm[sweep]' (or pip install ray)"


def check_executor(executor: str, cpus: float | None, gpus: float | None, address: str | None) -> None:
    if executor not in EXECUTORS:
        raise SpeedlmError(f"--executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    given = [name for name, v in (("--cpus-per-run", cpus), ("--gpus-per-run", gpus), ("--ray-address", address))
             if v is not None]
    if executor == "local":
        if given:
            raise SpeedlmError(f"{given[0]} is an option of --executor ray")
        return
    for name, v in (("--cpus-per-run", cpus), ("--gpus-per-run", gpus)):
        if v is not None and not (is_number(v) and 0 <= v < float("inf")):
            raise SpeedlmError(f"{name} must be a non-negative number, got {v!r}")
    if cpus is not None and cpus <= 0:
        raise SpeedlmError(f"--cpus-per-run must be positive, got {cpus!r}")
    try:
        import ray  # noqa: F401
    except ImportError:
        raise SpeedlmError(f"--executor ray needs Ray, which is not installed: {RAY_HINT}") from None


def _tag(report: dict, o) -> dict:
    report["_value"] = o.time_budget if o.time_budget is not None else o.budget
    report["_seed"] = o.seed
    return report


def run_all(options: list, sweep, progress: bool) -> list[dict]:
    """Each compare run's report (tagged with its budget and seed), in the order given."""
    from speedlm.compare.run import run_compare

    if sweep.executor == "ray":
        _run_ray(options, sweep, progress)
    # local: the runs themselves; ray: each run's merge, every stage already finished
    return [_tag(run_compare(o, progress=progress), o) for o in options]


def _task(o, name: str, threads: int) -> str:
    """One Ray task: one model of one compare run (planned with all of them)."""
    import torch

    from speedlm.compare.run import run_compare

    torch.set_num_threads(threads)
    run_compare(o, progress=False, only=[name], write_files=False)
    return name


def _calibrate_here(options: list, threads: int) -> None:
    """Plan every run here (time budgets: each model's steps calibrated with nothing beside it
    and the threads a task will have), train nothing; the plans are saved for the tasks."""
    import torch

    from speedlm.compare.run import run_compare

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for o in options:
            run_compare(o, progress=False, only=[], write_files=False)
    finally:
        torch.set_num_threads(before)


def _run_ray(options: list, sweep, progress: bool) -> None:
    import ray

    from speedlm.progress import progress_bar

    address = sweep.ray_address or os.environ.get("RAY_ADDRESS")
    started = not ray.is_initialized()
    if started:
        kw = {"address": address} if address else {"num_cpus": os.cpu_count(), "include_dashboard": False}
        ray.init(log_to_driver=False, configure_logging=False, **kw)
    try:
        cpus = sweep.cpus_per_run or 1
        if any(o.time_budget is not None for o in options):
            _calibrate_here(options, max(1, int(cpus)))
        task = ray.remote(num_cpus=cpus, num_gpus=sweep.gpus_per_run or 0)(_task)
        # a compare run's plan is written by its first task; later ones find it
        pending = [task.remote(o, name, max(1, int(cpus))) for o in options for name in o.presets]
        bar = progress_bar(total=len(pending), desc="sweep (ray)", unit="run", disable=not progress)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                try:
                    ray.get(done)
                except Exception as e:  # noqa: BLE001 - a lost worker: the merge below runs that model here
                    print(f"sweep: a Ray task failed ({type(e).__name__}); its model runs again in the merge")
                bar.update(len(done))
        finally:
            bar.close()
    finally:
        if started:
            ray.shutdown()
