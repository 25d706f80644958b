"""projected_tucker (method oneshot): one HOSVD, then projections; the eps guarantee to within
the tolerance at every host step; refreshes on drift; state through deepcopy and state_dict."""

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F

from actcomp.linalg import projected
from actcomp.linalg.decompose import NonFiniteActivationError, hosvd
from actcomp.linalg.projected import ProjectionState, fixed_order, projected_tucker, projection_order
from conftest import rel_err


def smooth(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=dtype)
    return F.relu(F.avg_pool2d(x, 3, 1, 1) + 0.2) if x.ndim == 4 else x


def rotated(x, angle, mode=1):
    """x with its mode-``mode`` fibres rotated in the plane of the first and last index: the
    mode's subspace drifts by ``angle``."""
    size = x.shape[mode]
    r = torch.eye(size, dtype=x.dtype)
    c, s = math.cos(angle), math.sin(angle)
    r[0, 0], r[0, -1], r[-1, 0], r[-1, -1] = c, -s, s, c
    return torch.tensordot(r, x, dims=([1], [mode])).movedim(0, mode)


def projector(u):
    return u @ u.T


def test_first_step_is_the_hosvd_with_fixed_modes_first_then_projection_only(monkeypatch):
    x = smooth((6, 5, 8, 8))
    state = ProjectionState()
    first = projected_tucker(x, 0.8, state)
    ref = hosvd(x, 0.8, order=fixed_order(x.shape, 1) + [0])
    assert all(torch.equal(a, b) for a, b in zip(first.tensors(), ref.tensors()))
    assert state.refreshes == 1 and sorted(state.bases) == [1, 2, 3]

    def no_hosvd(*args, **kwargs):
        raise AssertionError("a steady step must not run an HOSVD")

    monkeypatch.setattr(projected, "hosvd", no_hosvd)
    again = projected_tucker(x, 0.8, state)  # the same input: the same projection
    assert rel_err(again.reconstruct(), first.reconstruct()) < 1e-12
    assert all(again.factors[n] is state.bases[n] for n in (1, 2, 3))  # no copy of the bases
    other = projected_tucker(smooth((6, 5, 8, 8), seed=1), 0.8, state)  # an unseen batch, same statistics
    assert state.steps == 3 and state.refreshes == 1 and other.factors[1] is state.bases[1]


@pytest.mark.parametrize("eps,tolerance", [(0.8, 0.05), (0.6, 0.02), (0.95, 0.0)])
def test_every_host_step_keeps_the_hosvd_bound_to_within_the_tolerance_and_drift_refreshes(eps, tolerance):
    base = smooth((4, 6, 7, 7))
    state = ProjectionState()
    fixed_modes = 3
    for step in range(12):
        x = rotated(rotated(base, 0.15 * step, 1), 0.1 * step, 2) * (1 + 0.1 * step)
        refreshes = state.refreshes
        tucker = projected_tucker(x, eps, state, tolerance=tolerance)
        if state.refreshes == refreshes:  # a projection: the fixed bases kept (eps - tolerance)^3
            assert float(state.kept) >= (eps - tolerance) ** fixed_modes
        kept = (tucker.core.pow(2).sum() / x.pow(2).sum()).item()
        assert kept == pytest.approx(state.explained.item(), rel=1e-9)
        error = rel_err(tucker.reconstruct(), x) ** 2
        assert error <= 1 - (eps - tolerance) ** fixed_modes * eps + 1e-9
    assert state.shortfalls >= 1 and state.refreshes == 1 + state.shortfalls  # the drift was caught


def test_the_projection_order_is_the_cheapest_and_does_not_change_the_result():
    # channels that truncate hard go first (a batched product in place), else the last mode
    assert projection_order((32, 96, 48, 48), {1: 8, 2: 31, 3: 33})[0] == 1
    assert projection_order((32, 32, 56, 56), {1: 30, 2: 14, 3: 17})[0] == 3
    x = smooth((4, 6, 7, 7))
    state = ProjectionState()
    projected_tucker(x, 0.8, state)
    assert state.order == projection_order(x.shape, {n: u.shape[1] for n, u in state.bases.items()})
    y = x
    for n in (1, 2, 3):  # the projection does not depend on the order
        y = torch.tensordot(state.bases[n].T, y, dims=([1], [n])).movedim(0, n)
    projected_tucker(x, 0.8, state)
    assert state.kept.item() == pytest.approx((y.pow(2).sum() / x.pow(2).sum()).item(), rel=1e-12)


def test_sample_modes_are_truncated_every_step_at_eps():
    x = torch.randn(3, 4, 10, dtype=torch.float64)  # a Linear's input: two sample modes
    state = ProjectionState()
    projected_tucker(x, 0.7, state, sample_modes=2)
    assert sorted(state.bases) == [2]
    y = torch.randn(3, 4, 10, dtype=torch.float64)
    tucker = projected_tucker(y, 0.7, state, sample_modes=2, tolerance=0.99)
    assert state.refreshes == 1
    projected_y = torch.tensordot(y, state.bases[2], dims=([2], [0]))
    assert rel_err(tucker.factors[2], state.bases[2]) == 0
    # the sample modes' truncation keeps eps of the projected tensor, mode after mode
    assert tucker.core.pow(2).sum() >= 0.7**2 * projected_y.pow(2).sum() * (1 - 1e-12)


def test_eps_one_is_an_exact_hosvd_every_step():
    state = ProjectionState()
    for seed in range(3):
        x = smooth((4, 3, 6, 6), seed)
        assert rel_err(projected_tucker(x, 1.0, state).reconstruct(), x) < 1e-12
    assert state.refreshes == 3


def test_shape_change_refreshes_and_float32_factors_keep_their_dtype():
    state = ProjectionState()
    projected_tucker(smooth((4, 3, 6, 6), dtype=torch.float32), 0.8, state)
    tucker = projected_tucker(smooth((4, 3, 8, 8), dtype=torch.float32), 0.8, state)
    assert state.refreshes == 2 and state.bases[2].shape[0] == 8
    assert all(t.dtype == torch.float32 for t in tucker.tensors())
    half = projected_tucker(smooth((4, 3, 8, 8), dtype=torch.float32).bfloat16(), 0.8, state)
    assert state.refreshes == 2 and all(t.dtype == torch.bfloat16 for t in half.tensors())


def test_non_finite_input_raises_and_huge_input_is_scaled():
    state = ProjectionState()
    x = smooth((4, 3, 6, 6), dtype=torch.float32)
    projected_tucker(x, 0.8, state)
    huge = projected_tucker(x * 1e20, 0.8, state)
    assert state.refreshes == 1 and torch.isfinite(huge.core).all()
    assert rel_err(huge.reconstruct() / 1e20, projected_tucker(x, 0.8, state).reconstruct()) < 1e-5
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteActivationError):
        projected_tucker(bad, 0.8, state)


def test_state_survives_deepcopy_and_a_saved_state_dict():
    state = ProjectionState()
    x, y = smooth((4, 3, 6, 6)), smooth((4, 3, 6, 6), seed=1)
    projected_tucker(x, 0.8, state)
    twin = copy.deepcopy(state)
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    buffer.seek(0)
    loaded = ProjectionState.from_state_dict(torch.load(buffer, weights_only=True))
    assert loaded.refreshes == state.refreshes and loaded.order == state.order
    expected = projected_tucker(y, 0.8, state)
    for other in (twin, loaded):
        got = projected_tucker(y, 0.8, other)
        assert other.refreshes == 1 and all(torch.equal(a, b) for a, b in zip(got.tensors(), expected.tensors()))
    with pytest.raises(ValueError, match="oneshot state"):
        ProjectionState.from_state_dict({"bases": {"1": torch.ones(3)}, "order": [1]})


DEVICES = [pytest.param("cpu-as-accelerator", id="cpu-deferred")] + [
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))
]


@pytest.mark.parametrize("device", DEVICES)
def test_accelerator_checks_every_n_steps(device, monkeypatch):
    """On an accelerator the check is read every check_every steps (here on the host with the
    accelerator's path forced, and on CUDA where there is one)."""
    if device == "cpu-as-accelerator":
        monkeypatch.setattr(projected, "_checks_every_step", lambda x: False)
        device = "cpu"
    state = ProjectionState()
    base = smooth((4, 6, 7, 7), dtype=torch.float32).to(device)
    projected_tucker(base, 0.8, state, check_every=4)
    far = torch.randn(4, 6, 7, 7, generator=torch.Generator().manual_seed(5)).to(device)  # white noise: far below
    for step in range(1, 4):
        projected_tucker(far, 0.8, state, check_every=4)
        assert state.refreshes == 1 and state.since_check == step
    projected_tucker(far, 0.8, state, check_every=4)  # the check: refresh on this step
    assert state.refreshes == 2 and state.shortfalls == 1 and state.since_check == 0


def test_hosvd_truncates_in_a_given_order():
    x = smooth((4, 5, 6, 6))
    for order in ([1, 3, 2, 0], [0, 1, 2, 3]):
        tucker = hosvd(x, 0.8, order=order)
        y = x
        for n in order:  # each truncation keeps eps of the tensor it truncates, in that order
            projected_y = torch.tensordot(tucker.factors[n].T, y, dims=([1], [n])).movedim(0, n)
            assert projected_y.pow(2).sum() >= 0.8 * y.pow(2).sum() * (1 - 1e-12)
            y = projected_y
        assert rel_err(y, tucker.core) < 1e-12
    with pytest.raises(ValueError, match="permutation"):
        hosvd(x, 0.8, order=[0, 0, 1, 2])


def test_accelerator_path_reports_non_finite_input(monkeypatch):
    monkeypatch.setattr(projected, "_checks_every_step", lambda x: False)
    state = ProjectionState()
    x = smooth((4, 3, 6, 6), dtype=torch.float32)
    projected_tucker(x, 0.8, state, check_every=2)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteActivationError):  # seen in the sample modes' Gram matrix, read on the host
        projected_tucker(bad, 0.8, state, check_every=2)


@pytest.mark.parametrize("shape,mode", [((2, 3, 4, 1), 2), ((5, 3, 1, 1), 1), ((2, 3, 4), 2), ((70, 3, 4, 5), 2)])
def test_unfolding_projects_a_mode_followed_by_size_one_modes(shape, mode):
    """A basis of rank 1 leaves a mode of size 1 behind: the mode before it is then last in
    memory though not last in the shape."""
    from actcomp.linalg.factors import mode_product
    from actcomp.linalg.numerics import Unfolding

    y = torch.randn(*shape, dtype=torch.float64)
    u = torch.linalg.qr(torch.randn(shape[mode], 2, dtype=torch.float64)).Q
    out, axes = Unfolding(y, list(range(len(shape))), mode).project(u)
    assert torch.equal(torch.tensor(out.shape)[torch.tensor(axes).argsort()], torch.tensor(mode_product(y, u.T, mode).shape))
    assert rel_err(out.permute(*torch.tensor(axes).argsort().tolist()), mode_product(y, u.T, mode)) < 1e-14
