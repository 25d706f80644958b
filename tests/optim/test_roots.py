"""Thin roots of SINGD's activation factor from factors: Z Z^T equals a^T a of the
reconstructed input, for Linear and Conv2d, every factor type, bias, expand and reduce."""

import pytest
import torch
from torch import nn

from actcomp.linalg.factors import PatchMeans
from actcomp.kernels.conv import ConvGeometry
from actcomp.optim.roots import kfac_root, patch_mean_matrix
from optim_cases import CONV_CASES, PRODUCERS, dense_rows, make_conv

DT = torch.float64


def assert_root(z, a):
    torch.testing.assert_close(z @ z.T, a.T @ a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("producer", sorted(PRODUCERS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(9, 6), (4, 3, 6), (2, 3, 2, 6)])
def test_linear_root(shape, bias, producer, approx):
    x = torch.randn(*shape, dtype=DT)
    layer = nn.Linear(shape[-1], 5, bias=bias).to(DT)
    factors = PRODUCERS[producer](x)
    z = kfac_root("linear", factors, None, layer.weight.shape, bias, approx)
    assert_root(z, dense_rows(factors.reconstruct(), layer, approx))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("producer", sorted(PRODUCERS))
@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv2d_root(case, producer, approx):
    _, kwargs = case
    layer = make_conv(kwargs)
    x = torch.randn(3, 4, 9, 8, dtype=DT)
    factors = PRODUCERS[producer](x)
    z = kfac_root("conv", factors, ConvGeometry.of(layer), layer.weight.shape, layer.bias is not None, approx)
    assert_root(z, dense_rows(factors.reconstruct(), layer, approx))


def test_root_is_thin_for_a_low_rank_input():
    """Linear, Tucker of ranks (2, 3): the root has K_B = 2 columns (+1 for the bias), not B."""
    from actcomp.linalg.factors import Tucker

    tucker = Tucker(torch.randn(2, 3, dtype=DT), (torch.linalg.qr(torch.randn(50, 2, dtype=DT))[0], torch.randn(7, 3, dtype=DT)))
    z = kfac_root("linear", tucker, None, torch.Size((4, 7)), True, "expand")
    assert z.shape == (8, 3)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("kwargs", [dict(padding=1), dict(groups=2, stride=2)])
def test_dense_reference_is_singds_processing(kwargs, approx):
    """The dense reference of these tests is stock singd's processed input (zero padding)."""
    utils = pytest.importorskip("singd.optim.utils")
    conv = nn.Conv2d(4, 6, 3, **kwargs).to(DT)
    x = torch.randn(3, 4, 9, 8, dtype=DT)
    torch.testing.assert_close(dense_rows(x, conv, approx), utils.process_input(x.clone(), conv, approx), rtol=1e-14, atol=1e-14)
    linear = nn.Linear(6, 3).to(DT)
    y = torch.randn(2, 5, 6, dtype=DT)
    torch.testing.assert_close(dense_rows(y, linear, approx), utils.process_input(y.clone(), linear, approx), rtol=1e-14, atol=1e-14)


def test_patch_mean_matrix_counts_each_location_once():
    """Each tap's row averages the input entries it reads over the output locations."""
    m = patch_mean_matrix(9, 3, 2, 1, torch.zeros(1, dtype=DT))
    assert m.shape == (3, 9)
    torch.testing.assert_close(m.sum(1), torch.ones(3, dtype=DT))
    assert torch.equal(m[0].nonzero().flatten(), torch.tensor([0, 2, 4, 6]))


def test_patch_means_are_refused_by_name():
    with pytest.raises(TypeError, match="gradient_filter keeps patch means"):
        kfac_root("linear", PatchMeans(torch.zeros(2, 3, 1, 1), (2, 2)), None, torch.Size((4, 3)), False)


def test_kfac_root_asks_the_registry_for_the_family():
    """The family object and its registered name give the same root."""
    from actcomp.kernels.linear import LINEAR

    factors = PRODUCERS["hosvd"](torch.randn(4, 3, 6, dtype=DT))
    by_name = kfac_root("linear", factors, None, torch.Size((5, 6)), True)
    torch.testing.assert_close(kfac_root(LINEAR, factors, None, torch.Size((5, 6)), True), by_name, rtol=0, atol=0)


def test_family_without_second_order_statistics_is_refused_with_what_is_supported():
    import dataclasses

    from actcomp.kernels.linear import LINEAR

    plain = dataclasses.replace(LINEAR, name="plain", second_order=None)
    factors = PRODUCERS["hosvd"](torch.randn(4, 6, dtype=DT))
    with pytest.raises(TypeError, match="the plain family has no second-order statistics; supported: Conv2d, Linear"):
        kfac_root(plain, factors, None, torch.Size((5, 6)), False)


def test_conv3d_geometry_is_refused_with_what_is_supported():
    layer = nn.Conv3d(2, 3, 3, padding=1).to(DT)
    factors = PRODUCERS["hosvd"](torch.randn(2, 2, 5, 5, 5, dtype=DT))
    with pytest.raises(TypeError, match="conv layer's geometry has no second-order statistics; supported: Conv2d, Linear"):
        kfac_root("conv", factors, ConvGeometry.of(layer), layer.weight.shape, True)


def test_unknown_family_name_is_refused_with_the_known_names():
    factors = PRODUCERS["hosvd"](torch.randn(4, 6, dtype=DT))
    with pytest.raises(ValueError, match="no registered layer family is called 'rnn'; known: .*conv, linear"):
        kfac_root("rnn", factors, None, torch.Size((5, 6)), False)
