"""Sync-free Tucker factors (actcomp.linalg.syncfree): the guarantee as recorded, capacity growth, no
host reads in a step, and the weight gradient from the masked factors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from actcomp.linalg.decompose import NonFiniteActivationError, hosvd, truncation_order
from actcomp.kernels.conv import ConvGeometry, tucker_weight_grad
from actcomp.linalg.numerics import cholesky_qr as _cholesky_qr
from actcomp.linalg.syncfree import SyncFreeState, syncfree_hosvd, syncfree_step
from conftest import rel_err


def fractions(x, tucker):
    """||Y_j||^2 / ||Y_j-1||^2 of every truncation in hosvd's order, by mode, in float64."""
    y, out = x.double(), {}
    for mode in truncation_order(x.shape):
        before = float(y.pow(2).sum())
        y = torch.tensordot(tucker.factors[mode].double().T, y, dims=([1], [mode])).movedim(0, mode)
        out[mode] = float(y.pow(2).sum()) / before if before > 0 else 1.0
    return [out[n] for n in range(x.ndim)]


def smooth(batch, channels, size, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size + 2, size + 2, generator=g, dtype=dtype)
    return F.relu(F.avg_pool2d(x, 3, 1))


def drifting(steps, shape=(12, 10, 8, 8), ranks=(6, 4, 3, 3), drift=0.02):
    """Low-rank tensors with decaying spectra, a new batch mixture every step and a slowly
    rotating channel subspace, plus a little noise."""
    g = torch.Generator().manual_seed(0)
    factors = [torch.linalg.qr(torch.randn(i, r, generator=g, dtype=torch.float64)).Q for i, r in zip(shape, ranks)]
    generator = torch.randn(shape[1], shape[1], generator=g, dtype=torch.float64)
    rotation = torch.linalg.matrix_exp(drift * (generator - generator.T))
    for _ in range(steps):
        core = torch.randn(ranks, generator=g, dtype=torch.float64)
        for n, r in enumerate(ranks):
            core = core * torch.tensor([3.0**-i for i in range(r)], dtype=torch.float64).reshape([-1 if m == n else 1 for m in range(len(ranks))])
        x = core
        for n, u in enumerate(factors):
            x = torch.tensordot(u, x, dims=([1], [n])).movedim(0, n)
        yield x + 1e-3 * torch.randn(shape, generator=g, dtype=torch.float64)
        factors[0] = torch.linalg.qr(torch.randn(shape[0], ranks[0], generator=g, dtype=torch.float64)).Q
        factors[1] = rotation @ factors[1]


@pytest.mark.parametrize("eps", [0.7, 0.9, 0.99])
def test_record_is_the_guarantee_and_holds_without_shortfall(eps):
    state = SyncFreeState()
    for step, x in enumerate(drifting(10)):
        tucker = syncfree_hosvd(x, eps, state)
        widths = tuple(u.shape[1] for u in tucker.factors)
        capacities = state.capacities
        state.collect()
        measured = fractions(x, tucker)
        if step == 0:  # initialised by the exact hosvd
            assert state.initialisations == 1 and min(measured) >= eps - 1e-12
            continue
        assert widths == capacities  # the factors are stored at capacity
        assert state.records_read == step
        assert state.fractions == pytest.approx(measured, abs=1e-10)
        assert state.ranks == tuple(int((u.abs().sum(0) > 0).sum()) for u in tucker.factors)
        if state.shortfalls == 0:
            assert min(measured) >= eps - 1e-10
    assert state.shortfalls <= 2 and state.initialisations == 1


def test_factors_orthonormal_where_kept_and_core_is_the_projection():
    state = SyncFreeState()
    xs = [smooth(8, 12, 10, seed) for seed in range(4)]
    for x in xs:
        tucker = syncfree_hosvd(x, 0.8, state)
    for u in tucker.factors:
        kept = u[:, u.abs().sum(0) > 0]
        assert rel_err(kept.T @ kept, torch.eye(kept.shape[1], dtype=kept.dtype)) < 1e-10
    projected = x
    for n, u in enumerate(tucker.factors):
        projected = torch.tensordot(u.T, projected, dims=([1], [n])).movedim(0, n)
    assert rel_err(tucker.core, projected) < 1e-10


def test_a_shortfall_is_recorded_then_capacity_grows():
    state = SyncFreeState()
    g = torch.Generator().manual_seed(3)
    low = torch.randn(16, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 40, generator=g, dtype=torch.float64)
    syncfree_hosvd(low.reshape(16, 40), 0.9, state)  # rank 2: small capacities
    start = state.capacities
    flat = torch.randn(16, 40, generator=g, dtype=torch.float64)  # full rank: needs far more
    tucker = syncfree_hosvd(flat, 0.9, state)
    state.collect()
    assert state.shortfalls >= 1 and min(state.fractions) < 0.9
    assert min(fractions(flat, tucker)) < 0.9  # the record told the truth
    for _ in range(6):
        tucker = syncfree_hosvd(flat, 0.9, state)
    state.collect()
    assert all(c > s for c, s in zip(state.capacities, start))
    assert min(fractions(flat, tucker)) >= 0.9 - 1e-10


def test_eps_one_is_exact():
    state = SyncFreeState()
    for seed in range(3):
        x = smooth(5, 6, 6, seed)
        assert rel_err(syncfree_hosvd(x, 1.0, state).reconstruct(), x) < 1e-10


def test_step_reads_nothing_on_the_host():
    """On the meta device every value read on the host fails (.item(), bool(), ...): a step
    that runs there has no host sync and no data-dependent shape."""
    x = torch.empty(8, 12, 10, 10, device="meta")
    bases = [torch.empty(i, r, device="meta") for i, r in zip(x.shape, (6, 7, 4, 4))]
    tucker, carried, record = syncfree_step(x, 0.8, bases, [3, 2, 2, 2])
    assert tucker.core.shape == (6, 7, 4, 4) and record.shape == (13,)
    assert [tuple(q.shape) for q in carried] == [tuple(q.shape) for q in bases]
    with pytest.raises(RuntimeError, match="meta"):
        record.sum().item()  # the guard itself works


def test_step_compiles_as_one_graph():
    """torch.compile(fullgraph=True) raises on any graph break: no Python branch on a value."""
    x = smooth(6, 8, 6, 0, torch.float32)
    state = SyncFreeState()
    syncfree_hosvd(x, 0.8, state)
    step = torch.compile(syncfree_step, fullgraph=True, backend="eager")
    tucker, _, record = step(x, 0.8, state.bases, [3, 2, 2, 2])
    eager, _, eager_record = syncfree_step(x, 0.8, state.bases, [3, 2, 2, 2])
    assert torch.allclose(record, eager_record) and rel_err(tucker.reconstruct(), eager.reconstruct()) < 1e-5


def test_deterministic_and_global_rng_untouched():
    xs = [smooth(8, 12, 8, seed) for seed in range(4)]
    rng = torch.random.get_rng_state()
    a, b = SyncFreeState(), SyncFreeState()
    for x in xs:
        ta, tb = syncfree_hosvd(x, 0.8, a), syncfree_hosvd(x, 0.8, b)
        assert all(torch.equal(p, q) for p, q in zip(ta.tensors(), tb.tensors()))
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_weight_gradient_from_masked_factors_equals_autograd_on_reconstruction():
    layer = nn.Conv2d(12, 12, 3, padding=1, groups=12).double()  # depthwise
    state = SyncFreeState()
    for seed in range(3):
        x = smooth(8, 12, 10, seed)
        tucker = syncfree_hosvd(x, 0.8, state)
    dy = torch.randn(8, 12, 10, 10, dtype=torch.float64)
    x_hat = tucker.reconstruct().requires_grad_()
    (expected,) = torch.autograd.grad(layer(x_hat), layer.weight, dy)
    ours = tucker_weight_grad(tucker, dy, layer.weight.shape, ConvGeometry.of(layer))
    assert rel_err(ours, expected) < 1e-10


def test_nonfinite_raises_at_the_next_collect_and_extremes_are_finite():
    state = SyncFreeState()
    syncfree_hosvd(smooth(6, 8, 6, 0, torch.float32), 0.8, state)
    huge = syncfree_hosvd(smooth(6, 8, 6, 1, torch.float32) * 1e18, 0.8, state)
    assert all(torch.isfinite(t).all() for t in huge.tensors())
    state.collect()
    assert state.fractions and min(state.fractions) > 0
    bad = smooth(6, 8, 6, 2, torch.float32)
    bad[0, 0, 0, 0] = float("nan")
    syncfree_hosvd(bad, 0.8, state)  # no host read: nothing raised yet
    with pytest.raises(NonFiniteActivationError):
        state.collect()
    with pytest.raises(NonFiniteActivationError):
        syncfree_hosvd(bad, 0.8, SyncFreeState())  # the initialising step is hosvd: raises at once


def test_deepcopy_continues_identically():
    state = SyncFreeState()
    for seed in range(3):
        syncfree_hosvd(smooth(8, 6, 6, seed), 0.8, state)  # leaves a record pending
    twin = copy.deepcopy(state)
    assert twin.capacities == state.capacities and len(twin._pending) == len(state._pending) == 1
    for seed in (7, 8):
        a, b = syncfree_hosvd(smooth(8, 6, 6, seed), 0.8, state), syncfree_hosvd(smooth(8, 6, 6, seed), 0.8, twin)
        assert all(torch.equal(p, q) for p, q in zip(a.tensors(), b.tensors()))
    assert twin.bases[0].data_ptr() != state.bases[0].data_ptr()


def test_shape_change_reinitialises_and_state_dict_round_trips():
    state = SyncFreeState()
    for seed in range(3):
        syncfree_hosvd(smooth(8, 6, 6, seed), 0.8, state)
    twin = SyncFreeState.from_state_dict(copy.deepcopy(state.state_dict()))
    x = smooth(8, 6, 6, 9)
    a, b = syncfree_hosvd(x, 0.8, state), syncfree_hosvd(x, 0.8, twin)
    assert all(torch.equal(p, q) for p, q in zip(a.tensors(), b.tensors()))
    syncfree_hosvd(smooth(5, 6, 6, 10), 0.8, state)  # batch 5: new shapes
    assert state.initialisations == 2


@pytest.mark.parametrize("rows, cols, dtype", [(50, 8, torch.float32), (300, 120, torch.float32), (40, 40, torch.float64)])
def test_cholesky_qr_orthonormal_and_nested(rows, cols, dtype):
    g = torch.Generator().manual_seed(rows)
    z = torch.randn(rows, cols, generator=g, dtype=dtype) @ torch.diag(torch.logspace(0, -3, cols, dtype=dtype))
    q = _cholesky_qr(z)
    tol = 1e-4 if dtype == torch.float32 else 1e-12
    assert rel_err(q.T @ q, torch.eye(cols, dtype=dtype)) < tol
    for j in (1, cols // 2, cols):  # span of the first j columns is kept
        head = q[:, :j]
        assert rel_err(head @ (head.T @ z[:, :j]), z[:, :j]) < 10 * tol


def test_matches_hosvd_ranks_on_a_repeated_input():
    """Subspace iteration on the same input converges: the device ranks reach hosvd's."""
    x = smooth(16, 24, 12, 0)
    state = SyncFreeState()
    for _ in range(8):
        syncfree_hosvd(x, 0.8, state)
    state.collect()
    assert state.ranks == hosvd(x, 0.8).ranks
