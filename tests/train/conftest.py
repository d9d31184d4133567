"""Shared fixtures for the training tests: a tiny model, learnable synthetic tokens, and a
train config that runs in well under a second."""

import numpy as np
import pytest
import torch

from speedlm.models import CausalLM, ModelConfig
from speedlm.train import TrainConfig

VOCAB = 64


def tiny_model_config(**kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


def markov_ids(n: int, vocab: int = VOCAB, seed: int = 0) -> np.ndarray:
    """A noisy deterministic chain, next = (5 * prev + 3) % vocab with 10% random tokens:
    easy enough that a few steps visibly lower the loss."""
    rs = np.random.RandomState(seed)
    ids = np.empty(n, dtype=np.int64)
    ids[0] = 0
    noise = rs.rand(n) < 0.1
    rand = rs.randint(0, vocab, size=n)
    for i in range(1, n):
        ids[i] = rand[i] if noise[i] else (5 * ids[i - 1] + 3) % vocab
    return ids


class StandInStream:
    """Same contract as speedlm.data.dataset.TokenStream.batch: a pure function of
    (seed, step). Kept local so golden values don't move when the data layer's sampler does."""

    def __init__(self, ids: np.ndarray):
        self.ids = np.asarray(ids)

    def batch(self, step, batch_size, seq_len, seed=0):
        rs = np.random.RandomState((seed * 1_000_003 + step) % 2**32)
        starts = rs.randint(0, len(self.ids) - seq_len, size=batch_size)
        w = torch.from_numpy(self.ids[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()


@pytest.fixture(autouse=True)
def _one_thread():
    """Run these tests single-threaded: their matmuls are far too small to gain from
    intra-op threads, which spin and stall badly when other processes share the cores, and
    a fixed thread count keeps float reductions (hence golden losses) machine-independent."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def helpers():
    """The plain helpers, for tests that need them directly (conftest isn't importable)."""
    import types

    return types.SimpleNamespace(
        StandInStream=StandInStream, markov_ids=markov_ids, tiny_model_config=tiny_model_config
    )


@pytest.fixture
def data():
    """(train_ids, val_ids)."""
    return markov_ids(20_000, seed=0), markov_ids(2_000, seed=1)


@pytest.fixture
def make_model():
    def make(seed: int = 1234, **kw) -> CausalLM:
        torch.manual_seed(seed)
        return CausalLM(tiny_model_config(**kw))

    return make


@pytest.fixture
def make_cfg(tmp_path):
    def make(name: str = "run", **kw) -> TrainConfig:
        base = dict(
            steps=12, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2, eval_every=4, eval_batches=2,
            save_every=4, keep=2, log_every=1, device="cpu", dtype="auto", seed=0, out_dir=str(tmp_path / name),
        )
        base.update(kw)
        return TrainConfig(**base)

    return make
