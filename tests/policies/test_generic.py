"""The generic packer: every other large saved tensor kept as factors (opt-in)."""

import copy

import torch
import torch.nn.functional as F
from torch import nn

import actcomp


class Attention(nn.Module):
    """Functional ops in forward: products, softmax, layer norm, GELU."""

    def __init__(self, d=16):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        attention = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
        return x + self.out(F.gelu(attention @ v))


def data():
    torch.manual_seed(0)
    return torch.randn(4, 24, 16, dtype=torch.float64).cumsum(1) / 5


def test_eps_one_equals_plain_autograd():
    torch.manual_seed(0)
    model = Attention().double()
    reference = copy.deepcopy(model)
    actcomp.compress(model, eps=1.0, neighbours=actcomp.Neighbours(generic=True, threshold=0))
    x = data()
    grads = []
    for m in (model, reference):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(torch.cos(y.detach()))
        grads.append([xi.grad, *(p.grad for p in m.parameters())])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)


def test_packs_large_tensors_only_and_reports_them():
    torch.manual_seed(0)
    model = Attention().double()
    x = data().requires_grad_()
    plain = actcomp.measure(copy.deepcopy(model), x, vanilla=False).saved_bytes
    actcomp.compress(model, eps=0.7, neighbours=actcomp.Neighbours(generic=True, threshold=4096))
    report = actcomp.measure(model, x)
    assert report.vanilla_saved_bytes == plain
    assert report.saved_bytes < 0.6 * plain
    policies = {r.name: r.policy for r in report.rows}
    assert "packed" in policies[""]  # the container's own functional ops
    actcomp.restore(model)
    assert actcomp.policies.generic.generic_packer(model) is None
    assert actcomp.measure(model, x, vanilla=False).saved_bytes == plain


def test_suspended_does_not_pack():
    model = Attention().double()
    x = data().requires_grad_()
    plain = actcomp.measure(copy.deepcopy(model), x, vanilla=False).saved_bytes
    actcomp.compress(model, eps=0.5, neighbours=actcomp.Neighbours(generic=True, threshold=0))
    with actcomp.suspended(model):
        assert actcomp.measure(model, x, vanilla=False).saved_bytes == plain


def test_one_tensor_saved_by_two_ops_is_packed_once():
    class Twice(nn.Module):
        def forward(self, x):
            h = x * 2
            return h.sin().sum() + h.cos().sum()  # sin and cos both save h

    x = torch.randn(32, 64, dtype=torch.float64).cumsum(0).requires_grad_()
    model = nn.Sequential(nn.Linear(64, 64), Twice()).double()
    actcomp.compress(model, ["0"], eps=0.9, neighbours=actcomp.Neighbours(generic=True, threshold=0))
    with actcomp.count_saved(model) as saved:
        model(x)
    from actcomp.linalg.decompose import hosvd

    assert (32, 64) not in [s for s, _ in saved.shapes]  # packed
    h = (model[0](x) * 2).detach()
    assert saved.saved_bytes == actcomp.stats(model)["0"].kept_bytes + hosvd(h, 0.9).nbytes  # once


class LowRankWeightView(nn.Module):
    """A functional product with a view of a parameter (as MultiheadAttention's in_proj chunks
    and F.linear's w.t()): plain autograd keeps the view at no cost; packing it would add bytes."""

    def __init__(self, d=16):
        super().__init__()
        self.first = nn.Linear(d, d)
        self.w = nn.Parameter(torch.randn(48, 2) @ torch.randn(2, d))  # rank 2: small factors

    def forward(self, x):
        return self.first(x) @ self.w.t()


def test_views_of_parameters_are_never_packed():
    torch.manual_seed(0)
    model = LowRankWeightView().double()
    x = data().requires_grad_()
    actcomp.compress(model, eps=0.9, neighbours=actcomp.Neighbours(generic=True, threshold=0))
    with actcomp.count_saved(model) as compressed:
        model(x).sum().backward()
    with actcomp.suspended(model), actcomp.count_saved(model) as plain:
        model(x).sum().backward()
    assert compressed.saved_bytes < plain.saved_bytes
    # w.t() (16, 48) is the only saved tensor with a mode of 48: no factor (48, r) of it was kept
    assert not any(len(shape) == 2 and shape[0] == 48 for shape, _ in compressed.shapes)
