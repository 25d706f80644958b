"""Warm-started subspace tracking (method 'asi'): eps holds every step, subspaces converge."""

import copy

import pytest
import torch

from actcomp.linalg.decompose import SubspaceTracker, hosvd, tracked_hosvd
from conftest import rel_err


def explained(x, tucker):
    total = x.pow(2).sum()
    return [float(torch.tensordot(x, u, dims=([n], [0])).pow(2).sum() / total) for n, u in enumerate(tucker.factors)]


def containment_angle(inner, outer):
    """sin of the largest principal angle between span(inner) and its projection on span(outer)."""
    return float(torch.linalg.matrix_norm(inner - outer @ (outer.T @ inner), ord=2))


def drifting(steps, shape=(12, 10, 8, 8), ranks=(6, 4, 3, 3), drift=0.01, dtype=torch.float64):
    """Low-rank Tucker tensors with a decaying spectrum whose channel subspace rotates slowly."""
    g = torch.Generator().manual_seed(0)
    core = torch.randn(ranks, generator=g, dtype=dtype)
    for n, r in enumerate(ranks):
        scale = torch.tensor([4.0**-i for i in range(r)], dtype=dtype)
        core = core * scale.reshape([-1 if m == n else 1 for m in range(len(ranks))])
    factors = [torch.linalg.qr(torch.randn(i, r, generator=g, dtype=dtype)).Q for i, r in zip(shape, ranks)]
    generator = torch.randn(shape[1], shape[1], generator=g, dtype=dtype)
    rotation = torch.linalg.matrix_exp(drift * (generator - generator.T))
    for _ in range(steps):
        yield hosvd_free_tucker(core, factors)
        factors[1] = rotation @ factors[1]


def hosvd_free_tucker(core, factors):
    x = core
    for n, u in enumerate(factors):
        x = torch.tensordot(u, x, dims=([1], [n])).movedim(0, n)
    return x.contiguous()


@pytest.mark.parametrize("eps", [0.7, 0.9, 0.99])
def test_eps_holds_every_step_and_subspaces_converge(eps):
    tracker = SubspaceTracker()
    for step, x in enumerate(drifting(8)):
        tucker = tracked_hosvd(x, eps, tracker)
        assert min(explained(x, tucker)) >= eps - 1e-12
        reference = hosvd(x, eps)
        if step >= 4:
            for n in range(1, x.ndim):
                assert containment_angle(reference.factors[n], tracker.factors[n]) < 1e-3
    assert tracker.recomputed == 3  # only the first step decomposed the three non-batch modes


def test_noisy_inputs_keep_eps_and_ranks_adapt():
    torch.manual_seed(0)
    base = torch.relu(torch.nn.functional.avg_pool2d(torch.randn(16, 24, 14, 14), 3, 1)).double()
    tracker = SubspaceTracker()
    for step in range(6):
        x = base + 0.02 * step * torch.randn_like(base)  # the spectrum flattens: ranks must grow
        tucker = tracked_hosvd(x, 0.8, tracker)
        assert min(explained(x, tucker)) >= 0.8 - 1e-12


def test_batch_size_change_device_dtype_agnostic():
    tracker = SubspaceTracker()
    xs = list(drifting(3))
    tracked_hosvd(xs[0], 0.9, tracker)
    smaller = xs[1][:5]  # batch size changes: the batch mode is never carried
    tucker = tracked_hosvd(smaller, 0.9, tracker)
    assert tucker.shape == smaller.shape and tracker.recomputed == 3
    single = tracked_hosvd(xs[2].float(), 0.9, tracker)  # dtype change: re-initialise
    assert single.core.dtype == torch.float32 and tracker.recomputed == 6


def test_eps_one_is_exact():
    tracker = SubspaceTracker()
    for x in drifting(3):
        x = x + 1e-3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
        assert rel_err(tracked_hosvd(x, 1.0, tracker).reconstruct(), x) < 1e-10


def test_does_not_touch_global_rng():
    state = torch.random.get_rng_state()
    tracker = SubspaceTracker(margin=3)
    for x in drifting(3):
        tracked_hosvd(x, 0.99, tracker)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_tracker_copy_reproduces_a_step():
    tracker = SubspaceTracker()
    xs = list(drifting(2))
    tracked_hosvd(xs[0], 0.8, tracker)
    twin = copy.deepcopy(tracker)
    a, b = tracked_hosvd(xs[1], 0.8, tracker), tracked_hosvd(xs[1], 0.8, twin)
    assert all(torch.equal(p, q) for p, q in zip(a.tensors(), b.tensors()))
