import torch

from actcomp.linalg.factors import LowRank, Tucker
from conftest import rel_err


def test_tucker_reconstruct_is_multilinear_product():
    core = torch.randn(2, 3, 4, dtype=torch.float64)
    factors = tuple(torch.randn(n, k, dtype=torch.float64) for n, k in [(5, 2), (6, 3), (7, 4)])
    tucker = Tucker(core, factors)
    reference = torch.einsum("abc,ia,jb,kc->ijk", core, *factors)
    assert rel_err(tucker.reconstruct(), reference) < 1e-14
    assert tucker.ranks == (2, 3, 4)
    assert tucker.shape == (5, 6, 7)
    assert tucker.nbytes == 8 * (24 + 10 + 18 + 28)
    half = tucker.to(torch.float16)
    assert half.nbytes == tucker.nbytes // 4
    assert all(t.dtype == torch.float16 for t in half.tensors())


def test_lowrank_reconstruct_is_matrix_product():
    left = torch.randn(6, 2, dtype=torch.float64)
    right = torch.randn(2, 3, 4, dtype=torch.float64)
    lowrank = LowRank(left, right)
    assert lowrank.shape == (6, 3, 4)
    assert lowrank.rank == 2
    assert rel_err(lowrank.reconstruct(), torch.einsum("ik,kab->iab", left, right)) < 1e-14
    assert lowrank.nbytes == 8 * (12 + 24)
