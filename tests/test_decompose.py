
import numpy as np
import pytest
import tensorly as tl
import torch
from tensorly.tenalg import multi_mode_dot, svd_interface

from actcomp.decompose import (
    NonFiniteActivationError,
    explained_rank,
    hosvd,
    mode_gram,
    truncated_svd,
)
from conftest import rel_err

SHAPES = [(6, 5, 7, 4), (8, 3, 5), (12, 9), (70, 3, 4, 5), (3, 80, 2, 2)]


def _numpy_rank(x: np.ndarray, mode: int, eps: float) -> int:
    unfolding = np.moveaxis(x, mode, 0).reshape(x.shape[mode], -1)
    energy = np.linalg.svd(unfolding, compute_uv=False) ** 2
    if eps >= 1:
        return len(energy)
    return int(np.searchsorted(np.cumsum(energy), eps * energy.sum()) + 1)


def _projector(u: torch.Tensor) -> torch.Tensor:
    return u @ u.T


@pytest.mark.parametrize(
    "values, eps, expected",
    [
        ([4.0, 3.0, 2.0, 1.0], 0.4, 1),  # 4/10 reaches 0.4 exactly
        ([4.0, 3.0, 2.0, 1.0], 0.41, 2),
        ([4.0, 3.0, 2.0, 1.0], 0.9, 3),
        ([4.0, 3.0, 2.0, 1.0], 0.91, 4),
        ([4.0, 3.0, 2.0, 1.0], 1.0, 4),
        ([1.0, 2.0, 4.0, 3.0], 0.5, 2),  # any order
        ([0.0, 0.0, 0.0], 0.5, 1),  # all-zero spectrum keeps one
        ([5.0, -1e-9, 1e-12], 0.99, 1),  # negative round-off counts as zero
        ([1.0, 1e-20], 1.0, 2),  # eps = 1 keeps every eigenvalue
    ],
)
def test_explained_rank(values, eps, expected):
    assert explained_rank(torch.tensor(values, dtype=torch.float64), eps) == expected


@pytest.mark.parametrize("eps", [0, -0.1, 1.5, float("nan"), True, "0.8", None])
def test_eps_out_of_range_is_rejected(eps):
    with pytest.raises(ValueError, match="eps must be a number in \\(0, 1\\]"):
        hosvd(torch.randn(3, 4), eps)
    with pytest.raises(ValueError, match="eps must be"):
        truncated_svd(torch.randn(3, 4), eps)


# (2, 3, 40, 40): mode 1 takes the batched product; (6, 5, 7, 4): the in-place sum; (70, 3, 4, 5): the copy.
@pytest.mark.parametrize("shape", SHAPES + [(2, 3, 40, 40)])
def test_mode_gram_matches_unfolding(shape):
    x = torch.randn(shape, dtype=torch.float64)
    for mode in range(len(shape)):
        unfolding = x.movedim(mode, 0).reshape(shape[mode], -1)
        assert rel_err(mode_gram(x, mode), unfolding @ unfolding.T) < 1e-13


@pytest.mark.parametrize("shape", SHAPES)
def test_hosvd_eps_one_is_exact(shape):
    x = torch.randn(shape, dtype=torch.float64)
    tucker = hosvd(x, 1.0)
    numel = x.numel()
    assert tucker.ranks == tuple(min(n, numel // n) for n in shape)
    assert rel_err(tucker.reconstruct(), x) < 1e-12


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps", [0.5, 0.8, 0.95])
def test_hosvd_matches_tensorly(shape, eps):
    """Ranks from the singular values of each unfolding, subspaces and reconstruction from
    tensorly's HOSVD (truncated SVD of each unfolding, core by multi-mode product)."""
    x = torch.randn(shape, dtype=torch.float64).cumsum(-1)  # correlated: ranks below full
    tucker = hosvd(x, eps)
    xn = x.numpy()
    ranks = tuple(_numpy_rank(xn, mode, eps) for mode in range(x.ndim))
    assert tucker.ranks == ranks
    tl.set_backend("numpy")
    factors = [svd_interface(tl.unfold(xn, n), n_eigenvecs=r)[0] for n, r in enumerate(ranks)]
    core = multi_mode_dot(xn, factors, transpose=True)
    for ours, theirs in zip(tucker.factors, factors):
        assert rel_err(_projector(ours), _projector(torch.from_numpy(theirs))) < 1e-8
    reference = torch.from_numpy(tl.tucker_to_tensor((core, factors)))
    assert rel_err(tucker.reconstruct(), reference) < 1e-8


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_hosvd_factors_are_detached_contiguous_own_storage(dtype):
    x = torch.randn(4, 6, 5, 5, dtype=dtype, requires_grad=True)
    tucker = hosvd(x * 1, 0.9)  # a non-leaf with a graph
    for t in tucker.tensors():
        assert t.dtype == dtype
        assert t.is_contiguous()
        assert t.grad_fn is None and not t.requires_grad
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    assert tucker.nbytes == sum(t.numel() * t.element_size() for t in tucker.tensors())


def test_hosvd_reduced_precision_is_factored_in_float32():
    x = torch.randn(8, 6, 5, 5).cumsum(-1)
    reference = hosvd(x, 0.9)
    low = hosvd(x.to(torch.bfloat16), 0.9)
    assert low.ranks == reference.ranks
    assert rel_err(low.reconstruct().float(), reference.reconstruct()) < 0.05


@pytest.mark.parametrize("shape", [(6, 40), (40, 6), (5, 3, 4, 4), (50, 2, 3)])
@pytest.mark.parametrize("eps", [0.6, 0.9, 1.0])
def test_truncated_svd_matches_numpy(shape, eps):
    x = torch.randn(shape, dtype=torch.float64).cumsum(0)
    lowrank = truncated_svd(x, eps)
    m = x.reshape(shape[0], -1).numpy()
    k = _numpy_rank(x.numpy(), 0, eps)
    assert lowrank.rank == k
    assert lowrank.right.shape == (k, *shape[1:])
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    reference = torch.from_numpy((u[:, :k] * s[:k]) @ vt[:k]).reshape(shape)
    assert rel_err(lowrank.reconstruct(), reference) < 1e-9


def test_nonfinite_input_raises():
    x = torch.randn(4, 5, 6)
    x[1, 2, 3] = float("nan")
    with pytest.raises(NonFiniteActivationError):
        hosvd(x, 0.8)
    x[1, 2, 3] = float("inf")
    with pytest.raises(NonFiniteActivationError):
        truncated_svd(x, 0.8)


def test_zero_input_keeps_rank_one():
    tucker = hosvd(torch.zeros(3, 4, 5), 0.8)
    assert tucker.ranks == (1, 1, 1)
    assert tucker.reconstruct().abs().max() == 0
