"""Micro-batching with size-weighted accumulation gives the full batch's gradient, in float64."""

import warnings
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actcomp
from actcomp.levers import (
    freeze_batchnorm,
    microbatch_step,
    optimizer_in_backward,
    split_batch,
)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5)).double()


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
    ).double()


def classify(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def grads(model):
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return out


def assert_grads_equal(a, b, tol=1e-12):
    for g, h in zip(a, b):
        torch.testing.assert_close(g, h, rtol=tol, atol=tol)


def test_split_batch_shapes():
    x, y = torch.randn(10, 3), torch.arange(10)
    parts = split_batch((x, y, "tag", torch.tensor(2.0)), 3)
    assert [p[0].shape[0] for p in parts] == [3, 3, 4]
    assert torch.equal(torch.cat([p[1] for p in parts]), y)
    assert all(p[2] == "tag" and p[3].ndim == 0 for p in parts)
    parts = split_batch({"input_ids": y.view(10, 1), "mask": {"m": y}, "n": 3}, 4)
    assert [p["input_ids"].shape[0] for p in parts] == [2, 3, 2, 3]
    assert all(p["n"] == 3 and p["mask"]["m"].shape[0] == p["input_ids"].shape[0] for p in parts)
    Pair = namedtuple("Pair", "x y")
    assert isinstance(split_batch(Pair(x, y), 2)[0], Pair)
    assert len(split_batch(x, 10)) == 10
    with pytest.raises(ValueError, match="between 1 and the batch size"):
        split_batch(x, 11)
    with pytest.raises(ValueError, match="different sizes"):
        split_batch((x, torch.arange(9)), 2)
    with pytest.raises(ValueError, match="no tensor"):
        split_batch(("a", 1), 2)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 10])
def test_mlp_gradient_equals_the_full_batch(k):
    model = mlp()
    x, y = torch.randn(10, 8, dtype=torch.float64), torch.randint(0, 5, (10,))
    full_loss = classify(model, (x, y))
    full_loss.backward()
    full = grads(model)
    loss = microbatch_step(model, classify, (x, y), k)
    assert_grads_equal(grads(model), full)
    torch.testing.assert_close(loss, full_loss.detach(), rtol=1e-12, atol=1e-12)


def test_dict_batch_hugging_face_style():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = mlp()

        def forward(self, input, labels):
            return F.cross_entropy(self.body(input), labels)

    model = Model()
    batch = {"input": torch.randn(7, 8, dtype=torch.float64), "labels": torch.randint(0, 5, (7,))}
    model(**batch).backward()
    full = grads(model)
    microbatch_step(model, lambda m, b: m(**b), batch, 3)
    assert_grads_equal(grads(model), full)


def test_token_mean_loss_with_weight_fn():
    """A loss averaged over the non-padding tokens of the chunk: weight chunks by their tokens."""
    emb = nn.Linear(4, 6).double()
    x = torch.randn(9, 5, 4, dtype=torch.float64)
    target = torch.randint(0, 6, (9, 5))
    target[torch.rand(9, 5) < 0.4] = -100  # padding, ignored

    def loss_fn(m, b):
        return F.cross_entropy(m(b[0]).flatten(0, 1), b[1].flatten(), ignore_index=-100)

    loss_fn(emb, (x, target)).backward()
    full = grads(emb)
    microbatch_step(emb, loss_fn, (x, target), 4, weight_fn=lambda b: (b[1] != -100).sum())
    assert_grads_equal(grads(emb), full)
    microbatch_step(emb, loss_fn, (x, target), 4)  # weighted by samples: another average
    assert max((g - h).abs().max() for g, h in zip(grads(emb), full)) > 1e-6


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "hosvd1"])
def test_frozen_batchnorm_is_exact(compress):
    model = cnn()
    for m in model.modules():  # running statistics of a pretrained network, not 0 / 1
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x, y = torch.randn(10, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (10,))
    with freeze_batchnorm(model):
        classify(model, (x, y)).backward()
    full = grads(model)
    if compress:
        actcomp.compress(model, eps=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with freeze_batchnorm(model):
            assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
            microbatch_step(model, classify, (x, y), 3)
    assert all(m.training for m in model.modules())  # modes restored
    assert_grads_equal(grads(model), full, tol=1e-9 if compress else 1e-12)


def test_training_batchnorm_warns_once_and_differs():
    model = cnn()
    x, y = torch.randn(8, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (8,))
    classify(model, (x, y)).backward()
    full = grads(model)
    with pytest.warns(UserWarning, match="freeze_batchnorm"):
        microbatch_step(model, classify, (x, y), 2)
    assert max((g - h).abs().max() for g, h in zip(grads(model), full)) > 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        microbatch_step(model, classify, (x, y), 2)  # warned once per model
        microbatch_step(cnn(), classify, (x, y), 1)  # one chunk: the full batch


def test_with_the_step_in_backward_equals_the_plain_full_batch_loop():
    a, b = cnn(), cnn()
    b.load_state_dict(a.state_dict())
    actcomp.compress(b, eps=1.0)
    opt = torch.optim.Adam(a.parameters(), lr=0.01)
    handle = optimizer_in_backward(b, torch.optim.Adam, lr=0.01)
    for _ in range(3):
        x, y = torch.randn(9, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (9,))
        with freeze_batchnorm(a):
            classify(a, (x, y)).backward()
        opt.step()
        opt.zero_grad()
        with freeze_batchnorm(b):
            microbatch_step(b, classify, (x, y), 3, in_backward=handle)
        assert all(p.grad is None for p in b.parameters())
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-9)
