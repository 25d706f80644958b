"""actcomp: fine-tune PyTorch models on devices by keeping low-rank factors of activations.

Public API::

    actcomp.compress(model, layers="last:4", method="hosvd", eps=0.8)
    loss.backward()                       # selected layers keep factors, not their inputs
    actcomp.stats(model)                  # ranks and bytes kept per layer
    actcomp.restore(model)                # back to plain autograd

    step = actcomp.fit(model, optimizer, budget="512MiB", batch=(x, y), loss_fn=F.cross_entropy)
    loss = step(x, y)                     # one step within the device budget, exact levers first
"""

from actcomp.linalg import decompose
from actcomp.core.config import CompressionConfig, LayerStats
from actcomp.linalg.decompose import explained_rank, hosvd, truncated_svd
from actcomp.linalg.factors import LowRank, Tucker
from actcomp.attach import compress, compressed_layers, layer_state, restore, stats, suspended
from actcomp.attach.calibrate import calibrate
from actcomp.kernels import LayerFamily, register_kernel, register_layer, supported_types
from actcomp.methods import Compressor, InputLayout, method_names, register_method
from actcomp.policies import Neighbours, NeighbourState
from actcomp.core.state import LayerState
from actcomp.devices import DeviceProfile, list_devices, load_device
from actcomp.memory import MemoryReport, SavedTensors, count_saved, measure
from actcomp.memory.plan import LayerChoice, Plan, plan
from actcomp.memory.error import GradientErrorStats, RunningError, gradient_error_stats, median_layer_bias
from actcomp.memory.fit import EXACT_POLICIES, BudgetExceededError, FitChoice, FitReport, FittedStep, fit
from actcomp.levers import auto_regions, checkpoint_blocks, freeze_batchnorm, microbatch_step, optimizer_in_backward

__version__ = "0.2.0"

__all__ = [
    "BudgetExceededError",
    "EXACT_POLICIES",
    "FitChoice",
    "FitReport",
    "FittedStep",
    "calibrate",
    "checkpoint_blocks",
    "auto_regions",
    "fit",
    "freeze_batchnorm",
    "microbatch_step",
    "optimizer_in_backward",
    "CompressionConfig",
    "Compressor",
    "InputLayout",
    "LayerFamily",
    "LayerState",
    "Neighbours",
    "NeighbourState",
    "layer_state",
    "method_names",
    "register_layer",
    "register_method",
    "suspended",
    "DeviceProfile",
    "LayerChoice",
    "MemoryReport",
    "Plan",
    "list_devices",
    "load_device",
    "measure",
    "plan",
    "GradientErrorStats",
    "RunningError",
    "gradient_error_stats",
    "median_layer_bias",
    "LayerStats",
    "LowRank",
    "SavedTensors",
    "Tucker",
    "compress",
    "compressed_layers",
    "count_saved",
    "decompose",
    "explained_rank",
    "hosvd",
    "register_kernel",
    "restore",
    "stats",
    "supported_types",
    "truncated_svd",
]
