"""The gates' logistic function, shared by the cells' steps and the fast paths.

A leaf module: the cells (through `rnn_xp._layer`) and `rnn_xp._fused_jax`
both use it, and it imports nothing of the package, so neither import makes a
cycle through the loops.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

Array = Any


def tanh_sigmoid(xp: ModuleType, a: Array) -> Array:
    """The logistic function through tanh, which cannot overflow as exp(-a) can."""
    return 0.5 * (xp.tanh(0.5 * a) + 1)


def sigmoid(xp: ModuleType, a: Array) -> Array:
    """The logistic function: `tanh_sigmoid`, or the namespace's own.

    A fast path's namespace may bring its library's own as ``rnn_xp_sigmoid``
    (`rnn_xp._fused_jax.StepNamespace`: XLA's logistic, faster in its scans).
    """
    own = getattr(xp, "rnn_xp_sigmoid", None)
    return tanh_sigmoid(xp, a) if own is None else own(a)
