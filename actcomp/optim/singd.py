"""SINGD whose activation factor comes from the compressed layers' factors (needs ``singd``).

Stock ``singd.SINGD`` installs a forward hook on every Linear/Conv2d layer that, on the steps
where the preconditioner is updated (every T), keeps the layer's input in a closure on the
output's gradient hook until backward, to form H_K = K^T A K with A = a^T a from the processed
input a. On a compressed layer that keeps the full input alive next to its factors and undoes
the compression. :class:`SINGD` is the stock optimizer (same constructor, structures, update,
state_dict) except where its statistics come from: on a compressed layer with a trained
weight, inside the layer's backward, from a thin root Z of A built from the input's factors
(:func:`actcomp.optim.roots.kfac_root`), H_K = K^T Z Z^T K; the output-gradient side is
stock. Layers that run plain autograd (not compressed, inside ``actcomp.suspended``, frozen
weight) get the stock hook.
"""

from __future__ import annotations

from math import sqrt
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

from actcomp.kernels.base import second_order_family
from actcomp.optim.capture import LayerTap
from actcomp.optim.roots import kfac_root
from actcomp.core.state import BackwardRecord

try:
    from singd.optim.optimizer import SINGD as _StockSINGD
    from singd.optim.utils import process_grad_output
except ImportError as error:  # pragma: no cover - exercised by a test that hides singd
    raise ImportError(
        "actcomp.optim.SINGD needs the singd package: pip install 'actcomp[singd]' (or pip install singd)"
    ) from error


# the optimizer attributes holding one structured matrix per layer name
_MATRIX_ATTRIBUTES = ("Ks", "Cs", "m_Ks", "m_Cs", "H_Ks", "H_Cs")


def matrix_data(matrix: Any) -> dict[str, Any]:
    """A singd structured matrix as plain data: its class name and its tensors in the order
    its constructor takes them (every structure singd.SINGD supports registers them so)."""
    return {"structure": type(matrix).__name__, "tensors": [t for _, t in matrix.named_tensors()]}


def matrix_from_data(data: Any) -> Any:
    """The structured matrix :func:`matrix_data` describes (a matrix object passes through)."""
    if not isinstance(data, dict):
        return data
    classes = {cls.__name__: cls for cls in _StockSINGD.SUPPORTED_STRUCTURES.values()}
    if data["structure"] not in classes:
        raise ValueError(f"SINGD state holds an unknown structure {data['structure']!r}; known: {', '.join(sorted(classes))}")
    return classes[data["structure"]](*data["tensors"])


class SINGD(_StockSINGD):
    """``singd.SINGD`` fed from actcomp's factors on compressed layers (no input kept).

    Same constructor and keyword arguments as ``singd.SINGD`` (``model``, ``params``, ``lr``,
    ``momentum``, ``damping``, ``alpha1``, ``weight_decay``, ``T``, ``loss_average``,
    ``lr_cov``, ``structures``, ``kfac_approx``, ...), same preconditioner structures and
    update. On a compressed layer whose weight is trained, H_K += K^T Z Z^T K where Z Z^T =
    [a, 1]^T [a, 1] / n is computed from the Tucker or LowRank factors in the layer's backward
    (exactly the stock A of the reconstructed input); H_C is stock's, from dY. ``hook_handles``
    are :class:`~actcomp.optim.capture.LayerTap` objects; :meth:`remove_hooks` detaches them.
    """

    def _install_hooks(self, model: nn.Module) -> tuple[dict[nn.Module, str], list[LayerTap]]:
        """The stock choice of layers, each served by a tap: factors when it runs compressed,
        the stock forward hook otherwise."""
        module_names, handles = super()._install_hooks(model)
        for handle in handles:
            handle.remove()
        taps = [
            LayerTap(module, self._accumulate_from_factors, self._register_tensor_hook_on_output_to_accumulate_H_terms)
            for module in module_names
        ]
        return module_names, taps

    def state_dict(self) -> dict[str, Any]:
        """The stock state with every structured matrix as plain data (class name and
        tensors), so that a checkpoint loads with ``torch.load(..., weights_only=True)``."""
        data = super().state_dict()
        for key in _MATRIX_ATTRIBUTES:
            data[key] = {name: matrix_data(m) for name, m in data[key].items()}
        return data

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` gave (or a stock singd state dict); the given dict
        is left as it is."""
        state_dict = dict(state_dict)
        for key in _MATRIX_ATTRIBUTES:
            if key in state_dict:
                state_dict[key] = {name: matrix_from_data(m) for name, m in state_dict[key].items()}
        super().load_state_dict(state_dict)

    def remove_hooks(self) -> None:
        """Detach every hook and observer this optimizer installed on the model."""
        for tap in self.hook_handles:
            tap.remove()
        self.hook_handles = []

    def _accumulate_from_factors(self, module: nn.Module, record: BackwardRecord) -> None:
        """Observer: on a preconditioner-update step, H_K from the thin root of the factors
        and H_C from dY, accumulated as the stock hook accumulates them."""
        if self.steps % self._get_param_group_entry(module, "T") != 0:
            return
        kfac_approx = self._get_param_group_entry(module, "kfac_approx")
        loss_average = self._get_param_group_entry(module, "loss_average")
        (dtype_k, dtype_c), _ = self._get_preconditioner_dtypes_and_device(module)
        family = second_order_family(module, self.module_names[module])  # the registry's, or TypeError naming the layer
        try:
            root = kfac_root(
                family, record.factors.to(dtype_k), record.geometry, record.weight_shape,
                module.bias is not None, kfac_approx,
            )
        except TypeError as error:
            raise TypeError(f"SINGD, {record.state.describe()}: {error}") from None
        grad = process_grad_output(record.grad_out.detach().to(dtype_c), module, loss_average, kfac_approx)
        self._accumulate_roots(module, root, grad)

    def _accumulate_roots(self, module: nn.Module, root: Tensor, grad: Tensor) -> None:
        """H_K += structure(K^T Z Z^T K), H_C += structure(C^T g^T g C) for a layer, with the
        stock's gradient-scale handling and all-reduce."""
        name = self.module_names[module]
        h_k = self.Ks[name].from_inner(X=root)
        previous_scale = self._get_grad_scale(self.steps - 1)
        if previous_scale != 1.0:
            grad = grad / sqrt(previous_scale)
        h_c = self.Cs[name].from_inner(X=grad.T)
        if dist.is_initialized():
            op = dist.ReduceOp.AVG if self._get_param_group_entry(module, "loss_average") else dist.ReduceOp.SUM
            h_k.all_reduce(op=op)
            h_c.all_reduce(op=op)
        self.H_Ks[name] = self.H_Ks[name].add_(h_k) if name in self.H_Ks else h_k
        self.H_Cs[name] = self.H_Cs[name].add_(h_c) if name in self.H_Cs else h_c
