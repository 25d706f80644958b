
import math

import numpy as np
import pytest
import tensorly as tl
import torch
from tensorly.tenalg import mode_dot, svd_interface

from actcomp.linalg.numerics import device_scaled as _device_scaled
from actcomp.linalg.decompose import (
    NonFiniteActivationError,
    SubspaceTracker,
    _leading_subspace,
    explained_rank,
    hosvd,
    mode_gram,
    tracked_hosvd,
    truncated_svd,
    truncation_order,
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


def _tensorly_st_hosvd(xn: np.ndarray, eps: float):
    """Reference sequentially truncated HOSVD from tensorly's unfold, truncated SVD and mode
    product: modes smallest first (ties: the later mode first), each rank from the singular
    values of the current tensor's unfolding."""
    tl.set_backend("numpy")
    order = sorted(range(xn.ndim), key=lambda n: (xn.shape[n], -n))
    y, factors, ranks = xn, [None] * xn.ndim, [0] * xn.ndim
    for mode in order:
        ranks[mode] = _numpy_rank(y, mode, eps)
        factors[mode] = svd_interface(tl.unfold(y, mode), n_eigenvecs=ranks[mode])[0]
        y = mode_dot(y, factors[mode].T, mode)
    return y, factors, tuple(ranks)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps", [0.5, 0.8, 0.95])
def test_hosvd_matches_tensorly(shape, eps):
    """Ranks, subspaces, core and reconstruction equal a sequentially truncated HOSVD built
    from tensorly (truncated SVD of each unfolding of the current tensor, multi-mode products)."""
    x = torch.randn(shape, dtype=torch.float64).cumsum(-1)  # correlated: ranks below full
    tucker = hosvd(x, eps)
    core, factors, ranks = _tensorly_st_hosvd(x.numpy(), eps)
    assert tucker.ranks == ranks
    for ours, theirs in zip(tucker.factors, factors):
        assert rel_err(_projector(ours), _projector(torch.from_numpy(theirs))) < 1e-8
    reference = torch.from_numpy(tl.tucker_to_tensor((core, factors)))
    assert rel_err(tucker.reconstruct(), reference) < 1e-8
    assert math.isclose(float(tucker.core.norm()), float(np.linalg.norm(core)), rel_tol=1e-10)


def _steps(x: torch.Tensor, tucker) -> list[tuple[float, float]]:
    """(||Y_j-1||^2, ||Y_j||^2) for every truncation of hosvd's sequence, in its order."""
    y, out = x, []
    for mode in truncation_order(x.shape):
        before = float(y.pow(2).sum())
        y = torch.tensordot(tucker.factors[mode].T, y, dims=([1], [mode])).movedim(0, mode)
        out.append((before, float(y.pow(2).sum())))
    return out


# (40, 400, 6, 6): the channel Gram matrix (more than 256 x 256 at eps 0.8 and 0.99) takes the randomized solver.
@pytest.mark.parametrize("shape", SHAPES + [(40, 400, 6, 6), (2, 3, 40, 40)])
@pytest.mark.parametrize("eps", [0.3, 0.8, 0.99])
def test_hosvd_guarantee(shape, eps):
    """Every truncation keeps eps of the energy it starts from; the error is the lost energy and
    at most (1 - eps^N) ||X||^2; the factors are orthonormal."""
    x = torch.relu(torch.randn(shape, dtype=torch.float64))
    tucker = hosvd(x, eps)
    for before, after in _steps(x, tucker):
        assert after >= eps * before * (1 - 1e-12)
    for u in tucker.factors:
        assert rel_err(u.T @ u, torch.eye(u.shape[1], dtype=u.dtype)) < 1e-12
    energy, lost = float(x.pow(2).sum()), float((x - tucker.reconstruct()).pow(2).sum())
    assert math.isclose(lost, energy - float(tucker.core.pow(2).sum()), rel_tol=1e-8, abs_tol=1e-9 * energy)
    assert lost <= (1 - eps ** x.ndim) * energy * (1 + 1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("first", [1.0, 0.99, 0.6])
def test_hosvd_eps_per_mode(shape, first):
    """eps per mode: mode 0 at ``first``, the others at 0.7; each truncation keeps its own
    mode's eps of the energy it starts from (at 1: all of it), and the error is at most
    (1 - prod eps_n) ||X||^2."""
    x = torch.relu(torch.randn(shape, dtype=torch.float64))
    thresholds = (first,) + (0.7,) * (x.ndim - 1)
    tucker = hosvd(x, thresholds)
    order = truncation_order(x.shape)
    for mode, (before, after) in zip(order, _steps(x, tucker)):
        assert after >= thresholds[mode] * before * (1 - 1e-12)
    energy, lost = float(x.pow(2).sum()), float((x - tucker.reconstruct()).pow(2).sum())
    assert lost <= (1 - math.prod(thresholds)) * energy * (1 + 1e-12)
    assert torch.equal(hosvd(x, (0.7,) * x.ndim).core, hosvd(x, 0.7).core)


@pytest.mark.parametrize("eps", [(0.9, 0.9), (0.9, 1.5, 0.9, 0.9), "0.9"])
def test_hosvd_eps_per_mode_is_checked(eps):
    with pytest.raises(ValueError, match="eps"):
        hosvd(torch.randn(4, 3, 5, 5), eps)


@pytest.mark.parametrize("n, eps", [(300, 0.8), (400, 0.5), (400, 0.95), (260, 0.999)])
def test_randomized_leading_subspace(n, eps):
    """Above 256 rows: orthonormal, explains eps of the trace exactly, at most a few directions
    more than the exact eigen-decomposition needs, deterministic, global RNG untouched."""
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, 2 * n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)[:, None]
    q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    gram = q @ (a @ a.T) @ q.T  # a decaying spectrum in a random basis
    state = torch.random.get_rng_state()
    v = _leading_subspace(gram, eps)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(v, _leading_subspace(gram, eps))
    assert rel_err(v.T @ v, torch.eye(v.shape[1], dtype=v.dtype)) < 1e-10
    assert float((v * (gram @ v)).sum()) >= eps * float(gram.trace()) * (1 - 1e-12)
    exact = explained_rank(torch.linalg.eigvalsh(gram), eps)
    assert exact <= v.shape[1] <= exact * 1.1 + 2


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


DECOMPOSITIONS = {
    "hosvd": lambda x: hosvd(x, 0.8),
    "svd": lambda x: truncated_svd(x, 0.8),
    "asi": lambda x: tracked_hosvd(x, 0.8, SubspaceTracker()),
}


@pytest.mark.parametrize("name", list(DECOMPOSITIONS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_input_raises(name, bad):
    x = torch.randn(4, 5, 6)
    x[1, 2, 3] = bad
    with pytest.raises(NonFiniteActivationError):
        DECOMPOSITIONS[name](x)


@pytest.mark.parametrize("name", list(DECOMPOSITIONS))
@pytest.mark.parametrize("magnitude", [1e18, 1e36, 1e-25])
def test_finite_extremes_are_decomposed_as_if_rescaled(name, magnitude):
    """float32 entries near 1e18 square to sums past float32's range, near 1e-25 to zero: the
    result must be the decomposition of x divided by the power of two closest to max|x|,
    multiplied back (bit for bit: scaling by a power of two is exact)."""
    x = torch.relu(torch.nn.functional.avg_pool2d(torch.randn(6, 5, 9, 9), 3, 1)) * magnitude
    exponent = math.frexp(float(x.abs().max()))[1]
    ours = DECOMPOSITIONS[name](x)
    scaled = DECOMPOSITIONS[name](x / 2.0**exponent)
    assert all(torch.isfinite(t).all() for t in ours.tensors())
    first_non_orthonormal = 1 if name == "svd" else 0  # LowRank keeps the scale in right
    for i, (a, b) in enumerate(zip(ours.tensors(), scaled.tensors())):
        assert torch.equal(a, b * 2.0**exponent if i == first_non_orthonormal else b)
    reference = DECOMPOSITIONS[name](x.double() / magnitude)  # float64: no overflow
    assert rel_err(ours.reconstruct().double() / magnitude, reference.reconstruct()) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_device_scaling_is_an_exact_power_of_two_and_passes_nan(dtype):
    """The accelerators' scaling (no host read): x / 2^e with max|x| = m 2^e, m in [0.5, 1)."""
    for magnitude in (1e18, 3.0, 1e-30, 0.0):
        x = torch.randn(5, 7, dtype=dtype) * magnitude
        scaled, scale, amax = _device_scaled(x)
        assert float(amax) == float(x.abs().max())
        if magnitude:
            assert 0.5 <= float(scaled.abs().max()) < 1.0
            assert math.frexp(float(scale))[0] == 0.5  # a power of two
        assert torch.equal(scaled * scale, x)
    x = torch.randn(5, 7, dtype=dtype)
    x[2, 3] = float("nan")
    scaled, scale, amax = _device_scaled(x)
    assert math.isnan(float(amax)) and float(scale) == 1.0


@pytest.mark.parametrize("shape, ranks", [((3, 4, 5), (1, 1, 1)), ((300, 300), (1, 1))])  # 300: randomized
def test_zero_input_keeps_rank_one(shape, ranks):
    tucker = hosvd(torch.zeros(shape), 0.8)
    assert tucker.ranks == ranks
    assert tucker.reconstruct().abs().max() == 0
