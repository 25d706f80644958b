"""Neighbour policies: what BatchNorm, LayerNorm / RMSNorm, activations, pooling and dropout keep
for backward.

The registry and :class:`Neighbours` live in :mod:`actcomp.policies.base`; importing this
package registers the built-in policies (one file per module family).
"""

from actcomp.policies.base import (
    ACTIVATION_POLICIES,
    BATCHNORM_POLICIES,
    NORM_POLICIES,
    NeighbourRegistration,
    NeighbourState,
    Neighbours,
    factor_config,
    neighbour_handler,
    neighbour_registration,
    register_neighbour,
    registered_neighbours,
    tradeable_neighbour,
)
from actcomp.policies import relu, pool, dropout, batchnorm, smooth, norm  # noqa: F401,E402  (register)

__all__ = [
    "ACTIVATION_POLICIES",
    "BATCHNORM_POLICIES",
    "NORM_POLICIES",
    "NeighbourRegistration",
    "NeighbourState",
    "Neighbours",
    "factor_config",
    "neighbour_handler",
    "neighbour_registration",
    "register_neighbour",
    "registered_neighbours",
    "tradeable_neighbour",
]
