import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from automoe.data.dataset import TokenBatchSampler
from automoe.errors import DataError


def epoch_batches(sampler: TokenBatchSampler, n: int) -> list[np.ndarray]:
    return list(itertools.islice(iter(sampler), n))


@settings(max_examples=40, deadline=None)
@given(
    lens=st.lists(st.tuples(st.integers(1, 60), st.integers(1, 60)), min_size=1, max_size=300),
    max_tokens=st.integers(60, 600),
    seed=st.integers(0, 2**31),
)
def test_budget_and_exactly_once(lens, max_tokens, seed):
    src, tgt = np.array([a for a, _ in lens]), np.array([b for _, b in lens])
    sampler = TokenBatchSampler(src, tgt, max_tokens=max_tokens, seed=seed)
    plan = sampler.plan(0)
    for batch in plan:
        assert len(batch) >= 1
        assert len(batch) * max(max(src[batch]), max(tgt[batch])) <= max_tokens
    assert sorted(np.concatenate(plan).tolist()) == list(range(len(lens)))


def test_same_seed_same_order_other_seed_or_epoch_differs():
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(1, 50, 500), rng.integers(1, 50, 500)
    a = TokenBatchSampler(src, tgt, 400, seed=7)
    b = TokenBatchSampler(src, tgt, 400, seed=7)
    c = TokenBatchSampler(src, tgt, 400, seed=8)
    first, second = epoch_batches(a, 30), epoch_batches(b, 30)
    assert all(np.array_equal(x, y) for x, y in zip(first, second, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(first, epoch_batches(c, 30), strict=True))
    e0, e1 = a.plan(0), a.plan(1)
    assert [x.tolist() for x in e0] != [x.tolist() for x in e1]


def test_batches_are_length_bucketed():
    rng = np.random.default_rng(1)
    lens = rng.integers(1, 100, 2000)
    plan = TokenBatchSampler(lens, lens, 1000, seed=0).plan(0)
    padded = sum(len(b) * lens[b].max() for b in plan)
    assert padded < 1.1 * lens.sum()  # sorting by length keeps padding low


def test_resume_continues_with_the_next_batch_across_epochs():
    rng = np.random.default_rng(2)
    src, tgt = rng.integers(1, 30, 200), rng.integers(1, 30, 200)
    reference = epoch_batches(TokenBatchSampler(src, tgt, 300, seed=3), 100)  # spans several epochs
    first = TokenBatchSampler(src, tgt, 300, seed=3)
    head = epoch_batches(first, 37)
    state = first.state_dict()
    resumed = TokenBatchSampler(src, tgt, 300, seed=3)
    resumed.load_state_dict(state)
    tail = epoch_batches(resumed, 63)
    assert all(np.array_equal(x, y) for x, y in zip(head + tail, reference, strict=True))
    assert resumed.epoch >= 1


def test_bad_sampler_inputs():
    with pytest.raises(DataError, match="smaller than the longest example"):
        TokenBatchSampler(np.array([5, 500]), np.array([5, 5]), 100, seed=0)
    with pytest.raises(DataError, match="no examples"):
        TokenBatchSampler(np.array([]), np.array([]), 100, seed=0)
    s = TokenBatchSampler(np.array([5]), np.array([5]), 100, seed=0)
    with pytest.raises(DataError, match="another seed"):
        TokenBatchSampler(np.array([5]), np.array([5]), 100, seed=1).load_state_dict(s.state_dict())
