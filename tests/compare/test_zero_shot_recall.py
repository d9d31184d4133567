"""Zero-shot MQAR (compare/zero_shot_recall.py) scores a model's own weights: a model that copies
the token that followed the query's earlier occurrence scores 1, one that cannot see the
context scores at most chance, and the probe is written in the model's frequent tokens."""

import numpy as np
import torch

from speedlm.bench.recall import RecallSetting
from speedlm.compare.zero_shot_recall import probe_tokens, zero_shot_mqar

VOCAB = 50
SETTING = RecallSetting(seq_len=64, num_kv_pairs=4, vocab_size=16, test_examples=96)


class Config:
    vocab_size = VOCAB


class Copier(torch.nn.Module):
    """Predicts, at each position, the token that followed the last earlier occurrence of the
    current token (an ideal induction head); elsewhere token 0."""

    def __init__(self):
        super().__init__()
        self.w, self.config = torch.nn.Parameter(torch.zeros(())), Config()

    def forward(self, x):
        B, T = x.shape
        logits = torch.zeros(B, T, VOCAB)
        for b in range(B):
            for t in range(T):
                earlier = (x[b, :t] == x[b, t]).nonzero().flatten()
                nxt = int(x[b, earlier[-1] + 1]) if len(earlier) else 0
                logits[b, t, nxt] = 1.0
        return logits


class Unigram(torch.nn.Module):
    """The same logits at every position: no context at all."""

    def __init__(self, favourite: int):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.nn.functional.one_hot(torch.tensor(favourite), VOCAB).float())
        self.config = Config()

    def forward(self, x):
        return self.logits.expand(*x.shape, VOCAB)


def _text():
    rng = np.random.default_rng(0)
    return rng.zipf(1.3, 20_000).clip(max=VOCAB) - 1  # ids 0..49, skewed: token 0 commonest


def test_probe_tokens_are_the_commonest_first():
    ids = np.array([5, 5, 5, 2, 2, 9, 9, 7])
    assert probe_tokens(ids, 4, 12).tolist() == [5, 2, 9, 7]  # 2 and 9 tie: lower id first
    assert probe_tokens(ids, 6, 12).tolist() == [5, 2, 9, 7, 0, 1]  # then the unseen ids


def test_a_copier_recalls_everything_and_a_context_blind_model_nothing_above_chance():
    text = _text()
    copier = zero_shot_mqar(Copier(), text, SETTING, seed=0)
    assert copier["accuracy"] == 1.0 and copier["queries"] == SETTING.test_examples * SETTING.num_kv_pairs
    values = probe_tokens(text, SETTING.vocab_size, VOCAB)[SETTING.vocab_size // 2 :]
    for v in values.tolist():  # always answering one value is right about once in 8
        blind = zero_shot_mqar(Unigram(v), text, SETTING, seed=0)
        assert blind["accuracy"] < 3 * blind["chance"]
    assert zero_shot_mqar(Unigram(int(probe_tokens(text, 1, VOCAB)[0])), text, SETTING)["accuracy"] == 0.0  # filler

