"""The optimizer step in backward gives the weights of the plain loop, in float64."""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actcomp
from actcomp.levers import EXACT_OPTIMIZERS, optimizer_in_backward


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
    ).double()


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5)).double()


MODELS = {"cnn": (cnn, (6, 3, 8, 8)), "mlp": (mlp, (6, 8))}


def pair(kind: str, compress: bool):
    """Two models with equal weights (compressed alike at eps = 1 when asked) and a data stream."""
    make, shape = MODELS[kind]
    a, b = make(), make()
    b.load_state_dict(a.state_dict())
    if compress:
        actcomp.compress(a, eps=1.0)
        actcomp.compress(b, eps=1.0)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(*shape, generator=g, dtype=torch.float64), torch.randint(0, 5, (shape[0],), generator=g)) for _ in range(3)]
    return a, b, data


def loss_of(model, x, y):
    return F.cross_entropy(model(x), y)


def assert_same(a: nn.Module, b: nn.Module, tol: float = 1e-12):
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol, msg=name)


SETTINGS = [
    (torch.optim.SGD, dict(lr=0.1)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    (torch.optim.SGD, dict(lr=0.1, weight_decay=0.05, maximize=True)),
    (torch.optim.Adam, dict(lr=1e-2)),
    (torch.optim.Adam, dict(lr=1e-2, betas=(0.8, 0.9), weight_decay=0.01, amsgrad=True)),
    (torch.optim.AdamW, dict(lr=1e-2)),
    (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    (torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.01)),
    (torch.optim.Adadelta, dict(lr=1.0)),
    (torch.optim.Adamax, dict(lr=1e-2)),
    (torch.optim.NAdam, dict(lr=1e-2)),
    (torch.optim.RAdam, dict(lr=1e-2)),
    (torch.optim.RMSprop, dict(lr=1e-2, momentum=0.5, centered=True)),
    (torch.optim.Rprop, dict(lr=1e-2)),
]


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "hosvd1"])
@pytest.mark.parametrize("kind", ["cnn", "mlp"])
@pytest.mark.parametrize("cls,settings", SETTINGS, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(SETTINGS)])
def test_weights_equal_the_plain_loop(cls, settings, kind, compress):
    a, b, data = pair(kind, compress)
    opt = cls(a.parameters(), **settings)
    handle = optimizer_in_backward(b, cls, **settings)
    start = [p.detach().clone() for p in b.parameters()]
    for x, y in data:
        loss_of(a, x, y).backward()
        opt.step()
        opt.zero_grad()
        loss_of(b, x, y).backward()
        assert all(p.grad is None for p in b.parameters())  # each gradient freed after its step
        handle.step()  # nothing left to step: a no-op, as zero_grad
        handle.zero_grad()
    assert_same(a, b)
    assert any(not torch.equal(p, s) for p, s in zip(b.parameters(), start))


def test_compressed_step_in_backward_matches_uncompressed_plain_loop():
    a, b, data = pair("cnn", False)
    actcomp.compress(b, eps=1.0)
    opt = torch.optim.AdamW(a.parameters(), lr=1e-2)
    optimizer_in_backward(b, torch.optim.AdamW, lr=1e-2)
    for x, y in data:
        loss_of(a, x, y).backward()
        opt.step()
        opt.zero_grad()
        loss_of(b, x, y).backward()
    assert_same(a, b, tol=1e-9)


def test_at_most_the_current_gradient_is_alive():
    """Plain: every parameter gradient accumulates; in backward: each is freed after its step."""
    for fused in (False, True):
        model = mlp()
        params = list(model.parameters())
        if fused:
            optimizer_in_backward(model, torch.optim.SGD, lr=0.1)
        alive: list[int] = []
        for p in params:  # registered after the step's hook: runs after it
            p.register_post_accumulate_grad_hook(lambda _: alive.append(sum(q.grad is not None for q in params)))
        model(torch.randn(4, 8, dtype=torch.float64)).sum().backward()
        assert max(alive) == (0 if fused else len(params))


def test_param_groups_with_their_own_settings():
    a, b, data = pair("cnn", False)
    convs = [p for m in a.modules() if isinstance(m, nn.Conv2d) for p in m.parameters()]
    rest = [p for p in a.parameters() if all(p is not q for q in convs)]
    opt = torch.optim.SGD([{"params": convs, "lr": 0.2, "momentum": 0.5}, {"params": rest, "weight_decay": 0.1}], lr=0.05, momentum=0.9)
    convs_b = [p for m in b.modules() if isinstance(m, nn.Conv2d) for p in m.parameters()]
    rest_b = [p for p in b.parameters() if all(p is not q for q in convs_b)]
    handle = optimizer_in_backward([{"params": convs_b, "lr": 0.2, "momentum": 0.5}, {"params": rest_b, "weight_decay": 0.1}], torch.optim.SGD, lr=0.05, momentum=0.9)
    assert len(handle.param_groups) == len(list(b.parameters()))
    for x, y in data:
        loss_of(a, x, y).backward()
        opt.step()
        opt.zero_grad()
        loss_of(b, x, y).backward()
    assert_same(a, b)


def test_an_instance_hands_over_its_groups_and_state():
    a, b, data = pair("mlp", False)
    first, second = list(a.parameters())[:2], list(a.parameters())[2:]
    opt_a = torch.optim.Adam([{"params": first, "lr": 0.02}, {"params": second}], lr=0.01, amsgrad=True)
    first_b, second_b = list(b.parameters())[:2], list(b.parameters())[2:]
    opt_b = torch.optim.Adam([{"params": first_b, "lr": 0.02}, {"params": second_b}], lr=0.01, amsgrad=True)
    x, y = data[0]
    for model, opt in ((a, opt_a), (b, opt_b)):  # one plain step each: the instances have state
        loss_of(model, x, y).backward()
        opt.step()
        opt.zero_grad()
    optimizer_in_backward(b, opt_b)
    for x, y in data[1:]:
        loss_of(a, x, y).backward()
        opt_a.step()
        opt_a.zero_grad()
        loss_of(b, x, y).backward()
    assert_same(a, b)


def test_a_factory():
    a, b, data = pair("mlp", False)
    opt = torch.optim.AdamW(a.parameters(), lr=0.01, weight_decay=0.2)
    optimizer_in_backward(b, functools.partial(torch.optim.AdamW, lr=0.01, weight_decay=0.2))
    for x, y in data:
        loss_of(a, x, y).backward()
        opt.step()
        opt.zero_grad()
        loss_of(b, x, y).backward()
    assert_same(a, b)


def test_accumulating_micro_batches_steps_once_on_the_sum():
    a, b, data = pair("cnn", True)
    opt = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    handle = optimizer_in_backward(b, torch.optim.SGD, lr=0.1, momentum=0.9)
    for _ in range(2):  # two steps of three micro-batches each
        for i, (x, y) in enumerate(data):
            (loss_of(a, x, y) / 3).backward()
        opt.step()
        opt.zero_grad()
        for i, (x, y) in enumerate(data):
            if i < 2:
                with handle.accumulating():
                    (loss_of(b, x, y) / 3).backward()
                assert all(p.grad is not None for p in b.parameters())
            else:
                (loss_of(b, x, y) / 3).backward()
        assert all(p.grad is None for p in b.parameters())
    assert_same(a, b)


def test_step_flushes_what_accumulating_held():
    a, b, data = pair("mlp", False)
    opt = torch.optim.Adam(a.parameters(), lr=0.01)
    handle = optimizer_in_backward(b, torch.optim.Adam, lr=0.01)
    for x, y in data:
        loss_of(a, x, y).backward()
    opt.step()
    with handle.accumulating():
        for x, y in data:
            loss_of(b, x, y).backward()
    handle.step()
    assert all(p.grad is None for p in b.parameters())
    assert_same(a, b)


def test_state_dict_round_trip():
    a, b, data = pair("mlp", False)
    handle_a = optimizer_in_backward(a, torch.optim.Adam, lr=0.01)
    for x, y in data[:2]:
        loss_of(a, x, y).backward()
    b.load_state_dict(a.state_dict())
    handle_b = optimizer_in_backward(b, torch.optim.Adam, lr=0.01)
    handle_b.load_state_dict(copy.deepcopy(handle_a.state_dict()))  # torch's load shares tensors
    x, y = data[2]
    loss_of(a, x, y).backward()
    loss_of(b, x, y).backward()
    assert_same(a, b)
    with pytest.raises(ValueError, match="optimizers"):
        handle_b.load_state_dict({"optimizers": []})


def test_remove_restores_plain_backward():
    model = mlp()
    handle = optimizer_in_backward(model, torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="another handle"):
        optimizer_in_backward(model[0], torch.optim.SGD, lr=0.1)
    handle.remove()
    assert handle.removed
    optimizer_in_backward(model, torch.optim.SGD, lr=0.1).remove()  # free again
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 8, dtype=torch.float64)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_frozen_parameters_are_left_alone():
    model = mlp()
    model[0].requires_grad_(False)
    handle = optimizer_in_backward(model, torch.optim.SGD, lr=0.1)
    assert len(handle.params) == 4
    model(torch.randn(4, 8, dtype=torch.float64)).sum().backward()


def test_what_cannot_be_exact_is_refused_by_name():
    model = mlp()
    with pytest.raises(ValueError, match="clipping"):
        optimizer_in_backward(model, torch.optim.SGD, lr=0.1, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="closure"):
        optimizer_in_backward(model, torch.optim.LBFGS)
    from actcomp.optim import HyLo

    with pytest.raises(ValueError, match="second-order"):
        optimizer_in_backward(model, HyLo)
    with pytest.raises(TypeError, match="torch.optim.AdamW"):
        optimizer_in_backward(model, torch.optim.SparseAdam)

    class MySGD(torch.optim.SGD):
        pass

    with pytest.raises(TypeError, match="supports exactly"):
        optimizer_in_backward(model, MySGD, lr=0.1)
    with pytest.raises(TypeError, match="supports exactly"):
        optimizer_in_backward(model, lambda groups: MySGD(groups, lr=0.1))
    assert torch.optim.SGD in EXACT_OPTIMIZERS


def _round_state_to(optimizer: torch.optim.Optimizer, dtype: torch.dtype) -> None:
    """The reference for state_dtype: after each plain step, every moment rounded to dtype."""
    for p, state in optimizer.state.items():
        for value in state.values():
            if torch.is_tensor(value) and value.shape == p.shape and value.is_floating_point():
                value.copy_(value.to(dtype))


@pytest.mark.parametrize("cls,settings", [
    (torch.optim.Adam, dict(lr=1e-2)),
    (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
], ids=["Adam", "AdamW-amsgrad", "SGD-momentum"])
def test_state_in_bfloat16_is_the_plain_loop_with_rounded_state(cls, settings):
    a, b, data = pair("cnn", False)
    opt = cls(a.parameters(), **settings)
    handle = optimizer_in_backward(b, cls, state_dtype=torch.bfloat16, **settings)
    for x, y in data:
        loss_of(a, x, y).backward()
        opt.step()
        opt.zero_grad()
        _round_state_to(opt, torch.bfloat16)
        loss_of(b, x, y).backward()
    assert_same(a, b, tol=0.0)
    for p in b.parameters():
        moments = [v for v in handle.optimizers[p].state[p].values() if torch.is_tensor(v) and v.shape == p.shape]
        assert moments and all(v.dtype == torch.bfloat16 for v in moments)


def test_state_in_bfloat16_halves_adam_state_and_survives_state_dict():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))  # float32 weights
    handle = optimizer_in_backward(model, torch.optim.Adam, lr=1e-3, state_dtype=torch.bfloat16)
    F.cross_entropy(model(torch.randn(4, 64)), torch.randint(0, 5, (4,))).backward()

    def moment_bytes(h):
        return sum(v.numel() * v.element_size() for p in h.params for v in h.optimizers[p].state[p].values() if v.shape == p.shape)

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert moment_bytes(handle) == weights  # two moments of 2 bytes per 4-byte weight
    handle.load_state_dict(copy.deepcopy(handle.state_dict()))  # torch casts up on load: stored down again
    assert moment_bytes(handle) == weights
    with pytest.raises(ValueError, match="floating-point"):
        optimizer_in_backward(nn.Linear(2, 2), torch.optim.Adam, state_dtype=torch.int8)


CHUNKED = SETTINGS + [(torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cls,settings", CHUNKED, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(CHUNKED)])
def test_updates_in_slices_equal_whole_updates_bit_for_bit(cls, settings, dtype):
    """chunk_size=7 splits every tensor of the mlp at odd offsets (16x8 = 128 -> 19 slices);
    the weights and the state equal the whole-tensor updates exactly (tolerance 0)."""
    a, b, data = pair("mlp", False)
    a, b = a.to(dtype), b.to(dtype)
    whole = optimizer_in_backward(a, cls, chunk_size=None, **settings)
    sliced = optimizer_in_backward(b, cls, chunk_size=7, **settings)
    for x, y in data + data:  # the first update creates the state whole; the later ones slice
        loss_of(a, x.to(dtype), y).backward()
        loss_of(b, x.to(dtype), y).backward()
    assert_same(a, b, tol=0.0)
    for p, q in zip(whole.params, sliced.params):
        for key, value in whole.optimizers[p].state[p].items():
            other = sliced.optimizers[q].state[q][key]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), key


def test_slices_with_state_in_bfloat16_equal_whole_updates():
    a, b, data = pair("mlp", False)
    whole = optimizer_in_backward(a, torch.optim.Adam, chunk_size=None, state_dtype=torch.bfloat16, lr=1e-2)
    optimizer_in_backward(b, torch.optim.Adam, chunk_size=5, state_dtype=torch.bfloat16, lr=1e-2)
    for x, y in data + data:
        loss_of(a, x, y).backward()
        loss_of(b, x, y).backward()
    assert_same(a, b, tol=0.0)
    assert all(v.dtype == torch.bfloat16 for p in whole.params for v in whole.optimizers[p].state[p].values() if v.shape == p.shape)


def test_a_lr_change_reaches_the_slices():
    a, b, data = pair("mlp", False)
    whole = optimizer_in_backward(a, torch.optim.Adam, chunk_size=None, lr=1e-2)
    sliced = optimizer_in_backward(b, torch.optim.Adam, chunk_size=3, lr=1e-2)
    for i, (x, y) in enumerate(data + data):
        for handle in (whole, sliced):
            for group in handle.param_groups:
                group["lr"] = 1e-2 / (i + 1)
        loss_of(a, x, y).backward()
        loss_of(b, x, y).backward()
    assert_same(a, b, tol=0.0)


def _update_peak(chunk_size):
    """Allocator peak (CPU profiler) of one Adam update of a 1024x1024 weight in backward, after
    the update that created the state, above the gradient itself."""
    from actcomp.memory.measure import _peak_of

    layer = nn.Linear(1024, 1024, bias=False)
    handle = optimizer_in_backward(layer, torch.optim.Adam, lr=1e-3, chunk_size=chunk_size)
    x = torch.randn(1, 1024)
    layer(x).sum().backward()  # creates the state
    out = layer(x).sum()
    peak, _ = _peak_of(out.backward, torch.device("cpu"))
    assert handle.optimizers[layer.weight].state[layer.weight]["step"] == 2
    return peak


def test_slices_bound_the_update_temporaries():
    """Adam's update allocates sqrt(v) and a quotient of the parameter's size: whole, the peak
    above the 4 MiB gradient is at least 2 x 4 MiB; in slices of 2**16 elements (256 KiB) it
    stays under 1 MiB above the gradient."""
    grad = 1024 * 1024 * 4
    whole, sliced = _update_peak(None), _update_peak(2**16)
    assert whole >= grad + 2 * grad
    assert sliced <= grad + 2**20
    with pytest.raises(ValueError, match="chunk_size"):
        optimizer_in_backward(nn.Linear(2, 2), torch.optim.Adam, chunk_size=0)
