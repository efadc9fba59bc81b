"""Mixed precision: each library's matrix product of half-precision operands.

A policy (`rnn_xp.precision.Policy`) changes only the matrix products of the
time loop; everything else, the recurrent state, the gates' elementwise work
and the gradients' reductions, stays float32. The loop and the cells call
``xp.matmul``; under a policy they get a `Namespace`: the library's own
namespace, whose ``matmul`` reads both operands in the policy's format and
returns a float32 product, the way that library really can:

* JAX: ``jnp.matmul`` of bfloat16 or float16 operands with
  ``preferred_element_type=float32``: the products accumulate, and come back,
  in float32;
* torch: ``torch.matmul`` of bfloat16 or float16 tensors (CPU and CUDA), which
  accumulates in float32 and rounds the product to the operands' format, as
  under ``torch.autocast``; rnn_xp widens it back to float32;
* CuPy: ``cupy.matmul`` of float16 arrays (and of bfloat16 ones, where the
  installed CuPy has that dtype), ``cublasGemmEx`` with ``CUBLAS_COMPUTE_32F``,
  the product rounded to the format and widened back;
* NumPy: float16 storage with float32 compute: the operands are rounded to
  float16 and multiplied by the float32 BLAS, since NumPy has no fast
  half-precision product (its float16 ``matmul`` is a loop without BLAS); the
  weights are rounded once, into float32 arrays of float16 values.

A library without the policy's format (NumPy has no bfloat16, nor CuPy before
it gained one; array-api-strict and the array API have no 16-bit float at all;
Dask arrays as a model's own) raises
`PolicyUnsupported` before any work, saying why.

The fused loops of `_fastpath` call their library's product directly, so they
refuse a `Namespace` and the generic loop runs (JAX's compiled scan excepted:
it takes the policy and builds its own `Namespace` inside the trace).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from array_api_compat import (
    is_cupy_namespace,
    is_dask_namespace,
    is_jax_namespace,
    is_numpy_namespace,
    is_torch_namespace,
)

Array = Any


class PolicyUnsupported(TypeError):
    """A library that cannot run a precision policy; the message says why."""


class Namespace:
    """``xp`` with the policy's matrix product; every other name is ``xp``'s own.

    ``__name__`` is ``xp``'s, so `array_api_compat`'s ``is_*_namespace`` still
    tell the library (devices, Dask's rules); `_fastpath` refuses it by type.
    ``base`` is ``xp`` itself, whose product the gradients' reductions use.
    A namespace serves one forward and its backward.
    """

    def __init__(self, xp: ModuleType, policy: Any, matmul: Any, operand: Any) -> None:
        self.base = xp
        self.policy = policy
        self.matmul = matmul
        self.operand = operand  # a weight in the operands' format, once rather than per step
        self.__name__ = xp.__name__

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    def __repr__(self) -> str:
        return f"<{self.base.__name__} under precision {self.policy.name!r}>"


def namespace(xp: ModuleType, policy: Any) -> Namespace:
    """``xp`` under ``policy``; `PolicyUnsupported` if the library cannot run it."""
    fmt, name = policy.operand, xp.__name__.removeprefix("array_api_compat.")
    if is_jax_namespace(xp):
        import jax.numpy as jnp

        half, f32 = getattr(jnp, fmt), jnp.float32

        def matmul(a: Array, b: Array) -> Array:
            return jnp.matmul(a.astype(half), b.astype(half), preferred_element_type=f32)

    elif is_torch_namespace(xp):
        import torch

        half, f32 = getattr(torch, fmt), torch.float32

        def matmul(a: Array, b: Array) -> Array:
            return torch.matmul(a.to(half), b.to(half)).to(f32)

    elif is_numpy_namespace(xp) and fmt == "float16":
        return _numpy_float16(xp, policy)
    elif is_cupy_namespace(xp) and getattr(xp, fmt, None) is not None:
        half, f32 = getattr(xp, fmt), xp.float32

        def matmul(a: Array, b: Array) -> Array:
            return xp.astype(xp.matmul(xp.astype(a, half), xp.astype(b, half)), f32)

    elif is_numpy_namespace(xp) or is_cupy_namespace(xp):
        raise PolicyUnsupported(
            f"precision: {name} has no {fmt} dtype, so it cannot run {policy.name!r}; use "
            f"'16-mixed' (float16) there, or torch or JAX arrays for {fmt}"
        )
    else:
        where = (
            "; for Dask arrays, give the Dask input to a model of the chunks' library, which "
            "runs the policy on each chunk"
            if is_dask_namespace(xp)
            else ""
        )
        raise PolicyUnsupported(
            f"precision: {name} cannot run {policy.name!r}: the policy needs {fmt} matrix "
            f"products, which rnn_xp runs on NumPy (float16), CuPy, torch and JAX{where}"
        )
    _check_output(xp, policy, name)

    def operand(a: Array) -> Array:
        return a if a.dtype == half else xp.astype(a, half)

    return Namespace(xp, policy, matmul, operand)


def _check_output(xp: ModuleType, policy: Any, name: str) -> None:
    if getattr(xp, policy.output, None) is None:
        raise PolicyUnsupported(
            f"output: {name} has no {policy.output} dtype for the policy's outputs; give "
            f"Policy({policy.name!r}, output='float32')"
        )


def _numpy_float16(xp: ModuleType, policy: Any) -> Namespace:
    """NumPy: operands rounded to float16, multiplied by the float32 BLAS.

    A weight is rounded once (`Namespace.operand`): its float32 copy holds
    float16 values, and a product whose operand lies in such a copy (the
    weight, or a view of it such as its transpose) does not round it again.
    The copies are kept alive with the namespace, so no other array can come
    to occupy their memory meanwhile.
    """
    _check_output(xp, policy, "numpy")
    half, f32 = xp.float16, xp.float32
    rounded: dict[int, Array] = {}  # start address -> a float32 copy of float16 values

    def exact(a: Array) -> bool:
        base = a if a.base is None else a.base
        return a.dtype == f32 and rounded.get(_address(base)) is base

    def to_format(a: Array) -> Array:
        return a if exact(a) else xp.astype(xp.astype(a, half), f32)

    def matmul(a: Array, b: Array) -> Array:
        return xp.matmul(to_format(a), to_format(b))

    def operand(a: Array) -> Array:
        if exact(a):
            return a
        r = xp.astype(xp.astype(a, half), f32)
        rounded[_address(r)] = r
        return r

    return Namespace(xp, policy, matmul, operand)


def _address(a: Array) -> int:
    return a.__array_interface__["data"][0]
