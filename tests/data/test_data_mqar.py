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


@pytest.mark.parametrize("power_a", [0.01, 0.5, 1.0])
def test_query_positions_follow_the_zoology_power_law(power_a):
    """With one pair the query slot g (0-based, after the context) is drawn with probability
    proportional to (g + 1)^(power_a - 1), Zoology's `p = a * arange(1, space + 1) ** (a - 1)`;
    power_a = 1 is uniform. Checked by a chi-square test on 20,000 sequences."""
    slots = 8
    t = 2 + 2 * slots
    _, targets = mqar_batch(20_000, t, 1, 8, torch.Generator().manual_seed(7), power_a=power_a)
    pos = (targets != IGNORE_INDEX).float().argmax(dim=1)
    gaps = (pos - 2) // 2
    assert ((pos - 2) % 2 == 0).all()  # a query opens a two-token slot
    observed = torch.bincount(gaps, minlength=slots).double()
    p = power_a * torch.arange(1, slots + 1, dtype=torch.float64) ** (power_a - 1)
    expected = 20_000 * p / p.sum()
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 24.3, (observed.tolist(), expected.tolist())  # df = 7, p = 0.001


def test_keys_and_values_come_from_the_two_halves_and_cover_them():
    """Keys from [1, V/2) (0 is reserved), values from [V/2, V), every one of them used."""
    inputs, _ = mqar_batch(2000, 32, 4, 32, torch.Generator().manual_seed(3))
    keys, values = inputs[:, 0:8:2], inputs[:, 1:8:2]
    assert set(keys.unique().tolist()) == set(range(1, 16))
    assert set(values.unique().tolist()) == set(range(16, 32))
