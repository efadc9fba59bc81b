"""Optional fused time loops for particular libraries; the generic loop is the fallback.

This module only dispatches. The loops live in one module per library family:

* `_fused_numpy`: NumPy and CuPy, in-place loops with preallocated buffers,
  forward and backward, without a mask;
* `_fused_torch`: torch, which runs `_fused_numpy`'s loops through its
  NumPy-like adapter `_TorchOps`, while autograd records none of the arrays;
* `_fused_jax`: JAX, one compiled ``lax.scan`` each way, masks included.

The rule for every function here: it either does the whole job or raises
`NotImplementedError` (before any work), and `_scan` then runs its generic
array-API loop. Setting `DISABLED` forces the generic loop everywhere. Under
a precision policy (``xp`` a `_mixed.Namespace`) the fused loops, which call
their library's own product, refuse too; JAX's scan takes the policy. The
test suite runs both paths on every backend and checks that they agree
(``tests/test_fastpath.py``).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from array_api_compat import (
    is_cupy_namespace,
    is_jax_namespace,
    is_numpy_namespace,
    is_torch_namespace,
)

from . import _fused_jax, _fused_numpy, _fused_torch
from ._backends import on_device_of
from ._mixed import Namespace

DISABLED = False
"""Set to True to force the generic loop everywhere (the tests compare both)."""


def _library(xp: ModuleType, *arrays) -> Any:
    """What the fused loops call: the NumPy or CuPy module, or `_fused_torch._TorchOps`.

    NotImplementedError for other libraries, and for torch tensors that
    autograd is recording (in-place writes would cut its graph).
    """
    if DISABLED or isinstance(xp, Namespace):
        raise NotImplementedError
    if is_numpy_namespace(xp):
        import numpy as lib
    elif is_cupy_namespace(xp):
        import cupy as lib
    elif is_torch_namespace(xp):
        return _fused_torch.ops(arrays)
    else:
        raise NotImplementedError
    return lib


def forward_fused(
    xp: ModuleType,
    cell: Any,
    xs,
    Wx,
    bx,
    Wh,
    bh,
    state0,
    mask3,
    reverse: bool,
    keep: bool,
    zero_state: bool,
):
    """``(outs, state_n, saved, h_prev, stacked)`` of one direction, input projection included.

    NumPy, CuPy and torch (not recorded by autograd), without a mask, for the
    cell kinds of `_fused_numpy.KINDS` (on the CPU, torch's own operators where
    they express it: `_fused_torch.native_forward`, whose tape is the ``saved``
    returned, and ``h_prev`` None); and JAX on the CPU, masks included,
    any cell kind with a ``step`` (`_fused_jax.forward_projecting`: ``stacked``
    is True, the tape's steps stacked as `forward`'s are). NotImplementedError
    before any work otherwise. ``zero_state`` says that ``state0`` is all zeros, so the
    first step's recurrent product is skipped.
    """
    if not DISABLED and is_jax_namespace(xp) and _fused_jax.projects_per_step(xs):
        outs, state, saved, h_prev = _fused_jax.forward_projecting(
            cell, xs, Wx, bx, Wh, bh, state0, mask3, reverse, keep, getattr(xp, "policy", None)
        )
        return outs, state, saved, h_prev, True
    if mask3 is not None or getattr(cell, "kind", None) not in _fused_numpy.KINDS:
        raise NotImplementedError
    if not DISABLED and is_torch_namespace(xp) and not isinstance(xp, Namespace):
        try:
            outs, state, tape = _fused_torch.native_forward(
                cell, xs, Wx, bx, Wh, bh, state0, reverse, keep
            )
            return outs, state, tape, None, False
        except NotImplementedError:
            pass
    lib = _library(xp, xs, Wx, bx, Wh, bh, *state0)
    with on_device_of(xp, xs):
        outs, state, saved, h_prev = _fused_numpy.forward(
            lib, cell, xs, Wx, bx, Wh, bh, state0, reverse, keep, zero_state
        )
    return outs, state, saved, h_prev, False


def forward(xp: ModuleType, cell: Any, ax, Wh, bh, state0, mask3, reverse: bool, keep: bool):
    """``(outs, state_n, saved, h_prev)`` of one direction from the projection ``ax``.

    JAX only (masks included): one compiled ``lax.scan``; the results are
    stacked, time on the leading axis. NotImplementedError for other libraries.
    """
    if DISABLED or not is_jax_namespace(xp):
        raise NotImplementedError
    policy = getattr(xp, "policy", None)  # the scan builds the policy's namespace itself
    return _fused_jax.forward(cell, ax, Wh, bh, state0, mask3, reverse, keep, policy)


def backward_fused(xp: ModuleType, cell: Any, tape: Any, douts, dstate_n):
    """``(dax3, dah3, dstate0)`` of one direction, time-major (T, N, G), or NotImplementedError.

    The backward of `forward_fused`'s loops (`_fused_numpy.backward`), where
    `_fused_numpy._fused_backward_pays`; the tape may come from the generic
    forward loop too: both save the same. ``dstate_n`` entries may be None (zero).
    """
    if tape.mask is not None or tape.stacked:
        raise NotImplementedError
    if getattr(cell, "kind", None) not in _fused_numpy.KINDS:
        raise NotImplementedError
    # Whether autograd recorded the forward: anything it started from (biases,
    # initial states) shows in the first step's saved arrays.
    t = -1 if tape.reverse else 0
    first = tape.saved[t]
    started = (*(first if isinstance(first, tuple) else (first,)), tape.h_prev[t])
    lib = _library(xp, douts, tape.xs, tape.Wx, tape.Wh, tape.bx, tape.bh, *dstate_n, *started)
    if not _fused_numpy._fused_backward_pays(lib, cell.kind):
        raise NotImplementedError
    with on_device_of(xp, douts):
        return _fused_numpy.backward(lib, cell, tape, douts, dstate_n)


def backward_native(tape: Any, douts, dstate_n):
    """``(dxs, dstate0, dWx, dWh, dbx, dbh)`` of a tape of torch's own operator, by autograd.

    NotImplementedError for every other tape (`_fused_torch.native_backward`).
    """
    if not isinstance(tape.saved, _fused_torch.Native):
        raise NotImplementedError
    return _fused_torch.native_backward(tape.saved, douts, dstate_n)


def input_grads(xp: ModuleType, xs, Wx, dax):
    """``(dxs, dWx)`` from the time-major gate gradients ``dax`` (T, N, G) of `backward_fused`.

    See `_fused_numpy.input_grads`.
    """
    lib = _library(xp, dax)
    with on_device_of(xp, dax):
        return _fused_numpy.input_grads(lib, xs, Wx, dax)


def backward_stacked(xp: ModuleType, cell: Any, tape: Any, douts, dstate, time_major: bool):
    """The backward of the JAX forwards: ``(dax3, dah3, dstate0, h_prev3)``.

    Batch-major (N, T, ...), or time-major (T, N, ...) with ``time_major``.
    """
    policy = getattr(xp, "policy", None)
    return _fused_jax.backward(cell, tape, douts, dstate, policy, time_major)
