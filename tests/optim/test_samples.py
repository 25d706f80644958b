"""HyLo's per-sample inputs I = L R from factors equal I of the reconstructed input; the dense
I of a plain layer is what the layer computes (a patch mean times W is the mean output)."""

import pytest
import torch
from torch import nn

from actcomp.kernels.conv import ConvGeometry
from actcomp.optim.samples import SampleFactors, factor_samples, input_samples, output_samples
from optim_cases import CONV_CASES, PRODUCERS, make_conv

DT = torch.float64


@pytest.mark.parametrize("producer", sorted(PRODUCERS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(9, 6), (4, 3, 6)])
def test_linear_samples_from_factors(shape, bias, producer):
    factors = PRODUCERS[producer](torch.randn(*shape, dtype=DT))
    samples = factor_samples("linear", factors, None, torch.Size((5, shape[-1])), bias)
    dense = input_samples(factors.reconstruct(), None, torch.Size((5, shape[-1])), bias)
    torch.testing.assert_close(samples.reconstruct(), dense.reconstruct(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("producer", sorted(PRODUCERS))
@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv2d_samples_from_factors(case, producer):
    layer = make_conv(case[1])
    factors = PRODUCERS[producer](torch.randn(3, 4, 9, 8, dtype=DT))
    geometry, bias = ConvGeometry.of(layer), layer.bias is not None
    samples = factor_samples("conv", factors, geometry, layer.weight.shape, bias)
    dense = input_samples(factors.reconstruct(), geometry, layer.weight.shape, bias)
    torch.testing.assert_close(samples.reconstruct(), dense.reconstruct(), rtol=1e-12, atol=1e-12)
    assert samples.left.shape[0] == 3


@pytest.mark.parametrize("case", [c for c in CONV_CASES if "groups" not in c[1]], ids=lambda c: c[0])
def test_patch_means_times_weight_are_mean_outputs(case):
    """For groups=1, I_j . vec(W) = sample j's conv output (no bias) averaged over locations."""
    layer = make_conv(case[1])
    x = torch.randn(3, 4, 9, 8, dtype=DT)
    rows = input_samples(x, ConvGeometry.of(layer), layer.weight.shape, False).reconstruct()
    out = nn.functional.conv2d(
        nn.functional.pad(x, layer._reversed_padding_repeated_twice, mode="constant" if layer.padding_mode == "zeros" else layer.padding_mode),
        layer.weight, None, layer.stride, 0, layer.dilation,
    )
    torch.testing.assert_close(rows @ layer.weight.reshape(8, -1).T, out.mean((2, 3)), rtol=1e-12, atol=1e-12)


def test_sample_factor_algebra_matches_dense():
    s = SampleFactors(torch.randn(7, 3, dtype=DT), torch.randn(3, 5, dtype=DT)).with_ones()
    i = s.reconstruct()
    m, w = torch.randn(4, 6, dtype=DT), torch.randn(7, 2, dtype=DT)
    torch.testing.assert_close(i[:, -1], torch.ones(7, dtype=DT))
    torch.testing.assert_close(s.gram(), i @ i.T)
    torch.testing.assert_close(s.squared_norms(), (i * i).sum(1))
    torch.testing.assert_close(s.times_transposed(m), i @ m.T)
    torch.testing.assert_close(s.weighted_sum(w), w.T @ i)
    torch.testing.assert_close(s.rows(torch.tensor([4, 1])).reconstruct(), i[[4, 1]])


def test_output_samples_scale_by_batch():
    g = torch.randn(4, 3, 5, 5, dtype=DT)
    torch.testing.assert_close(output_samples(g, "conv"), 4 * g.mean((2, 3)))
    torch.testing.assert_close(output_samples(g[..., 0, 0], "linear", batch_averaged=False), g[..., 0, 0])
    torch.testing.assert_close(output_samples(g[:, :, :, 0].transpose(1, 2), "linear"), 4 * g[:, :, :, 0].transpose(1, 2).reshape(-1, 3))


def test_samples_take_the_family_object_or_its_name():
    from actcomp.kernels.conv import CONV
    from actcomp.kernels.linear import LINEAR

    g = torch.randn(4, 3, 5, 5, dtype=DT)
    torch.testing.assert_close(output_samples(g, CONV), output_samples(g, "conv"), rtol=0, atol=0)
    factors = PRODUCERS["svd"](torch.randn(9, 6, dtype=DT))
    by_object = factor_samples(LINEAR, factors, None, torch.Size((5, 6)), True).reconstruct()
    torch.testing.assert_close(by_object, factor_samples("linear", factors, None, torch.Size((5, 6)), True).reconstruct(), rtol=0, atol=0)


def test_samples_of_a_family_without_second_order_statistics_are_refused():
    import dataclasses

    from actcomp.kernels.linear import LINEAR

    plain = dataclasses.replace(LINEAR, name="plain", second_order=None)
    with pytest.raises(TypeError, match="the plain family has no second-order statistics; supported: Conv2d, Linear"):
        output_samples(torch.randn(4, 3, dtype=DT), plain)
    with pytest.raises(TypeError, match="the plain family has no second-order statistics"):
        factor_samples(plain, PRODUCERS["svd"](torch.randn(9, 6, dtype=DT)), None, torch.Size((5, 6)), False)
    layer = nn.Conv3d(2, 3, 3)
    with pytest.raises(TypeError, match="conv layer's geometry has no second-order statistics"):
        factor_samples("conv", PRODUCERS["hosvd"](torch.randn(2, 2, 5, 5, 5, dtype=DT)), ConvGeometry.of(layer), layer.weight.shape, False)
