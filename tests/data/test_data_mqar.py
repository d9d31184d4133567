"""MQAR: every query's target is the value paired with that key in the context."""

import pytest
import torch

from speedlm.data.mqar import IGNORE_INDEX, mqar_batch
from speedlm.errors import SpeedlmError


def _check_example(inp, tgt, n_pairs, vocab):
    """Scan one sequence the way a perfect recall model would."""
    inp, tgt = inp.tolist(), tgt.tolist()
    half = vocab // 2
    pairs = {}
    for i in range(n_pairs):
        k, v = inp[2 * i], inp[2 * i + 1]
        assert 1 <= k < half and half <= v < vocab
        assert k not in pairs  # distinct keys: the answer is unambiguous
        pairs[k] = v
    queried = []
    for t, target in enumerate(tgt):
        if target == IGNORE_INDEX:
            continue
        assert t >= 2 * n_pairs  # no targets inside the context
        assert inp[t] in pairs and target == pairs[inp[t]]
        queried.append(inp[t])
    assert sorted(queried) == sorted(pairs)  # each key asked exactly once
    assert all(x == IGNORE_INDEX for x in tgt[: 2 * n_pairs])


@pytest.mark.parametrize("random_non_queries", [True, False])
@pytest.mark.parametrize("B,T,N,V", [(16, 64, 8, 128), (4, 32, 8, 64), (8, 256, 16, 8192)])
def test_query_targets_are_the_paired_values(B, T, N, V, random_non_queries):
    g = torch.Generator().manual_seed(0)
    inputs, targets = mqar_batch(B, T, N, V, g, random_non_queries=random_non_queries)
    assert inputs.shape == targets.shape == (B, T)
    assert inputs.dtype == targets.dtype == torch.long
    assert int(inputs.min()) >= 0 and int(inputs.max()) < V
    assert int((targets != IGNORE_INDEX).sum()) == B * N
    for b in range(B):
        _check_example(inputs[b], targets[b], N, V)
    if not random_non_queries:  # filler is 0 everywhere outside context and queries
        assert (inputs[:, 2 * N :][targets[:, 2 * N :] == IGNORE_INDEX] == 0).all()


def test_deterministic_given_generator_and_varies_across_rows():
    a = mqar_batch(8, 64, 4, 100, torch.Generator().manual_seed(5))
    b = mqar_batch(8, 64, 4, 100, torch.Generator().manual_seed(5))
    c = mqar_batch(8, 64, 4, 100, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert len({tuple(r) for r in a[0][:, :8].tolist()}) > 1


def test_queries_favour_early_slots():
    # power_a = 0.01: p(gap) ~ gap^-0.99, so the first query slots are hit far more often.
    _, targets = mqar_batch(512, 256, 4, 64, torch.Generator().manual_seed(0))
    hits = (targets[:, 8:] != IGNORE_INDEX).sum(0)[::2]  # per query slot
    assert hits[:10].sum() > hits[-60:].sum()


@pytest.mark.parametrize(
    "args, match",
    [
        ((4, 30, 8, 128), "too short"),
        ((4, 64, 8, 16), "too few"),
        ((0, 64, 8, 128), "positive"),
        ((4, 64, 0, 128), "positive"),
    ],
)
def test_invalid_arguments_are_user_errors(args, match):
    with pytest.raises(SpeedlmError, match=match):
        mqar_batch(*args, torch.Generator().manual_seed(0))
