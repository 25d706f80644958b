"""Unbiased sampled decompositions: inclusion probabilities, systematic sampling, and estimates
whose mean over many draws converges to the tensor (statistical tests that fail for a biased
estimator such as truncation)."""

import pytest
import torch
import torch.nn.functional as F

from actcomp.linalg.decompose import hosvd, truncated_svd
from actcomp.linalg.sampled import inclusion_probabilities, sampled_hosvd, sampled_svd, systematic_sample
from conftest import rel_err


def smooth(*shape):
    """Post-ReLU activations with correlated modes: eps < 1 truncates, the tail is not flat."""
    x = torch.randn(*shape, dtype=torch.float64)
    for mode in range(1, len(shape)):
        x = x.cumsum(mode) / shape[mode] ** 0.5
    return F.relu(x + 0.3)


@pytest.mark.parametrize("rank", [1, 2, 5, 9])
def test_inclusion_probabilities_sum_to_rank_and_follow_the_singular_values(rank):
    s = torch.tensor([10.0, 6.0, 1.0, 0.9, 0.5, 0.4, 0.2, 0.1, 0.0, 0.0], dtype=torch.float64)
    order = torch.randperm(len(s))
    p = torch.empty_like(s)
    p[order] = inclusion_probabilities(s[order], rank)  # any order
    assert abs(float(p.sum()) - min(rank, 8)) < 1e-12
    assert bool(((p >= 0) & (p <= 1)).all())
    assert bool((p[8:] == 0).all())  # zero singular values are never drawn
    sampled = (p > 0) & (p < 1)
    if sampled.any():  # the tail in proportion to s: one tau for all of them
        tau = s[sampled] / p[sampled]
        assert float(tau.max() - tau.min()) < 1e-12
        assert bool((s[p == 1] >= tau.max() - 1e-12).all())  # the capped ones are the largest


def test_inclusion_probabilities_are_all_one_at_full_rank():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert inclusion_probabilities(s, 3).tolist() == [1.0, 1.0, 1.0, 0.0]
    assert inclusion_probabilities(s, 10).tolist() == [1.0, 1.0, 1.0, 0.0]


def test_systematic_sample_draws_exactly_r_with_the_given_marginals():
    p = inclusion_probabilities(torch.tensor([5.0, 2.0, 1.5, 1.0, 0.7, 0.5, 0.3, 0.0]), 3)
    generator = torch.Generator().manual_seed(0)
    draws = 20000
    counts = torch.zeros(len(p), dtype=torch.float64)
    for _ in range(draws):
        index = systematic_sample(p, generator)
        assert len(index) == 3 and len(set(index.tolist())) == 3
        counts[index] += 1
    frequency = counts / draws
    standard_error = (p * (1 - p) / draws).sqrt()
    assert bool(((frequency - p).abs() <= 5 * standard_error + 1e-12).all()), (frequency, p)


def _mean_converges(estimate, exact: torch.Tensor, draws: int) -> tuple[float, float]:
    """(||mean of draws - exact||^2, its expectation tr(Cov) / draws if unbiased)."""
    errors = torch.stack([estimate() - exact for _ in range(draws)])
    mean = errors.mean(0)
    expected = float(((errors - mean) ** 2).sum()) / (draws - 1) / draws
    return float((mean**2).sum()), expected


CASES = [(sampled_hosvd, hosvd, shape) for shape in [(16, 6, 5, 5), (12, 40), (4, 50), (3, 9, 2)]] + [
    (sampled_svd, truncated_svd, shape) for shape in [(20, 3, 4), (5, 30)]
]


@pytest.mark.parametrize("sampled, truncated, shape", CASES, ids=[f"{c[0].__name__}-{c[2]}" for c in CASES])
def test_sampled_decomposition_is_unbiased(sampled, truncated, shape):
    x = smooth(*shape)
    generator = torch.Generator().manual_seed(1)
    truncation_bias = float(((truncated(x, 0.7).reconstruct() - x) ** 2).sum())
    squared, expected = _mean_converges(lambda: sampled(x, 0.7, generator).reconstruct(), x, 600)
    # unbiased: ||mean error||^2 ~ tr(Cov) / draws; a bias b adds ||b||^2, which does not shrink
    assert squared < 3 * expected, (squared, expected)
    assert squared < truncation_bias / 4


def test_truncation_fails_the_same_check():
    """The check above can fail: truncation, whose error does not average out, does."""
    x = smooth(16, 6, 5, 5)
    bias = hosvd(x, 0.7).reconstruct() - x
    noise = torch.Generator().manual_seed(2)
    squared, expected = _mean_converges(lambda: x + bias + 1e-3 * torch.randn(x.shape, generator=noise, dtype=x.dtype), x, 50)
    assert squared > 3 * expected


def test_sampled_methods_keep_the_truncated_rank_and_form():
    x = smooth(16, 6, 5, 5)
    tucker = sampled_hosvd(x, 0.8, torch.Generator().manual_seed(0))
    first = tucker.factors[0]
    assert tucker.core.shape == tuple(u.shape[1] for u in tucker.factors)
    for u in tucker.factors:  # orthonormal columns: the kernels' and second-order code's form
        assert rel_err(u.T @ u, torch.eye(u.shape[1], dtype=u.dtype)) < 1e-10
    assert tucker.factors[3].shape[1] == hosvd(x, 0.8).factors[3].shape[1]  # first mode truncated: the same rank
    assert first.dtype == x.dtype
    low = sampled_svd(x, 0.8, torch.Generator().manual_seed(0))
    assert low.rank == truncated_svd(x, 0.8).rank


def test_eps_one_is_exact_and_draws_nothing():
    x = smooth(8, 5, 4, 4)
    state = torch.random.get_rng_state()
    assert rel_err(sampled_hosvd(x, 1.0).reconstruct(), x) < 1e-12
    assert rel_err(sampled_svd(x, 1.0).reconstruct(), x) < 1e-12
    assert torch.equal(torch.random.get_rng_state(), state)


def test_a_mode_at_one_is_kept_whole():
    x = smooth(3, 6, 5, 5)  # the batch mode is the smallest: truncated first, from x itself
    tucker = sampled_hosvd(x, (1.0, 0.6, 0.6, 0.6), torch.Generator().manual_seed(0))
    u = tucker.factors[0]
    assert u.shape[1] == 3 and rel_err(u @ u.T, torch.eye(3, dtype=x.dtype)) < 1e-10


def test_same_generator_state_same_draw_and_float32():
    x = smooth(16, 6, 5, 5).float()
    a = sampled_hosvd(x, 0.8, torch.Generator().manual_seed(5))
    b = sampled_hosvd(x, 0.8, torch.Generator().manual_seed(5))
    assert all(torch.equal(s, t) for s, t in zip(a.tensors(), b.tensors()))
    assert a.core.dtype == torch.float32


def test_non_finite_input_raises():
    from actcomp.linalg.decompose import NonFiniteActivationError

    x = smooth(4, 3, 2, 2)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteActivationError):
        sampled_hosvd(x, 0.8)
    with pytest.raises(NonFiniteActivationError):
        sampled_svd(x, 0.8)
