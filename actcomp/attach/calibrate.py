"""Calibrating the fixed bases of method ``oneshot`` on a few batches before training."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from actcomp.attach.swap import _input_of, layer_state
from actcomp.core.batch import model_inputs
from actcomp.kernels import base_type, registration_for
from actcomp.linalg.projected import ProjectionState

__all__ = ["calibrate"]


def _feed(model: nn.Module, batch: Any, loss_fn: Any) -> None:
    """Run the model's forward on a batch held as users hold them (see actcomp.core.batch)."""
    if isinstance(batch, Mapping):
        model(**batch)
        return
    inputs = model_inputs(batch, loss_fn)
    model(*inputs) if isinstance(inputs, tuple) else model(inputs)


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any], loss_fn: Any = None) -> dict[str, tuple[int, ...]]:
    """Fixed bases of every ``oneshot`` layer of ``model`` from ``batches`` (before training).

    For a layer whose input X has fixed (non-sample) modes n_1, n_2, ... in the order its steps
    project them, pass j over the batches sums, over the batches b, the Gram matrix of mode n_j
    of X_b x_{n_1} U_1^T ... x_{n_{j-1}} U_{j-1}^T, and U_j is the smallest set of its top
    eigenvectors explaining eps of its trace: the sequentially truncated HOSVD of the batches
    stacked on the batch mode (each basis keeps eps of the energy it truncates, summed over the
    batches). So a convolution needs three forward passes (no backward, under no_grad), a
    Linear one. ``batches`` must be re-iterable (a list, a DataLoader); a batch is fed as
    :func:`actcomp.fit` feeds it (a tensor, a tuple whose last element is the targets when
    ``loss_fn`` is given, or a dict of keyword arguments) in the model's current mode; its
    buffers (BatchNorm's running statistics) and the random number generators are left as they
    were. Layers that see no input calibrate on their first training step, as do BatchNorm
    neighbours' factors. Returns, by layer name, the ranks of the fixed modes in mode order.
    """
    batches = batches if isinstance(batches, (list, tuple)) else list(batches)
    if not batches:
        raise ValueError("calibrate needs at least one batch")
    layers = {}
    for name, module in model.named_modules():
        state = layer_state(module)
        if state is not None and isinstance(state.method_state, ProjectionState):
            registration = registration_for(base_type(module))  # None for a neighbour (BatchNorm)
            if registration is not None and registration.family is not None:
                layers[name] = (module, state, registration.family)
                state.method_state.start_calibration()
    step = 0
    while True:
        active: set[str] = set()
        shapes: dict[str, torch.Size] = {}

        def hook(name: str):
            module, state, family = layers[name]

            def observe(mod: nn.Module, args: tuple, kwargs: dict) -> None:
                nonlocal shapes
                x = _input_of(mod, base_type(mod), state, args, kwargs)
                x, _ = family.batch(mod, x)
                layout = family.layout(family.geometry(mod), x)
                try:
                    if state.method_state.observe(x, state.config.eps, layout.sample_modes, step):
                        active.add(name)
                        shapes[name] = x.shape
                except ValueError as error:
                    raise ValueError(f"{state.describe()}: {error}; calibrate on batches of the training shape") from None

            return observe

        handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, (m, _, _) in layers.items()]
        buffers = [(b, b.clone()) for b in model.buffers()]  # BatchNorm's running statistics stay as they were
        devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
        try:
            with torch.random.fork_rng(devices=devices):  # dropout draws leave the training run's RNG alone
                for batch in batches:
                    _feed(model, batch, loss_fn)
        finally:
            for handle in handles:
                handle.remove()
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for name in active:
            _, state, _ = layers[name]
            state.method_state.finish(state.config.eps, step, shapes[name])
        if not active:
            break
        step += 1
    return {
        name: tuple(s.method_state.bases[n].shape[1] for n in sorted(s.method_state.bases))
        for name, (_, s, _) in layers.items() if s.method_state.bases
    }
