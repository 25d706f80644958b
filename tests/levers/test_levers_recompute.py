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


def with_regions(model, x):
    """Every block and every region of ``model``."""
    from actcomp.levers.recompute import auto_regions

    return auto_blocks(model) + auto_regions(model, x)


@pytest.mark.parametrize("regions", [False, True])
@pytest.mark.parametrize("order", ["compress-first", "recompute-first"])
def test_composes_with_compress_at_eps_1(order, regions):
    a, b = pair()
    c = copy.deepcopy(b)
    x, y = data()
    blocks = with_regions(b, x) if regions else "auto"
    apply_compress = functools.partial(actcomp.compress, eps=1.0)  # neighbour policies too ("auto")
    if order == "compress-first":
        apply_compress(b)
        checkpoint_blocks(b, blocks)
    else:
        checkpoint_blocks(b, blocks)
        apply_compress(b)
    apply_compress(c)  # compressed, no recompute
    assert actcomp.compressed_layers(b).keys() == actcomp.compressed_layers(c).keys()
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


@pytest.mark.parametrize("regions", [False, True])
def test_every_lever_together_equals_the_plain_loop(regions):
    """compress (eps = 1) + recompute (of blocks, and of regions) + micro-batches + step in
    backward, frozen BatchNorm: the weights after three steps are those of the plain full-batch loop."""
    from actcomp.levers import freeze_batchnorm, microbatch_step, optimizer_in_backward

    a, b = pair(drop=0.0)
    actcomp.compress(b, eps=1.0)
    checkpoint_blocks(b, with_regions(b, data()[0]) if regions else "auto")
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


# Regions: runs of sibling modules that the parent's forward chains (a ResNet stem)


class Stem(nn.Module):
    """A parent calling its children one by one (as ResNet.forward calls its stem), with an
    optional op between two of them that saves tensors and draws random numbers, and an
    optional break of the chain."""

    def __init__(self, between: bool = False, broken: bool = False, drop: float = 0.3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4, 5)
        if between:
            self.scale = nn.Parameter(torch.ones(4, 1, 1))
        self.between, self.broken = between, broken

    def forward(self, x):
        x = self.conv(x)
        side = None
        if self.between:  # saves x and scale for backward, draws random numbers, keeps the chain
            side = (x * self.scale * torch.rand_like(x)).mean()
        x = self.bn(x)
        if self.broken:
            x = x * 2.0
        x = self.pool(self.drop(self.relu(x)))
        out = self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return out if side is None else out + side


STEM = "conv+bn+relu+drop+pool"


def region_pair(**kwargs):
    a, b = Stem(**kwargs).double(), Stem(**kwargs).double()
    b.load_state_dict(a.state_dict())
    return a, b


def test_auto_regions_find_the_chained_runs_outside_blocks():
    from actcomp.levers.recompute import auto_regions

    torchvision = pytest.importorskip("torchvision")
    resnet = torchvision.models.resnet18(num_classes=10)
    assert auto_regions(resnet, torch.randn(2, 3, 32, 32)) == ["conv1+bn1+relu+maxpool"]
    assert auto_regions(Net().double(), data()[0]) == ["stem.0+stem.1+stem.2+stem.3", "head.0+head.1+head.2"]
    assert auto_regions(Stem().double(), data()[0]) == [STEM]  # fc after the functional pooling is cut off
    # a leading in-place module is dropped (the region's input must stay as saved); blocks are excluded
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(3, 3), nn.Tanh(), nn.Sequential(nn.Linear(3, 3), nn.Tanh()), nn.Linear(3, 3))
    assert auto_regions(model, torch.randn(2, 3), blocks=["3"]) == ["1+2"]


def test_auto_regions_leave_running_statistics_and_rng_as_they_were():
    from actcomp.levers.recompute import auto_regions

    model, (x, _) = Net(drop=0.5).double(), data()
    before = copy.deepcopy(model.state_dict())
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    auto_regions(model, x)  # the blocks' dropout draws
    assert torch.equal(torch.rand(3), expected)
    assert_equal_dicts(model.state_dict(), before, tol=0)


@pytest.mark.parametrize("between", [False, True])
def test_region_gradients_and_running_statistics_are_exact(between):
    a, b = region_pair(between=between)
    checkpoint_blocks(b, [STEM])
    x, y = data()
    for _ in range(2):
        assert_equal_dicts(step(a, x, y), step(b, x, y))
    assert_equal_dicts(dict(a.named_buffers()), dict(b.named_buffers()))
    assert int(b.bn.num_batches_tracked) == 2


def test_resnet18_stem_region_and_blocks_are_exact():
    torchvision = pytest.importorskip("torchvision")
    from actcomp.levers.recompute import auto_regions

    torch.manual_seed(0)
    a = torchvision.models.resnet18(num_classes=5).double()
    b = copy.deepcopy(a)
    x, y = torch.randn(3, 3, 32, 32, dtype=torch.float64), torch.randint(0, 5, (3,))
    handle = checkpoint_blocks(b, auto_blocks(b) + auto_regions(b, x))
    assert handle.blocks[-1] == "conv1+bn1+relu+maxpool"
    assert_equal_dicts(step(a, x, y), step(b, x, y))
    assert_equal_dicts(dict(a.named_buffers()), dict(b.named_buffers()))


def test_a_region_keeps_only_its_input():
    model = Stem(drop=0.0).double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    plain = saved_bytes(model, x)
    checkpoint_blocks(model, [STEM])
    with actcomp.count_saved(model) as saved:
        out = model(x)
    region, after = saved.shapes[0], saved.shapes[1:]  # the region saves x; fc and the pooling after it their own
    with actcomp.count_saved(model) as outside:
        model.fc(torch.flatten(F.adaptive_avg_pool2d(torch.randn(4, 4, 4, 4, dtype=torch.float64, requires_grad=True), 1), 1))
    out.sum().backward()
    assert region == (tuple(x.shape), x.dtype) and after == outside.shapes
    assert saved.saved_bytes < plain


def test_a_broken_chain_ends_the_region_with_a_warning_and_stays_exact():
    a, b = region_pair(broken=True)
    checkpoint_blocks(b, [STEM])
    x, y = data()
    with pytest.warns(UserWarning, match="'relu' .*another tensor than the output of 'bn'"):
        got = step(b, x, y)
    assert_equal_dicts(step(a, x, y), got)


class Raising(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def test_a_parent_that_raises_inside_a_region_leaves_no_hooks_behind():
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), Raising()).double()
    checkpoint_blocks(model, ["0+1+2"])
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.randn(2, 3, dtype=torch.float64))
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None  # the checkpoint's hooks were popped
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    w.exp().sum().backward()
    torch.testing.assert_close(w.grad, w.detach().exp())


def test_regions_compose_with_blocks_and_are_refused_where_they_overlap():
    model = Net().double()
    with pytest.raises(ValueError, match="distinct siblings"):
        checkpoint_blocks(model, ["stem.0+layer.0.conv1"])
    with pytest.raises(ValueError, match="lies inside block 'layer'"):
        checkpoint_blocks(model, ["layer", "layer.0.conv1+layer.0.bn1"])
    with pytest.raises(ValueError, match="is in region"):
        checkpoint_blocks(model, ["stem.0+stem.1", "stem.1+stem.2"])
    handle = checkpoint_blocks(model, ["stem.0+stem.1+stem.2+stem.3", "layer.0"])
    assert "forward" in model.stem.__dict__ and "forward" in model.stem[0].__dict__
    with pytest.raises(ValueError, match="already checkpointed"):
        checkpoint_blocks(model, ["stem.2+stem.3"])
    twin = copy.deepcopy(model)  # the twin's regions are its own
    x, y = data()
    assert_equal_dicts(step(model, x, y), step(twin, x, y))
    handle.remove()
    assert "forward" not in model.stem.__dict__ and "forward" not in model.stem[0].__dict__
