"""Recompute of whole blocks: exact gradients, BatchNorm statistics updated once, fewer bytes kept."""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import actcomp
from actcomp.levers import auto_blocks, checkpoint_blocks


class Block(nn.Module):
    def __init__(self, c: int, drop: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.drop(self.bn2(self.conv2(out)))
        out += x
        return self.relu(out)


class Net(nn.Module):
    def __init__(self, drop: float = 0.0):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.layer = nn.Sequential(Block(4, drop), Block(4, drop))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))

    def forward(self, x):
        return self.head(self.layer(self.stem(x)))


def pair(drop: float = 0.0):
    a, b = Net(drop).double(), Net(drop).double()
    b.load_state_dict(a.state_dict())
    return a, b


def step(model, x, y, seed=3):
    torch.manual_seed(seed)  # the same dropout masks for both models
    F.cross_entropy(model(x), y).backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return out


def data(n=6):
    return torch.randn(n, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (n,))


def assert_equal_dicts(a, b, tol=1e-12):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=k)


def saved_bytes(model, x):
    with actcomp.count_saved(model) as saved:
        out = model(x).sum()
    out.backward()
    model.zero_grad()
    return saved.saved_bytes


def test_auto_rule():
    assert auto_blocks(Net()) == ["layer.0", "layer.1"]
    seq = nn.Sequential(Net().stem, nn.Sequential(Block(4), Block(4)), Net().head)
    assert auto_blocks(seq) == ["0", "1.0", "1.1", "2"]
    with pytest.raises(ValueError, match="found no"):
        checkpoint_blocks(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))


@pytest.mark.parametrize("blocks", ["auto", ["stem", "layer.0", "layer.1", "head"], ["layer"]])
@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_gradients_and_running_statistics_are_exact(blocks, drop):
    a, b = pair(drop)
    handle = checkpoint_blocks(b, blocks)
    assert handle.blocks
    x, y = data()
    for _ in range(2):
        assert_equal_dicts(step(a, x, y), step(b, x, y))
    # running statistics updated once per step (num_batches_tracked == 2 after two steps)
    assert_equal_dicts(dict(a.named_buffers()), dict(b.named_buffers()))
    assert int(b.layer[0].bn1.num_batches_tracked) == 2


def test_torch_checkpoint_alone_updates_batchnorm_twice():
    """Why the running statistics are restored around the recompute: plain torch checkpointing
    runs the BatchNorm's forward again in backward, and its momentum update with it."""
    model = Block(4).double()
    x = torch.randn(4, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    checkpoint(model, x, use_reentrant=False).sum().backward()
    assert int(model.bn1.num_batches_tracked) == 2


@pytest.mark.parametrize("order", ["compress-first", "recompute-first"])
def test_composes_with_compress_at_eps_1(order):
    a, b = pair()
    c = copy.deepcopy(b)
    apply_compress = functools.partial(actcomp.compress, eps=1.0)  # neighbour policies too ("auto")
    if order == "compress-first":
        apply_compress(b)
        checkpoint_blocks(b)
    else:
        checkpoint_blocks(b)
        apply_compress(b)
    apply_compress(c)  # compressed, no recompute
    assert actcomp.compressed_layers(b).keys() == actcomp.compressed_layers(c).keys()
    x, y = data()
    plain, recomputed, compressed = step(a, x, y), step(b, x, y), step(c, x, y)
    assert_equal_dicts(recomputed, plain, tol=1e-9)
    assert_equal_dicts(recomputed, compressed, tol=1e-12)
    assert_equal_dicts(dict(b.named_buffers()), dict(a.named_buffers()))
    assert saved_bytes(b, x) < saved_bytes(c, x)


def test_keeps_fewer_bytes_and_remove_restores():
    model = Net().double()
    x, _ = data(8)
    plain = saved_bytes(model, x)
    handle = checkpoint_blocks(model)
    recomputed = saved_bytes(model, x)
    assert recomputed < plain
    handle.remove()
    assert "forward" not in model.layer[0].__dict__
    assert saved_bytes(model, x) == plain
    handle.remove()  # idempotent


def test_no_grad_and_eval_run_plainly():
    a, b = pair()
    checkpoint_blocks(b)
    x, _ = data()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    a.eval(), b.eval()
    assert_equal_dicts(step(a, x, torch.zeros(6, dtype=torch.long)), step(b, x, torch.zeros(6, dtype=torch.long)))


def test_deepcopy_keeps_its_own_forward():
    model = Net().double()
    checkpoint_blocks(model)
    twin = copy.deepcopy(model)
    assert twin.layer[0].forward.module is twin.layer[0]
    x, y = data()
    assert_equal_dicts(step(model, x, y), step(twin, x, y))


def test_keyword_arguments_reach_the_block():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(3, 3), nn.Tanh())

        def forward(self, x, scale=1.0):
            return self.inner(x) * scale

    model = nn.Sequential(Scaled(), Scaled()).double()
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    expected = torch.autograd.grad(model[0](x, scale=2.0).sum(), x)[0]
    checkpoint_blocks(model, ["0"])
    torch.testing.assert_close(torch.autograd.grad(model[0](x, scale=2.0).sum(), x)[0], expected)


def test_bad_names_are_refused():
    model = Net()
    with pytest.raises(ValueError, match="inside block"):
        checkpoint_blocks(model, ["layer", "layer.0"])
    with pytest.raises(AttributeError):
        checkpoint_blocks(model, ["nope"])
    checkpoint_blocks(model, ["layer.0"])
    with pytest.raises(ValueError, match="already checkpointed"):
        checkpoint_blocks(model, ["layer.0"])


def test_every_lever_together_equals_the_plain_loop():
    """compress (eps = 1) + recompute + micro-batches + step in backward, frozen BatchNorm: the
    weights after three steps are those of the plain full-batch loop."""
    from actcomp.levers import freeze_batchnorm, microbatch_step, optimizer_in_backward

    a, b = pair(drop=0.0)
    actcomp.compress(b, eps=1.0)
    checkpoint_blocks(b)
    opt = torch.optim.AdamW(a.parameters(), lr=0.01, weight_decay=0.1)
    handle = optimizer_in_backward(b, torch.optim.AdamW, lr=0.01, weight_decay=0.1)
    for _ in range(3):
        x, y = data(9)
        with freeze_batchnorm(a):
            F.cross_entropy(a(x), y).backward()
        opt.step()
        opt.zero_grad()
        with freeze_batchnorm(b):
            microbatch_step(b, lambda m, batch: F.cross_entropy(m(batch[0]), batch[1]), (x, y), 2, in_backward=handle)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-9, msg=name)
