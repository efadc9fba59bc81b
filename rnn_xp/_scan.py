"""The time loop every cell kind shares: hoisted projections, masks, both directions.

A cell kind supplies only its step (`Cell.step`) and the step's backward
(`Cell.step_backward`); this module does the rest, once for all of them:

* the input projection ``xs @ Wx + bx`` of all N*T rows is one matrix product
  before the loop, so only ``h @ Wh`` and the elementwise update stay inside it;
* after the backward loop, ``dxs``, ``dWx``, ``dWh`` and the bias gradients are
  each one matrix product or sum over all N*T rows;
* a boolean mask of shape (N, T) carries the state through masked steps
  unchanged and outputs zeros there (Keras' meaning); right-padded lengths are
  the special case ``mask[n, t] = t < lengths[n]``, for which running a reverse
  direction over the padded sequence starts each sequence at its own last step;
* ``reverse=True`` runs the steps from the last to the first.

Nothing is written in place: steps are collected in lists and stacked.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, NamedTuple, Protocol

from . import _checks
from ._backends import zeros_like

Array = Any
State = tuple[Array, ...]


class Cell(Protocol):
    """One cell kind: how many H-wide gate blocks it has and how one step runs."""

    gates: int  # Wx has gates * H columns
    n_states: int  # 1 for (h,), 2 for (h, c)

    def step(
        self, xp: ModuleType, ax: Array, state: State, Wh: Array, bh: Array | None
    ) -> tuple[State, Any]:
        """New state from ``ax`` (this step's row of ``xs @ Wx + bx``) and the old one.

        Returns the new state, whose first entry is the output h, and whatever
        `step_backward` needs.
        """

    def step_backward(
        self, xp: ModuleType, dstate: State, saved: Any, Wh: Array
    ) -> tuple[State, Array, Array]:
        """Gradient of one step: ``(dstate_prev, dax, dah)``.

        ``dax`` is the gradient with respect to ``ax``; ``dah`` with respect to
        ``h_prev @ Wh + bh``, from which the caller gets ``dWh`` and ``dbh``.
        """


class Tape(NamedTuple):
    """What `backward` needs from `forward`; opaque to callers."""

    xs: Array
    Wx: Array
    Wh: Array
    bx: Array | None
    bh: Array | None
    saved: list
    h_prev: list  # the h of the state each step started from
    mask: Array | None  # bool, (N, T, 1)
    reverse: bool


def _bias_over_time(xp: ModuleType, b: Array) -> Array:
    # b broadcasts to (N, G); over (N, T, G) a 2-D bias needs its time axis.
    return xp.expand_dims(b, axis=-2) if b.ndim == 2 else b


def forward(
    xp: ModuleType,
    cell: Cell,
    xs: Array,
    Wx: Array,
    Wh: Array,
    bx: Array | None,
    bh: Array | None,
    state0: State,
    mask: Array | None = None,
    reverse: bool = False,
) -> tuple[Array, State, Tape]:
    """Run ``cell`` over ``xs`` (N, T, D) from ``state0``; return ``(outs, state_n, tape)``.

    Inputs are already validated and cast; ``mask`` is bool (N, T) or None.
    """
    N, T, D = xs.shape
    ax = xp.reshape(xp.reshape(xs, (N * T, D)) @ Wx, (N, T, Wx.shape[1]))
    if bx is not None:
        ax = ax + _bias_over_time(xp, bx)
    mask3 = None if mask is None else xp.expand_dims(mask, axis=-1)
    no_output = None if mask is None else zeros_like(xp, state0[0])

    state = state0
    outs, saved, h_prev = [None] * T, [None] * T, [None] * T
    for t in reversed(range(T)) if reverse else range(T):
        new, saved[t] = cell.step(xp, ax[:, t, :], state, Wh, bh)
        h_prev[t] = state[0]
        if mask3 is None:
            state, outs[t] = new, new[0]
        else:
            m = mask3[:, t, :]
            state = tuple(xp.where(m, a, b) for a, b in zip(new, state))
            outs[t] = xp.where(m, new[0], no_output)
    tape = Tape(xs, Wx, Wh, bx, bh, saved, h_prev, mask3, reverse)
    return xp.stack(outs, axis=1), state, tape


def backward(
    xp: ModuleType, cell: Cell, tape: Tape, douts: Array, dstate_n: State
) -> tuple[Array, State, Array, Array, Array | None, Array | None]:
    """Gradients of `forward`: ``(dxs, dstate0, dWx, dWh, dbx, dbh)``.

    ``douts`` (N, T, H) is the gradient with respect to the outputs and
    ``dstate_n`` with respect to the final state, None entries meaning zero.
    """
    xs, Wx, Wh, bx, bh, saved, h_prev, mask3, reverse = tape
    N, T, D = xs.shape
    zero = zeros_like(xp, douts[:, 0, :])
    dstate = tuple(zero if d is None else d for d in dstate_n)
    no_grad = None if mask3 is None else zero

    dax, dah = [None] * T, [None] * T
    for t in range(T) if reverse else reversed(range(T)):
        dnew = (douts[:, t, :] + dstate[0], *dstate[1:])
        if mask3 is None:
            dstate, dax[t], dah[t] = cell.step_backward(xp, dnew, saved[t], Wh)
        else:
            m = mask3[:, t, :]
            dstep = tuple(xp.where(m, d, no_grad) for d in dnew)
            dprev, dax[t], dah[t] = cell.step_backward(xp, dstep, saved[t], Wh)
            # A masked step passed the state through (and output a constant
            # zero): the state's gradient passes back through it unchanged.
            dstate = tuple(p + xp.where(m, no_grad, d) for p, d in zip(dprev, dstate))

    G = Wx.shape[1]
    dax3 = xp.stack(dax, axis=1)
    dax2 = xp.reshape(dax3, (N * T, G))
    dah3 = xp.stack(dah, axis=1)
    dah2 = xp.reshape(dah3, (N * T, G))
    h_prev2 = xp.reshape(xp.stack(h_prev, axis=1), (N * T, Wh.shape[0]))
    dxs = xp.reshape(dax2 @ Wx.T, (N, T, D))
    dWx = xp.reshape(xs, (N * T, D)).T @ dax2
    dWh = h_prev2.T @ dah2
    dbx = None if bx is None else _checks.sum_to_shape(xp, xp.sum(dax3, axis=1), tuple(bx.shape))
    dbh = None if bh is None else _checks.sum_to_shape(xp, xp.sum(dah3, axis=1), tuple(bh.shape))
    return dxs, dstate, dWx, dWh, dbx, dbh
