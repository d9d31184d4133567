"""Zero-shot MQAR: the in-context recall of a trained language model's own weights.

compare's MQAR column trains a fresh model of each architecture on the synthetic task; a
pretrained entry (a distilled student, an imported model) is a set of weights, and what a user
asks of it is whether *those weights* recall what the context said. So its probe is the same
task without training: MQAR sequences (data/mqar.py, the compare's setting: length, pairs,
vocabulary, filler) are written in the checkpoint's own tokens, and the score is how often its
next-token argmax over its whole vocabulary is the value that followed the queried key earlier.
An attention model that learned induction heads copies the value; a bounded state has to have
kept it.

MQAR's token i is the checkpoint's i-th most frequent token of the validation text (ties by
token id): filler (0) the commonest, keys and values the next ones, so every probe token is one
the model saw often in training (a text with fewer distinct tokens than the probe needs is
completed with the ids it lacks). Chance is about 1 / (vocabulary // 2) among the values, lower
over the whole vocabulary the argmax ranges over.
"""

from __future__ import annotations

import numpy as np
import torch

from speedlm.data.mqar import IGNORE_INDEX, mqar_batch
from speedlm.errors import SpeedlmError

BATCH = 64  # probe sequences per forward


def probe_tokens(val_ids, count: int, vocab_size: int) -> torch.Tensor:
    """The `count` most frequent token ids of `val_ids`, commonest first (ties: lower id first);
    a text with fewer distinct tokens is completed with the unseen ids, lowest first."""
    if count > vocab_size:
        raise SpeedlmError(f"zero-shot MQAR needs {count} distinct tokens; the vocabulary has {vocab_size}")
    ids = np.asarray(val_ids).astype(np.int64)
    counts = np.bincount(ids, minlength=vocab_size)[:vocab_size]
    order = np.lexsort((np.arange(vocab_size), -counts))  # by count descending, then id
    return torch.as_tensor(order[:count])


@torch.no_grad()
def zero_shot_mqar(model, val_ids, setting, seed: int = 0) -> dict:
    """{"accuracy", "examples", "queries", "chance"}: `setting.test_examples` MQAR sequences of
    `setting` (a RecallSetting) in the model's frequent tokens, scored on the queries."""
    tokens = probe_tokens(val_ids, setting.vocab_size, model.config.vocab_size)
    g = torch.Generator().manual_seed(seed)
    inputs, targets = mqar_batch(setting.test_examples, setting.seq_len, setting.num_kv_pairs, setting.vocab_size, g,
                                 random_non_queries=setting.random_non_queries)
    scored = targets != IGNORE_INDEX
    inputs = tokens[inputs]
    targets = torch.where(scored, tokens[targets.clamp(min=0)], targets)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    right = 0
    try:
        for i in range(0, len(inputs), BATCH):
            pred = model(inputs[i : i + BATCH].to(device)).argmax(-1).cpu()
            s = scored[i : i + BATCH]
            right += int((pred[s] == targets[i : i + BATCH][s]).sum())
    finally:
        model.train(was_training)
    queries = int(scored.sum())
    return {"accuracy": right / max(queries, 1), "examples": len(inputs), "queries": queries,
            "chance": 1.0 / (setting.vocab_size - setting.vocab_size // 2)}
