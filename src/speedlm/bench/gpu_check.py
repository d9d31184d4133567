"""`make gpu-check` (`python -m speedlm.bench.gpu_check`): everything a short loan of a GPU
machine should verify, in one command that fits 10 minutes on one H100.

1. `pytest tests/gpu`: every dispatch backend on CUDA against its float64 reference (SDPA's flash
   kernel, compiled FlexAttention for every sparse pattern through every registered mixer, fla's
   and mamba-ssm's kernels where installed, `torch._grouped_mm` for MoE, every lossy KV policy,
   bf16 autocast training, cached generation).
2. `speedlm bench speed --device cuda` on one `base` preset per family, 2k to 16k tokens.
3. The GPU section of BENCHMARKS.md rewritten between its markers: the machine, the test summary
   and the speed tables, so the numbers land in the repository with the commit that ran them.

Each stage has a time budget (its share of the 10 minutes); a stage that overruns is stopped and
reported as such in the section, so the check always ends with what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

# one base preset per family (FlexAttention patterns, linear recurrences, state space, MoE,
# hybrids), at lengths that show the scaling; about 5 minutes of an H100 (estimated: not yet run)
PRESETS = ("transformer", "sliding-window", "longformer", "sepllm", "gla", "gated-deltanet", "hgrn", "mamba",
           "mamba2", "hyena", "mixtral", "jamba")
LENGTHS = (2048, 8192, 16384)
TEST_BUDGET_S = 240
BENCH_BUDGET_S = 330
START, END = "<!-- gpu-check:start -->", "<!-- gpu-check:end -->"


def run_tests(budget_s: int) -> str:
    """Run tests/gpu; return pytest's summary line (or why it stopped)."""
    cmd = [sys.executable, "-m", "pytest", "tests/gpu", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-rfs"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=budget_s)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        print(out)
        return f"stopped after its {budget_s} s budget; last output: {out.strip().splitlines()[-1] if out.strip() else '-'}"
    print(done.stdout[-20000:], done.stderr[-5000:])
    lines = [ln for ln in done.stdout.strip().splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", ln)]
    failed = [ln for ln in done.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    return "; ".join([lines[-1].strip("= ") if lines else f"pytest exited {done.returncode}", *failed])


def run_bench(presets, lengths, out_dir: str, budget_s: int) -> tuple[str | None, str]:
    """bench speed in a child process (so a budget can stop it); (its Markdown or None, status)."""
    cmd = [sys.executable, "-m", "speedlm", "bench", "speed", "--device", "cuda",
           "--presets", ",".join(f"{p}-base" for p in presets), "--lengths", ",".join(map(str, lengths)),
           "--repeats", "3", "--decode-tokens", "16", "--out", out_dir]
    t0 = time.perf_counter()
    try:
        subprocess.run(cmd, timeout=budget_s, check=True)
    except subprocess.TimeoutExpired:
        return None, f"stopped after its {budget_s} s budget"
    except subprocess.CalledProcessError as e:
        return None, f"failed (exit {e.returncode})"
    md = Path(out_dir, "bench_speed.md")
    return md.read_text(), f"{time.perf_counter() - t0:.0f} s"


def machine() -> str:
    props = torch.cuda.get_device_properties(0)
    return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}"


def section(tests: str, bench_md: str | None, bench_status: str, command: str, where: str) -> str:
    """The GPU section's text, markers included."""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    body = [START, "", f"Measured by `{command}` on {when}: {where}.", "",
            f"- `pytest tests/gpu`: {tests}", f"- `bench speed --device cuda` (bf16): {bench_status}", ""]
    if bench_md:
        body += [re.sub(r"^# ", "### ", bench_md, flags=re.M).replace("\n## ", "\n#### "), ""]
    return "\n".join(body + [END])


def write_section(benchmarks: Path, text: str) -> None:
    """Replace the text between the markers in BENCHMARKS.md (append a GPU section if absent)."""
    old = benchmarks.read_text()
    if START in old and END in old:
        new = old[: old.index(START)] + text + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n## GPU (make gpu-check)\n\n" + text + "\n"
    benchmarks.write_text(new)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m speedlm.bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default=",".join(PRESETS), help="families, benchmarked at their base size")
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    p.add_argument("--out", default="runs/gpu-check")
    p.add_argument("--benchmarks", default="BENCHMARKS.md", help="the file whose GPU section is rewritten")
    p.add_argument("--test-budget", type=int, default=TEST_BUDGET_S)
    p.add_argument("--bench-budget", type=int, default=BENCH_BUDGET_S)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU here; run it on a GPU machine (the CPU suite is `make test`)", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    tests = run_tests(args.test_budget)
    print(f"gpu-check: tests done in {time.perf_counter() - t0:.0f} s: {tests}", flush=True)
    lengths = [int(x) for x in args.lengths.split(",")]
    bench_md, status = run_bench(args.presets.split(","), lengths, args.out, args.bench_budget)
    write_section(Path(args.benchmarks), section(tests, bench_md, status, "make gpu-check", machine()))
    print(f"gpu-check: {time.perf_counter() - t0:.0f} s in all; wrote the GPU section of {args.benchmarks}")
    return 0 if "failed" not in tests and "error" not in tests and bench_md else 1


if __name__ == "__main__":
    sys.exit(main())
