"""Long tests (`make test-slow`): real training. They prove the mechanisms learn, not only that
they compute."""

import math

import numpy as np
import pytest
import torch

from speedlm.bench.recall import recall_config, train_recall
from speedlm.compare import DEFAULT_MQAR
from speedlm.compare.run import MQAR_CHECKPOINTS, MQAR_HEADS, MQAR_STOP_AT
from speedlm.data import TokenStream, encode_corpus, make_tokenizer, stdlib_corpus
from speedlm.models import presets_for, ModelConfig, build_model
from speedlm.models.registry import MIXERS
from speedlm.train import TrainConfig, evaluate, train
from support.parts import NoMixing

pytestmark = pytest.mark.slow

def _recall(mixer: dict) -> float:
    """Accuracy of a 2-layer, 64-wide model with this mixer on `speedlm compare`'s MQAR probe
    (T=48, 4 pairs, vocabulary 32, one head, up to 600 steps of 16 sequences, stopped once solved)."""
    cfg = ModelConfig(vocab_size=32, d_model=64, n_layers=2, n_heads=4, max_seq_len=64, layers={"A": {"mixer": mixer}})
    setting = DEFAULT_MQAR
    return train_recall(recall_config(cfg, setting, heads=MQAR_HEADS), setting, device="cpu",
                        checkpoints=MQAR_CHECKPOINTS, stop_at=MQAR_STOP_AT)["accuracy"]


def test_recall_needs_token_mixing():
    """On the setting `speedlm compare` reports, attention recalls the value of a queried key
    while a model with the same blocks but no token mixing cannot do better than guessing among
    the values (chance 1/16), and a fixed-size linear-attention state falls in between."""
    MIXERS.register("test_no_mixing", NoMixing, family="test", description="test", paper="-")
    try:
        no_mixing = _recall({"name": "test_no_mixing"})
    finally:
        MIXERS.unregister("test_no_mixing")
    attention = _recall({"name": "attention"})
    linear = _recall({"name": "linear_attention"})
    assert attention > 0.95, attention
    assert no_mixing < 0.12, no_mixing
    assert linear < attention - 0.3, (linear, attention)


@pytest.mark.parametrize("preset", presets_for("ar"))
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
