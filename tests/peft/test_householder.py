"""Blocked WY Householder products against the sequential product, in float64."""

import pytest
import torch

from actcomp.peft import householder_apply, householder_product, householder_sequential, wy_blocks
from conftest import rel_err

# (d, r, block_size): one block, several full blocks, a remainder block, r > d, block > r.
CASES = [(8, 1, 32), (8, 5, 2), (16, 16, 4), (16, 37, 8), (5, 64, 64), (5, 200, 16), (33, 70, 32), (64, 64, 128)]


def vectors(r, d, pairs=False):
    v = torch.randn(r // 2 if pairs else r, d, dtype=torch.float64) * torch.rand(r // 2 if pairs else r, 1, dtype=torch.float64).add(0.5)
    return v.repeat_interleave(2, 0) if pairs else v


@pytest.mark.parametrize("d, r, block", CASES, ids=str)
def test_blocked_equals_sequential(d, r, block):
    v = vectors(r, d)
    x = torch.randn(d, 7, dtype=torch.float64)
    expected = householder_sequential(v, x)
    assert rel_err(householder_apply(v, x, block), expected) < 1e-12
    q = householder_product(v, block)
    assert rel_err(q @ x, expected) < 1e-12
    assert rel_err(q.T @ q, torch.eye(d, dtype=torch.float64)) < 1e-12


def test_sequential_is_the_product_of_reflection_matrices():
    v = vectors(5, 6)
    q = torch.eye(6, dtype=torch.float64)
    for vi in v:  # H_1 H_2 ... H_r, each I - 2 v v^T / ||v||^2
        q = q @ (torch.eye(6, dtype=torch.float64) - 2 * torch.outer(vi, vi) / (vi @ vi))
    assert rel_err(householder_sequential(v, torch.eye(6, dtype=torch.float64)), q) < 1e-14


def test_each_block_is_identity_minus_v_t_v_transpose():
    v = vectors(8, 6)
    for j, (rows, v_t) in enumerate(wy_blocks(v, 3)):
        block = householder_sequential(v[3 * j : 3 * j + 3], torch.eye(6, dtype=torch.float64))
        assert rel_err(torch.eye(6, dtype=torch.float64) - v_t @ rows, block) < 1e-13
    assert [b[0].shape[0] for b in wy_blocks(v, 3)] == [3, 3, 2]


@pytest.mark.parametrize("d, r, block", [(8, 6, 2), (5, 64, 16), (40, 40, 32)], ids=str)
def test_equal_pairs_are_the_identity(d, r, block):
    x = torch.randn(d, 3, dtype=torch.float64)
    assert rel_err(householder_apply(vectors(r, d, pairs=True), x, block), x) < 1e-13


@pytest.mark.parametrize("d, r, block", [(8, 5, 2), (16, 37, 8), (12, 12, 32)], ids=str)
def test_gradients_equal_autograd_through_the_sequential_product(d, r, block):
    v = vectors(r, d).requires_grad_()
    x = torch.randn(d, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(d, 4, dtype=torch.float64)
    (ours_v, ours_x) = torch.autograd.grad((householder_apply(v, x, block) * g).sum(), (v, x))
    (ref_v, ref_x) = torch.autograd.grad((householder_sequential(v, x) * g).sum(), (v, x))
    assert rel_err(ours_v, ref_v) < 1e-10
    assert rel_err(ours_x, ref_x) < 1e-10


def test_gradcheck():
    v = vectors(5, 4).requires_grad_()
    x = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, x: householder_apply(v, x, 2), (v, x))


def test_leading_dims_and_no_reflections():
    v = vectors(6, 5)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    assert rel_err(householder_apply(v, x, 4), householder_sequential(v, x)) < 1e-12
    assert torch.equal(householder_apply(v[:0], x), x)


def test_bad_shapes_and_block_size_are_refused():
    with pytest.raises(ValueError, match="d = 5"):
        householder_apply(vectors(3, 5), torch.randn(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="one vector per row"):
        householder_apply(torch.randn(5), torch.randn(5, 2))
    with pytest.raises(ValueError, match="block_size"):
        householder_apply(vectors(3, 5), torch.randn(5, 2, dtype=torch.float64), 0)
