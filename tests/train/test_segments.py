"""The trainer's stateful segment mode (train/segments.py, TrainConfig.segments): consecutive
windows of the same streams through one detached cache, exact resume in the middle of a group,
evaluation with memory, and the models it refuses."""

import numpy as np
import pytest
import torch

from speedlm.data.dataset import TokenStream, iter_memory_batches, segment_batch
from speedlm.errors import SpeedlmError
from speedlm.train import read_metrics, train
from speedlm.train.evaluate import evaluate

TXL = {"A": {"mixer": {"name": "transformer_xl", "mem_len": 16, "segment": 16}}}


def test_segment_batches_continue_each_row_and_groups_start_afresh():
    stream = TokenStream(np.arange(5000) % 251)
    x0, y0, j0 = segment_batch(stream, 6, 3, 16, segments=3, seed=1)
    x1, y1, j1 = segment_batch(stream, 7, 3, 16, segments=3, seed=1)
    assert (j0, j1) == (0, 1)
    assert torch.equal(x1[:, 0], y0[:, -1]) and torch.equal(y1[:, :-1], x1[:, 1:])
    x3, _, j3 = segment_batch(stream, 9, 3, 16, segments=3, seed=1)  # the next group: new streams
    assert j3 == 0 and not torch.equal(x3[:, 0], y1[:, -1] + 0 * x3[:, 0])
    assert torch.equal(segment_batch(stream, 7, 3, 16, segments=3, seed=1)[0], x1)  # a pure function of the index


def test_memory_batches_score_every_target_once_row_by_row():
    ids = np.arange(101)
    batches = list(iter_memory_batches(ids, 2, 10))
    assert len(batches) == 5
    assert torch.equal(batches[1][0][0], torch.arange(10, 20)) and torch.equal(batches[1][0][1], torch.arange(60, 70))
    targets = torch.cat([y for _, y in batches], 1).flatten().sort().values
    assert torch.equal(targets, torch.tensor(sorted([*range(1, 51), *range(51, 101)])))


def test_segment_training_resumes_exactly_at_group_boundaries_and_closely_within(data, make_model, make_cfg):
    train_ids, val_ids = data
    cfg = dict(segments=3, seq_len=16, save_every=3)
    a = train(make_model(layers=TXL, pattern="A"), make_cfg("a", **cfg), TokenStream(train_ids), val_ids, progress=False)
    expected = [r["loss"] for r in a["history"]]
    assert a["history"][-1]["loss"] < a["history"][0]["loss"]
    for stop, exact in ((6, True), (5, False)):
        b_cfg = make_cfg(f"b{stop}", **cfg)
        train(make_model(layers=TXL, pattern="A"), b_cfg, TokenStream(train_ids), val_ids, progress=False, stop_at_step=stop)
        with pytest.warns(UserWarning, match="middle of a segment group") if not exact else _no_warning():
            train(make_model(seed=7, layers=TXL, pattern="A"), b_cfg, TokenStream(train_ids), val_ids, resume=True, progress=False)
        got = [r["loss"] for r in read_metrics(f"{b_cfg.out_dir}/metrics.jsonl")]
        assert got[:stop] == expected[:stop]
        if exact:  # step 7 starts a group: nothing to rebuild
            assert got == expected
        else:  # step 6 ends a group: its memory is replayed with the step-5 weights, close to the original
            assert got[stop] != expected[stop] and abs(got[stop] - expected[stop]) < 0.02 * expected[stop]


def _no_warning():
    import contextlib
    import warnings

    @contextlib.contextmanager
    def ctx():
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            yield

    return ctx()


def test_memory_changes_what_the_model_sees(data, make_model):
    """Evaluation with memory scores the same targets as plain windows, but each window after the
    first reads the previous one through the cache: a different (here: better) loss."""
    _, val_ids = data
    model = make_model(layers=TXL, pattern="A")
    plain = evaluate(model, val_ids, 2, 16, max_batches=20)
    with_memory = evaluate(model, val_ids, 2, 16, max_batches=20, memory=4)
    assert plain["tokens"] == with_memory["tokens"] and plain["loss"] != with_memory["loss"]


def test_models_whose_caches_cannot_hold_the_stream_are_refused(data, make_model, make_cfg):
    train_ids, val_ids = data
    with pytest.raises(SpeedlmError, match="longer than this model's caches allow"):
        train(make_model(), make_cfg(segments=3, seq_len=32), TokenStream(train_ids), val_ids, progress=False)
