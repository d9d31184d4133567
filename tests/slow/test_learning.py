"""Long tests (`make test-slow`): real training. They prove the mechanisms learn, not only that
they compute."""

import math

import numpy as np
import pytest
import torch

from speedlm.data import MQARStream, TokenStream, encode_corpus, make_tokenizer, mqar_accuracy, mqar_batch, stdlib_corpus
from speedlm.models import PRESETS, ModelConfig, build_model
from speedlm.models.registry import MIXERS
from speedlm.train import TrainConfig, evaluate, train
from support.parts import NoMixing

pytestmark = pytest.mark.slow

# MQAR small enough for a CPU: 4 key-value pairs in 32 tokens, 16 keys and 16 values
VOCAB, SEQ, PAIRS = 32, 32, 4


def _train_mqar(mixer: dict, tmp_path) -> float:
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, max_seq_len=SEQ,
                                    layers={"A": {"mixer": mixer}}))
    cfg = TrainConfig(steps=1500, batch_size=32, seq_len=SEQ, lr=1e-3, warmup_steps=50, weight_decay=0.0,
                      eval_every=0, save_every=0, device="cpu", out_dir=str(tmp_path / mixer["name"]))
    train(model, cfg, MQARStream(VOCAB, PAIRS), progress=False)
    x, y = mqar_batch(512, SEQ, PAIRS, VOCAB, torch.Generator().manual_seed(12345))
    return mqar_accuracy(model.eval(), x, y)


def test_recall_needs_token_mixing(tmp_path):
    """Attention recalls the value of a queried key; a model with the same blocks but no token
    mixing cannot do better than guessing among the values (chance 1/16)."""
    MIXERS.register("test_no_mixing", NoMixing, family="test", description="test", paper="-")
    try:
        no_mixing = _train_mqar({"name": "test_no_mixing"}, tmp_path)
    finally:
        MIXERS.unregister("test_no_mixing")
    attention = _train_mqar({"name": "attention"}, tmp_path)
    assert attention > 0.9, attention
    assert no_mixing < 0.15, no_mixing


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_trains_on_python_source(preset, tmp_path):
    """A training smoke test on real text: the loss falls well below the unigram entropy. (That
    alone does not prove mixing, a bigram model gets there too: see test_recall_needs_token_mixing.)"""
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
