"""actcomp.optim.factory.make_optimizer: one definition of the optimizers built by name, used
by finetune and by the optimizer comparison."""

import pytest
import torch
from torch import nn

import actcomp
from actcomp.optim import HyLo
from actcomp.optim.factory import OPTIMIZER_NAMES, make_optimizer


def model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    net[0].requires_grad_(False)
    return net


def test_names():
    assert OPTIMIZER_NAMES == ("sgd", "momentum", "adam", "singd", "hylo")


@pytest.mark.parametrize("name, cls, momentum", [("sgd", torch.optim.SGD, 0.0), ("momentum", torch.optim.SGD, 0.9), ("adam", torch.optim.Adam, None)])
def test_first_order_settings(name, cls, momentum):
    net = model()
    optimizer = make_optimizer(name, net, 0.05)
    assert type(optimizer) is cls
    (group,) = optimizer.param_groups
    assert group["lr"] == 0.05 and group["weight_decay"] == 0
    assert [id(p) for p in group["params"]] == [id(p) for p in net[2].parameters()]  # trainable ones only
    if momentum is not None:
        assert group["momentum"] == momentum and group["dampening"] == 0 and not group["nesterov"]
    else:
        assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8
    from_params = make_optimizer(name, list(net[2].parameters()), 0.05)
    assert type(from_params) is cls and len(from_params.param_groups[0]["params"]) == 2


def test_hylo_settings():
    net = actcomp.compress(model(), method="hosvd", eps=0.9)
    optimizer = make_optimizer("hylo", net, 0.1)
    assert isinstance(optimizer, HyLo)
    assert (optimizer.update_freq, optimizer.rank_ratio, optimizer.damping, optimizer.mode) == (5, 0.25, 0.1, "hybrid")
    assert optimizer.param_groups[0]["momentum"] == 0.9 and optimizer.param_groups[0]["lr"] == 0.1
    optimizer.remove_hooks()


def test_singd_settings():
    pytest.importorskip("singd")
    optimizer = make_optimizer("singd", actcomp.compress(model(), method="hosvd", eps=0.9), 0.3)
    assert type(optimizer).__name__ == "SINGD"
    optimizer.remove_hooks()


def test_errors_name_the_choices():
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'; one of sgd, momentum, adam, singd, hylo"):
        make_optimizer("rmsprop", model(), 0.1)
    with pytest.raises(ValueError, match="optimizer 'hylo' .* give the model, not its parameters"):
        make_optimizer("hylo", list(model().parameters()), 0.1)


def test_finetune_and_the_comparison_use_the_factory():
    from actcomp.app import finetune, optim_compare

    assert finetune.make_optimizer is make_optimizer and optim_compare.make_optimizer is make_optimizer
    assert finetune.OPTIMIZERS == OPTIMIZER_NAMES
    # the comparison's SGD had momentum 0.9: it is now named "momentum", with the same learning rate
    assert optim_compare.OPTIMIZERS == ("momentum", "adam", "singd", "hylo")
    assert optim_compare.DEFAULT_LR["momentum"] == 0.1
