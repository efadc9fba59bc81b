"""Reverse-mode autodiff of a function, from the libraries that have it: torch and JAX.

A public cell may leave out ``step_backward``; its backward is then the
vector-Jacobian product of its ``step`` computed here, by ``torch.func.vjp``
or ``jax.vjp``. This is the only module that asks which library can
differentiate; NumPy, CuPy, Dask and array-api-strict cannot.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from array_api_compat import is_jax_namespace, is_torch_namespace


def available(xp: ModuleType) -> bool:
    """Whether `vjp` can differentiate functions of ``xp``'s arrays."""
    return is_jax_namespace(xp) or is_torch_namespace(xp)


def vjp(xp: ModuleType, fn: Callable, primals: tuple, cotangent: Any) -> tuple:
    """The gradients of ``fn`` at ``primals`` (pytrees of arrays) against ``cotangent``.

    Returns one pytree per primal, shaped like it.
    """
    if is_jax_namespace(xp):
        import jax

        _, pullback = jax.vjp(fn, *primals)
    elif is_torch_namespace(xp):
        import torch.func

        _, pullback = torch.func.vjp(fn, *primals)
    else:  # `available` is checked before any work
        raise TypeError(f"{xp.__name__} has no automatic differentiation")
    return tuple(pullback(cotangent))
