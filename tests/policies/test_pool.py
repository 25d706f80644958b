"""Max pooling keeps window positions in uint8; average pooling keeps nothing; both exact."""

import copy

import pytest
import torch
from torch import nn

import actcomp

POOLS = [
    ("max2d", lambda: nn.MaxPool2d(3, 2, 1), (2, 3, 9, 9)),
    ("max2d-dilated-ceil", lambda: nn.MaxPool2d((3, 2), (2, 1), (1, 0), (2, 1), ceil_mode=True), (2, 3, 11, 8)),
    ("max1d", lambda: nn.MaxPool1d(4, 3, 2), (2, 3, 17)),
    ("max3d", lambda: nn.MaxPool3d(2), (2, 3, 4, 6, 5)),
    ("max2d-unbatched", lambda: nn.MaxPool2d(2), (3, 8, 8)),
    ("avg2d", lambda: nn.AvgPool2d(3, 2, 1, count_include_pad=False), (2, 3, 9, 9)),
    ("avg2d-ceil-divisor", lambda: nn.AvgPool2d(2, ceil_mode=True, divisor_override=3), (2, 3, 7, 7)),
    ("avg1d", lambda: nn.AvgPool1d(3, 2, 1), (2, 3, 10)),
    ("avg3d", lambda: nn.AvgPool3d(2, 1), (2, 3, 4, 5, 5)),
    ("adaptive2d", lambda: nn.AdaptiveAvgPool2d((3, 2)), (2, 3, 7, 9)),
    ("adaptive1d", lambda: nn.AdaptiveAvgPool1d(4), (2, 3, 10)),
    ("adaptive3d", lambda: nn.AdaptiveAvgPool3d(1), (2, 3, 4, 5, 3)),
]


def _front(shape):
    """A compressed layer in front of the pool, channels preserved, for the input's rank."""
    dims = len(shape) - 2 if len(shape) > 3 or shape[0] == 2 else len(shape) - 1
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](3, 3, 1)


@pytest.mark.parametrize("name, make, shape", POOLS, ids=[p[0] for p in POOLS])
def test_pooling_is_exact_and_keeps_little(name, make, shape):
    torch.manual_seed(0)
    model = nn.Sequential(_front(shape), make()).double()
    reference = copy.deepcopy(model)
    actcomp.compress(model, ["0"], eps=1.0)
    assert type(model[1]).__name__.startswith("Compressed")
    x = torch.randn(shape, dtype=torch.float64)
    x.view(-1)[1::5] = x.view(-1)[::5][: x.view(-1)[1::5].numel()]  # ties inside windows
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with actcomp.count_saved(model) as saved:
        ya = model(xa)
    yb = reference(xb)
    assert torch.equal(ya, yb)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    assert torch.allclose(xa.grad, xb.grad, rtol=0, atol=1e-12)
    assert torch.allclose(model[0].weight.grad, reference[0].weight.grad, rtol=0, atol=1e-12)
    factors = actcomp.stats(model)["0"].kept_bytes
    if name.startswith("max"):
        assert saved.saved_bytes == factors + ya.numel()  # one uint8 per output
        assert sum(d == torch.uint8 for _, d in saved.shapes) == 1
    else:
        assert saved.saved_bytes == factors  # nothing for the pool


@pytest.mark.parametrize("chunk", [1 << 20, 7, 1], ids=["one-chunk", "chunks", "one-plane-each"])
def test_window_indices_round_trip(chunk, monkeypatch):
    """The window-position encoding inverts to torch's flat indices (large windows: int16),
    whether the planes are converted at once or in chunks."""
    from actcomp.policies import pool
    from actcomp.policies.pool import flat_indices, local_indices

    monkeypatch.setattr(pool, "_CHUNK", chunk)
    x = torch.randn(2, 3, 40, 40)
    for kernel, stride, padding, dilation in [((3, 3), (2, 2), (1, 1), (1, 1)), ((17, 17), (5, 5), (8, 8), (1, 1)), ((2, 3), (1, 2), (0, 1), (3, 2))]:
        _, flat = torch.nn.functional.max_pool2d(x, kernel, stride, padding, dilation, return_indices=True)
        local = local_indices(flat, (40, 40), stride, padding, dilation, kernel)
        assert local.dtype == (torch.uint8 if kernel[0] * kernel[1] <= 256 else torch.int16)
        assert torch.equal(flat_indices(local, (40, 40), stride, padding, dilation, kernel), flat)


def test_max_pool_conversions_hold_no_copy_of_the_int64_indices():
    """The index conversions run in chunks: the forward's allocation peak is the pool's own
    (output and torch's int64 indices) plus a few MiB, not several int64 copies."""
    from actcomp.memory.measure import _peak_of

    pool = nn.Sequential(nn.Conv2d(16, 16, 1), nn.MaxPool2d(3, 2, 1))
    actcomp.compress(pool, eps=0.9)
    x = torch.randn(16, 16, 320, 320, requires_grad=True)
    y_bytes = 16 * 16 * 160 * 160 * 4
    peak, _ = _peak_of(lambda: pool[1](x), torch.device("cpu"))
    if peak is None:
        pytest.skip("this torch's profiler has no allocation events")
    # output, torch's int64 indices, the uint8 positions, a few int64 chunk temporaries (old: 393 MB)
    assert peak < y_bytes + 2 * y_bytes + y_bytes // 4 + 6 * 8 * (1 << 20)
