"""Compression methods: one file per method, each registering a :class:`Compressor` subclass.

The registry and the base class live in :mod:`actcomp.methods.base`; importing this package
imports every built-in method once (their registration order is the documentation order).
"""

from actcomp.methods.base import Compressor, InputLayout, method_class, method_names, register_method
from actcomp.methods import hosvd, asi, oneshot, svd, syncfree, gradient_filter, none, hosvd_unbiased, svd_unbiased  # noqa: F401,E402  (register)

__all__ = ["Compressor", "InputLayout", "method_class", "method_names", "register_method"]
