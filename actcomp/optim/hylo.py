"""HyLo: hybrid low-rank natural gradient descent (Mu et al., SC'22), single process.

Per Linear/Conv2d layer, the empirical Fisher of the layer's weights (bias as a last column)
from per-sample gradients approximated by G_j I_j^T (:mod:`actcomp.optim.samples`) is

    F = (1/n) U U^T,   U = [u_1 ... u_n],   u_j = vec(G_j I_j^T),   U^T U = (I I^T) o (G G^T),

and the update direction is (F + lambda I)^-1 vec(V), V = [dW, db] the gradient, by
Sherman-Morrison-Woodbury in the sample space. HyLo keeps r < n samples (r = rank_ratio * n)
chosen by one of two reductions of the n x n kernel K = U^T U:

* KID (kernel interpolative decomposition): samples ordered by ||u_j||^2 = ||I_j||^2 ||G_j||^2
  (largest first), the first r columns of K interpolate the others, K[:, r:] ~ K[:, :r] T
  (least squares), so U ~ U_r [I, T] and F ~ (1/n) U_r W U_r^T with W = I + T T^T;
* KIS (kernel importance sampling): r samples drawn without replacement with probabilities
  p_j = ||I_j||^2 ||G_j||^2 / sum_i ||I_i||^2 ||G_i||^2, and F ~ (1/r) U_S U_S^T.

Both give F ~ (1/m) U_S W U_S^T, so

    (F + lambda I)^-1 vec(V) = (V - U_S (m lambda W^-1 + K_SS)^-1 U_S^T vec(V)) / lambda,

with U_S^T vec(V) = (G_j^T V I_j)_j and U_S c = G_S^T diag(c) I_S: only I_S, G_S and an r x r
matrix are kept. With r = n both equal the exact damped NGD step. ``mode="hybrid"`` uses KID
while the gradient norm changes fast (relative change since the last curvature update above
``switch_threshold``, and at the first update) and KIS otherwise, as the paper motivates
(accurate factorisation in critical phases, cheap sampling in between). The curvature is
refreshed every ``update_freq`` steps; in between the kept samples precondition each new
gradient. On compressed layers I = L R comes from the stored factors in the layer's backward
(B x k + k x D numbers instead of B x D); plain layers use forward hooks, as the reference
code does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from actcomp.kernels.base import LayerFamily, base_type, registration_for, second_order_family
from actcomp.optim.capture import LayerTap
from actcomp.optim.samples import SampleFactors, factor_samples, output_samples
from actcomp.core.state import BackwardRecord

MODES = ("kid", "kis", "hybrid")


def kis_probabilities(samples: SampleFactors, grads: Tensor) -> Tensor:
    """p_j = ||I_j||^2 ||G_j||^2 / sum_i ||I_i||^2 ||G_i||^2: each sample's share of the
    squared norms of the per-sample gradients G_j I_j^T (uniform when all are zero)."""
    weights = samples.squared_norms() * (grads * grads).sum(1)
    total = weights.sum()
    if not torch.isfinite(total) or total <= 0:
        return torch.full_like(weights, 1.0 / weights.numel())
    return weights / total


def hybrid_mode(previous_norm: float | None, norm: float, threshold: float) -> str:
    """HyLo's switch: "kid" while the gradient norm moves fast (relative change since the
    last curvature update above ``threshold``, or no previous norm), "kis" otherwise."""
    if previous_norm is None or previous_norm == 0:
        return "kid"
    return "kid" if abs(norm - previous_norm) / previous_norm > threshold else "kis"


def kis_select(probabilities: Tensor, rank: int, generator: torch.Generator) -> Tensor:
    """``rank`` sample indices drawn without replacement with the given probabilities."""
    index = torch.multinomial(probabilities.detach().double().cpu(), rank, replacement=False, generator=generator)
    return index.to(probabilities.device)


def interpolation_coefficients(kernel: Tensor, rank: int) -> Tensor:
    """T (r x (n-r)) with K[:, r:] ~ K[:, :r] T in least squares: the interpolative
    decomposition of the kernel on its first r columns (pseudo-inverse, so rank-deficient
    kernels are handled)."""
    if rank >= kernel.shape[1]:
        return kernel.new_zeros(rank, 0)
    return torch.linalg.pinv(kernel[:, :rank]) @ kernel[:, rank:]


def spd_inverse(matrix: Tensor) -> Tensor:
    """The inverse of a symmetric positive definite matrix (Cholesky; pseudo-inverse when
    rounding made it indefinite)."""
    matrix = (matrix + matrix.T) / 2
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return torch.cholesky_inverse(factor)
    return torch.linalg.pinv(matrix, hermitian=True)


@dataclass
class Preconditioner:
    """What a layer's updates use until the next curvature update: the kept samples' inputs
    I_S (factored) and output gradients G_S, ``core`` = (m lambda W^-1 + K_SS)^-1, the damping
    lambda it was built with, the reduction used and the kept samples' indices in the batch."""

    samples: SampleFactors
    grads: Tensor
    core: Tensor
    damping: float
    mode: str
    index: Tensor

    @property
    def nbytes(self) -> int:
        return self.samples.nbytes + sum(t.numel() * t.element_size() for t in (self.grads, self.core, self.index))

    def apply(self, v: Tensor) -> Tensor:
        """(F + lambda I)^-1 vec(V) for V (C_out x D): (V - U_S core U_S^T vec(V)) / lambda."""
        projections = (self.grads * self.samples.times_transposed(v)).sum(1)  # G_j^T V I_j
        coefficients = self.core @ projections
        return (v - self.samples.weighted_sum(coefficients.unsqueeze(1) * self.grads)) / self.damping

    def state_dict(self) -> dict[str, Any]:
        return {
            "left": self.samples.left, "right": self.samples.right, "grads": self.grads, "core": self.core,
            "damping": self.damping, "mode": self.mode, "index": self.index,
        }

    @staticmethod
    def from_state_dict(data: dict[str, Any]) -> "Preconditioner":
        return Preconditioner(
            SampleFactors(data["left"], data["right"]), data["grads"], data["core"], data["damping"], data["mode"], data["index"]
        )


def build_preconditioner(
    samples: SampleFactors, grads: Tensor, damping: float, mode: str, rank: int, generator: torch.Generator
) -> Preconditioner:
    """The KID or KIS preconditioner of one layer from its n captured samples (module doc)."""
    n = samples.samples
    rank = max(1, min(rank, n))
    probabilities = kis_probabilities(samples, grads)
    if mode == "kis":
        index = kis_select(probabilities, rank, generator)
        kept, kept_grads = samples.rows(index), grads[index]
        kernel = kept.gram() * (kept_grads @ kept_grads.T)
        core = spd_inverse(kernel + rank * damping * torch.eye(rank, dtype=kernel.dtype, device=kernel.device))
        return Preconditioner(kept, kept_grads, core, damping, mode, index)
    if mode != "kid":
        raise ValueError(f"mode must be 'kid' or 'kis' here, got {mode!r}")
    order = torch.sort(probabilities, descending=True, stable=True).indices
    ordered, ordered_grads = samples.rows(order), grads[order]
    kernel = ordered.gram() * (ordered_grads @ ordered_grads.T)
    t = interpolation_coefficients(kernel, rank)
    eye = torch.eye(rank, dtype=kernel.dtype, device=kernel.device)
    w_inverse = spd_inverse(eye + t @ t.T)
    core = spd_inverse(n * damping * w_inverse + kernel[:rank, :rank])
    index = order[:rank]
    return Preconditioner(ordered.rows(torch.arange(rank, device=order.device)), ordered_grads[:rank], core, damping, mode, index)


@dataclass
class _Captured:
    samples: SampleFactors
    grads: Tensor


class HyLo(torch.optim.Optimizer):
    """Hybrid low-rank natural gradient descent on the Linear and Conv2d layers of ``model``.

    ``params``: the parameters to train (default: every trainable parameter of ``model``);
    the weights (and biases) of Linear/Conv2d layers among them are preconditioned, other
    parameters take plain SGD steps. Each step: d = (F + lambda I)^-1 g on those layers (g on
    the others), d += weight_decay * p, momentum buffer m = momentum * m + d, p -= lr * m.

    ``damping`` (lambda, a number or a function of the step), ``update_freq`` (curvature
    refreshed every that many steps), ``rank_ratio`` (r = max(1, floor(rank_ratio * n))
    samples kept; 1 keeps all: the exact damped NGD step), ``mode`` ("kid", "kis" or
    "hybrid"), ``switch_threshold`` (hybrid: KID when the relative change of the gradient
    norm since the last refresh exceeds it), ``batch_averaged`` (the loss is a mean over the
    batch: G_j = B dY_j), ``seed`` (KIS sampling). :meth:`remove_hooks` detaches the hooks.
    """

    SUPPORTED_MODULES = (nn.Linear, nn.Conv2d)

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[nn.Parameter] | Iterable[dict] | None = None,
        lr: float = 0.01,
        momentum: float = 0.9,
        damping: float | Callable[[int], float] = 1.0,
        weight_decay: float = 0.0,
        update_freq: int = 10,
        rank_ratio: float = 0.25,
        mode: str = "hybrid",
        switch_threshold: float = 0.1,
        batch_averaged: bool = True,
        seed: int = 0,
    ) -> None:
        for value, name in ((lr, "lr"), (momentum, "momentum"), (weight_decay, "weight_decay")):
            if value < 0:
                raise ValueError(f"HyLo: {name} must be non-negative, got {value}")
        if mode not in MODES:
            raise ValueError(f"HyLo: mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not 0 < rank_ratio <= 1:
            raise ValueError(f"HyLo: rank_ratio must be in (0, 1], got {rank_ratio}")
        if update_freq < 1:
            raise ValueError(f"HyLo: update_freq must be at least 1, got {update_freq}")
        if not callable(damping) and damping <= 0:
            raise ValueError(f"HyLo: damping must be positive, got {damping}")
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.damping = damping
        self.update_freq = update_freq
        self.rank_ratio = rank_ratio
        self.mode = mode
        self.switch_threshold = switch_threshold
        self.batch_averaged = batch_averaged
        self.steps = 0
        self.generator = torch.Generator().manual_seed(seed)
        self.last_grad_norm: float | None = None
        self.preconditioners: dict[str, Preconditioner] = {}
        self._captured: dict[str, _Captured] = {}
        trained = {id(p) for group in self.param_groups for p in group["params"]}
        self.module_names: dict[nn.Module, str] = {
            module: name
            for name, module in model.named_modules()
            if isinstance(module, self.SUPPORTED_MODULES) and id(module.weight) in trained
        }
        self.families: dict[nn.Module, LayerFamily] = {
            module: self._family(module, name) for module, name in self.module_names.items()
        }
        self.hook_handles = [LayerTap(module, self._capture_factors, self._capture_plain) for module in self.module_names]

    def _family(self, module: nn.Module, name: str) -> LayerFamily:
        """The registry's family of a managed layer, whose second-order statistics give I and G:
        its own class's, or, for a subclass the registry does not run (it overrides forward and
        runs plain autograd), that of the torch class among :attr:`SUPPORTED_MODULES` it is."""
        as_type = None
        if registration_for(base_type(module)) is None:
            as_type = next(t for t in self.SUPPORTED_MODULES if isinstance(module, t))
        return second_order_family(module, name, as_type)

    def remove_hooks(self) -> None:
        """Detach every hook and observer this optimizer installed on the model."""
        for tap in self.hook_handles:
            tap.remove()
        self.hook_handles = []

    # -- capture: I and G of every managed layer on curvature-update steps ----------------

    def _refresh_due(self) -> bool:
        return self.steps % self.update_freq == 0

    def _capture_factors(self, module: nn.Module, record: BackwardRecord) -> None:
        """Observer: I = L R from the factors, G from dY (no input kept)."""
        if not self._refresh_due():
            return
        try:
            samples = factor_samples(
                self.families[module], record.factors.to(module.weight.dtype), record.geometry, record.weight_shape, module.bias is not None
            )
        except TypeError as error:
            raise TypeError(f"HyLo, {record.state.describe()}: {error}") from None
        grads = output_samples(record.grad_out.detach().to(module.weight.dtype), self.families[module], self.batch_averaged)
        self._captured[self.module_names[module]] = _Captured(samples, grads)

    def _capture_plain(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        """Forward hook of a layer running plain autograd: I from its input now, G from the
        output's gradient in backward."""
        if not (self._refresh_due() and torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad):
            return
        family = self.families[module]
        assert family.second_order is not None
        with torch.no_grad():
            samples = family.second_order.input_samples(inputs[0].detach().to(module.weight.dtype), family.geometry(module), module.weight.shape)
            if module.bias is not None:
                samples = samples.with_ones()
        output.register_hook(partial(self._capture_plain_grad, module, samples))

    def _capture_plain_grad(self, module: nn.Module, samples: SampleFactors, grad: Tensor) -> None:
        grads = output_samples(grad.detach().to(module.weight.dtype), self.families[module], self.batch_averaged)
        self._captured[self.module_names[module]] = _Captured(samples, grads)

    # -- step -----------------------------------------------------------------------------

    def current_damping(self) -> float:
        """lambda at this step."""
        return float(self.damping(self.steps) if callable(self.damping) else self.damping)

    def _gradient(self, module: nn.Module) -> Tensor | None:
        """V = [dW (C_out x rest), db] of a layer (zeros for a bias without gradient)."""
        if module.weight.grad is None:
            return None
        v = module.weight.grad.reshape(module.weight.shape[0], -1)
        if module.bias is not None:
            bias_grad = module.bias.grad if module.bias.grad is not None else torch.zeros_like(module.bias)
            v = torch.cat([v, bias_grad.reshape(-1, 1).to(v.dtype)], dim=1)
        return v

    def _choose_mode(self) -> str:
        if self.mode != "hybrid":
            return self.mode
        squares = [float(g.pow(2).sum()) for m in self.module_names if (g := self._gradient(m)) is not None]
        norm = math.sqrt(sum(squares))
        previous, self.last_grad_norm = self.last_grad_norm, norm
        return hybrid_mode(previous, norm, self.switch_threshold)

    def _refresh(self) -> None:
        damping = self.current_damping()
        if damping <= 0:
            raise ValueError(f"HyLo: damping must be positive, got {damping} at step {self.steps}")
        mode = self._choose_mode()
        for module, name in self.module_names.items():
            captured = self._captured.pop(name, None)
            if captured is None:
                if module.weight.grad is not None:
                    raise RuntimeError(
                        f"HyLo: layer '{name}' ({type(module).__name__}) has a gradient but no curvature was captured at "
                        f"step {self.steps}: run the forward (training mode, gradients on) and backward after "
                        "constructing the optimizer, then step()"
                    )
                continue
            rank = max(1, int(captured.samples.samples * self.rank_ratio))
            self.preconditioners[name] = build_preconditioner(captured.samples, captured.grads, damping, mode, rank, self.generator)
        self._captured.clear()

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Refresh the curvature when due, precondition the layers' gradients, take the
        momentum SGD step on every parameter."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._refresh_due():
            self._refresh()
        directions: dict[int, Tensor] = {}
        for module, name in self.module_names.items():
            v = self._gradient(module)
            preconditioner = self.preconditioners.get(name)
            if v is None or preconditioner is None:
                continue
            d = preconditioner.apply(v.to(preconditioner.core.dtype)).to(v.dtype)
            d_weight = d[:, : module.weight[0].numel()]
            directions[id(module.weight)] = d_weight.reshape(module.weight.shape)
            if module.bias is not None and module.bias.grad is not None:
                directions[id(module.bias)] = d[:, -1].reshape(module.bias.shape)
        for group in self.param_groups:
            for p in group["params"]:
                d = directions.get(id(p), p.grad)
                if d is None:
                    continue
                if group["weight_decay"] != 0:
                    d = d.add(p, alpha=group["weight_decay"])
                if group["momentum"] != 0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = d.clone()
                    else:
                        state["momentum_buffer"].mul_(group["momentum"]).add_(d)
                    d = state["momentum_buffer"]
                p.add_(d, alpha=-group["lr"])
        self.steps += 1
        return loss

    # -- state ----------------------------------------------------------------------------

    def state_bytes(self) -> int:
        """Bytes this optimizer holds: momentum buffers, the kept samples and cores, and any
        samples captured for the next refresh."""
        buffers = sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values() if isinstance(t, Tensor))
        kept = sum(p.nbytes for p in self.preconditioners.values())
        captured = sum(c.samples.nbytes + c.grads.numel() * c.grads.element_size() for c in self._captured.values())
        return buffers + kept + captured

    def state_dict(self) -> dict[str, Any]:
        """The torch optimizer state plus HyLo's: step count, kept preconditioners (by layer
        name), the KIS generator and the last gradient norm."""
        data = super().state_dict()
        data["hylo"] = {
            "steps": self.steps,
            "last_grad_norm": self.last_grad_norm,
            "generator": self.generator.get_state(),
            "preconditioners": {name: p.state_dict() for name, p in self.preconditioners.items()},
        }
        return data

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` gave."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("hylo")
        super().load_state_dict(state_dict)
        self.steps = extra["steps"]
        self.last_grad_norm = extra["last_grad_norm"]
        self.generator.set_state(extra["generator"])
        self.preconditioners = {name: Preconditioner.from_state_dict(p) for name, p in extra["preconditioners"].items()}
