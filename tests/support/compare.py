"""A tiny `speedlm compare` that runs in seconds, shared by the compare tests (and the child
process the resume test kills)."""

from speedlm.bench.recall import RecallSetting
from speedlm.compare import TIMING_FIELDS, CompareOptions

TINY_MQAR = RecallSetting(seq_len=16, num_kv_pairs=2, vocab_size=16, steps=3, batch_size=4, lr=1e-3, test_examples=16)


def tiny_options(tmp_path, name="run", **kw) -> CompareOptions:
    base = dict(
        presets=["transformer-tiny", "sliding-window-tiny"], budget=3e9, seq_len=64, batch_size=4,
        eval_points=2, eval_batches=1, final_eval_batches=2, mqar=TINY_MQAR, contexts=(32, 64), decode_tokens=2,
        device="cpu", peak_flops=1e11, out_dir=str(tmp_path / name), command="speedlm compare (test)",
    )
    base.update(kw)
    return CompareOptions(**base)


def _strip_timings(obj):
    if isinstance(obj, dict):
        return {k: _strip_timings(v) for k, v in obj.items() if k not in TIMING_FIELDS and k not in ("date", "checkpoint")}
    if isinstance(obj, list):
        return [_strip_timings(v) for v in obj]
    return obj
