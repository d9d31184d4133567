"""Long tests (`make test-slow`): real training on the embedded corpus, and the BPE tokenizer
on the whole stdlib. They prove the mechanisms learn, not only that they compute."""

import math

import numpy as np
import pytest
import torch

from speedlm.data import TokenStream, encode_corpus, make_tokenizer, stdlib_corpus
from speedlm.models import PRESETS, build_model
from speedlm.train import TrainConfig, evaluate, train

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_learns_python_source(preset, tmp_path):
    corpus = stdlib_corpus()
    tok = make_tokenizer("byte")
    train_ids, val_ids = encode_corpus(corpus, tok)
    torch.manual_seed(0)
    model = build_model(preset)
    before = evaluate(model, val_ids, 8, 128, max_batches=8)["loss"]
    cfg = TrainConfig(steps=300, batch_size=8, seq_len=128, lr=3e-3, warmup_steps=30, eval_every=0,
                      eval_batches=8, save_every=0, device="cpu", out_dir=str(tmp_path / preset))
    summary = train(model, cfg, TokenStream(train_ids), val_ids, tokenizer=tok, progress=False)
    assert before == pytest.approx(math.log(256), abs=0.3)
    # beating the unigram entropy (3.27 nats on CPython 3.11's stdlib) by a margin means the
    # mixer carries information across positions; uniform would be 5.55
    counts = np.bincount(val_ids, minlength=256)
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * np.log(p)).sum())
    assert summary["val_loss"] < unigram - 0.3, (summary["val_loss"], unigram)


def test_bpe_on_the_stdlib_round_trips_and_compresses(tmp_path):
    corpus = stdlib_corpus()
    tok = make_tokenizer("bpe", corpus, 4096, cache_dir=tmp_path)
    train_ids, val_ids = encode_corpus(corpus, tok, cache_dir=tmp_path)
    assert len(corpus.train_text) / len(train_ids) > 3.0  # chars per token
    sample = corpus.val_text[:20_000]
    assert tok.decode(tok.encode(sample)) == sample
