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

The generic loop here writes nothing in place: steps are collected in lists and
stacked. `_fastpath` replaces it, projection included, where a library allows
fused in-place loops, and the generic loop remains the fallback.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, NamedTuple, Protocol

from array_api_compat import device

from . import _checks, _fastpath
from ._backends import zeros, zeros_like

Array = Any
State = tuple[Array, ...]


class Cell(Protocol):
    """One cell kind: how many H-wide gate blocks it has and how one step runs."""

    kind: str  # "elman", "lstm" or "gru": which fused loop `_fastpath` may use
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
    """What `backward` needs from `forward`; opaque to callers.

    ``saved`` and ``h_prev`` are per-step lists, or, when ``stacked``, one
    pytree and one array with time as the leading axis (the JAX fast path).
    """

    xs: Array
    Wx: Array
    Wh: Array
    bx: Array | None
    bh: Array | None
    saved: Any
    h_prev: Any  # the h of the state each step started from
    mask: Array | None  # bool, (N, T, 1)
    reverse: bool
    stacked: bool = False
    widths: tuple[int, ...] = ()  # of each state array, (N, width); one entry per state
    pre: Any = None  # what a generic cell's ``prepare`` kept for its backward


def _bias_over_time(xp: ModuleType, b: Array) -> Array:
    # b broadcasts to (N, G); over (N, T, G) a 2-D bias needs its time axis.
    return xp.expand_dims(b, axis=-2) if b.ndim == 2 else b


def _rows(xp: ModuleType, a: Array) -> Array:
    """(N, T, K) as (N*T, K), the rows of one matrix product (or (T, N, K) as (T*N, K))."""
    N, T, K = a.shape
    if N * T == 0:  # Dask cannot reshape an empty array; an empty one of the shape will do
        return zeros(xp, (0, K), a.dtype, device(a))
    return xp.reshape(a, (N * T, K))


def _unrows(xp: ModuleType, a: Array, N: int, T: int) -> Array:
    """(N*T, K) as (N, T, K): the inverse of `_rows`."""
    if N * T == 0:
        return zeros(xp, (N, T, a.shape[1]), a.dtype, device(a))
    return xp.reshape(a, (N, T, a.shape[1]))


def project(xp: ModuleType, xs: Array, Wx: Array, bx: Array | None) -> Array:
    """``xs @ Wx + bx`` for all N*T rows as one matrix product: (N, T, G)."""
    N, T, _ = xs.shape
    ax = _unrows(xp, xp.matmul(_rows(xp, xs), Wx), N, T)
    return ax if bx is None else ax + _bias_over_time(xp, bx)


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
    keep_tape: bool = True,
    zero_state: bool = False,
) -> tuple[Array, State, Tape | None]:
    """Run ``cell`` over ``xs`` (N, T, D) from ``state0``; return ``(outs, state_n, tape)``.

    Inputs are already validated and cast; ``mask`` is bool (N, T) or None.
    With ``keep_tape=False`` (inference) nothing is kept for `backward` and the
    tape is None. ``zero_state=True`` promises that ``state0`` is all zeros,
    which lets a fast path skip the first step's recurrent product.
    """
    mask3 = None
    if mask is not None:
        mask3 = xp.expand_dims(mask, axis=-1)
        # A masked step is absent, whatever it holds (NaN is a common padding
        # value). It still runs, carrying the state through, so it gets a zero
        # input: anything else would reach the saved gates, and through them
        # every gradient (0 * NaN is NaN), and dWx through xs.T @ dax.
        xs = xp.where(mask3, xs, zeros(xp, (), xs.dtype, device(xs)))
    stacked, pre = False, None
    generic = getattr(cell, "generic", False)  # a `rnn_xp.cells.Cell`: no fused loop
    try:
        if generic:
            raise NotImplementedError
        outs, state, saved, h_prev, stacked = _fastpath.forward_fused(
            xp, cell, xs, Wx, bx, Wh, bh, state0, mask3, reverse, keep_tape, zero_state
        )
    except NotImplementedError:
        ax = project(xp, xs, Wx, bx)
        if generic:  # the cell's own transform of the whole projection
            ax, pre = cell.prepare(xp, ax, Wh, keep_tape)
        try:
            outs, state, saved, h_prev = _fastpath.forward(
                xp, cell, ax, Wh, bh, state0, mask3, reverse, keep_tape
            )
            stacked = True
        except NotImplementedError:
            outs, state, saved, h_prev = _loop(
                xp, cell, ax, Wh, bh, state0, mask3, reverse, keep_tape
            )
    if not keep_tape:
        return outs, state, None
    widths = tuple(s.shape[1] for s in state0)
    tape = Tape(xs, Wx, Wh, bx, bh, saved, h_prev, mask3, reverse, stacked, widths, pre)
    return outs, state, tape


def _loop(xp, cell, ax, Wh, bh, state0, mask3, reverse, keep_tape):
    """The generic forward loop: any namespace, steps collected and stacked."""
    T = ax.shape[1]
    no_output = None if mask3 is None else zeros_like(xp, state0[0])
    state = state0
    outs, saved, h_prev = [None] * T, [None] * T, [None] * T
    for t in reversed(range(T)) if reverse else range(T):
        new, s = cell.step(xp, ax[:, t, :], state, Wh, bh)
        if keep_tape:
            saved[t], h_prev[t] = s, state[0]
        if mask3 is None:
            state, outs[t] = new, new[0]
        else:
            m = mask3[:, t, :]
            state = tuple(xp.where(m, a, b) for a, b in zip(new, state))
            outs[t] = xp.where(m, new[0], no_output)
    return xp.stack(outs, axis=1), state, saved, h_prev


def backward(
    xp: ModuleType, cell: Cell, tape: Tape, douts: Array, dstate_n: State
) -> tuple[Array, State, Array, Array, Array | None, Array | None]:
    """Gradients of `forward`: ``(dxs, dstate0, dWx, dWh, dbx, dbh)``.

    ``douts`` (N, T, H) is the gradient with respect to the outputs and
    ``dstate_n`` with respect to the final state, None entries meaning zero.
    """
    xs, Wx, bx, bh, h_prev = tape.xs, tape.Wx, tape.bx, tape.bh, tape.h_prev
    reduce = reduction_matmul(xp)
    generic = getattr(cell, "generic", False)
    if generic:  # before any work: every backward of a public cell comes through here
        cell.check_backward(xp)
    else:
        try:  # a tape of torch's own operator: autograd through it gives them all
            return _fastpath.backward_native(tape, douts, dstate_n)
        except NotImplementedError:
            pass
    # A zero gradient for each state, (N, width): a generic cell's states may differ in width.
    N = douts.shape[0]
    zero = tuple(zeros(xp, (N, w), douts.dtype, device(douts)) for w in tape.widths)
    # (N, T, G) gate gradients; the fused loops' are (T, N, G), and so are the
    # JAX scan's but for a generic cell, whose own `param_grads` takes (N, T, ...).
    time_major = False
    if tape.stacked:
        dstate = tuple(z if d is None else d for z, d in zip(zero, dstate_n))
        time_major = not generic
        dax3, dah3, dstate, h_prev3 = _fastpath.backward_stacked(
            xp, cell, tape, douts, dstate, time_major
        )
    else:
        try:
            if generic:
                raise NotImplementedError
            dax3, dah3, dstate = _fastpath.backward_fused(xp, cell, tape, douts, dstate_n)
            time_major = True
        except NotImplementedError:
            dax3, dah3, dstate = _backward_loop(xp, cell, tape, douts, dstate_n, zero)
        h_prev3 = None if generic else xp.stack(h_prev, axis=0 if time_major else 1)
    if generic:
        # The cell's own parameter gradients (``dah3``: per step), then those of
        # its input transform, which turn ``dax3`` into the projection's gradient.
        dax3, dparams = cell.param_grads(xp, dax3, dah3, tape)
        dxs = _unrows(xp, xp.matmul(_rows(xp, dax3), Wx.T), xs.shape[0], xs.shape[1])
        dWx = reduce(_rows(xp, xs).T, _rows(xp, dax3))
        dbx = None if bx is None else _sum_over_time(xp, dax3, False, bx)
        return dxs, dstate, dWx, dparams, dbx, None

    # The fused loops' time-major gradients pair with time-major rows of xs
    # and h_prev: those of h_prev are stacked so above, xs's are copied.
    if time_major:
        try:
            dxs, dWx = _fastpath.input_grads(xp, xs, Wx, dax3)
        except NotImplementedError:
            dxs, dWx = _input_grads_time_major(xp, reduce, xs, Wx, dax3)
    else:
        dax2 = _rows(xp, dax3)
        dxs = _unrows(xp, xp.matmul(dax2, Wx.T), xs.shape[0], xs.shape[1])
        dWx = reduce(_rows(xp, xs).T, dax2)
    dWh = reduce(_rows(xp, h_prev3).T, _rows(xp, dah3))
    dbx = None if bx is None else _sum_over_time(xp, dax3, time_major, bx)
    dbh = None if bh is None else _sum_over_time(xp, dah3, time_major, bh)
    return dxs, dstate, dWx, dWh, dbx, dbh


def _input_grads_time_major(xp: ModuleType, reduce: Any, xs: Array, Wx: Array, dax3: Array):
    """``(dxs, dWx)`` from time-major gate gradients ``dax3`` (T, N, G).

    Their rows pair with the time-major rows of ``xs`` (N, T, D): transposing
    ``xs`` and ``dxs``, D wide, costs less than transposing the G-wide ``dax3``.
    """
    T, N, _ = dax3.shape
    dax2 = _rows(xp, dax3)
    dWx = reduce(_rows(xp, xp.permute_dims(xs, (1, 0, 2))).T, dax2)
    dxs = xp.permute_dims(_unrows(xp, xp.matmul(dax2, Wx.T), T, N), (1, 0, 2))
    return dxs, dWx


def reduction_matmul(xp: ModuleType) -> Any:
    """The product that sums the weights' gradients over the N*T rows: float32 under a policy.

    A precision policy (`rnn_xp._mixed.Namespace`) rounds the operands of the
    forward's and the backward's per-row products; the reductions of the
    gradients stay in the computation dtype, so they are the library's own.
    """
    return getattr(xp, "base", xp).matmul


def _sum_over_time(xp: ModuleType, a: Array, time_major: bool, b: Array) -> Array:
    """The gradient of the bias ``b`` from the gate gradients ``a``, (N, T, G) or (T, N, G)."""
    return _checks.sum_to_shape(xp, xp.sum(a, axis=0 if time_major else 1), tuple(b.shape))


def _backward_loop(xp, cell, tape, douts, dstate, zero):
    """The generic backward loop; returns ``(dax3, dah3, dstate0)``."""
    saved, mask3, reverse = tape.saved, tape.mask, tape.reverse
    T = douts.shape[1]
    dax, dah = [None] * T, [None] * T
    # The last step's h gradient is only douts when dh_n was omitted: no zero to add.
    h_given = dstate[0] is not None
    dstate = tuple(z if d is None else d for z, d in zip(zero, dstate))
    for t in range(T) if reverse else reversed(range(T)):
        dnew = (douts[:, t, :] + dstate[0] if h_given else douts[:, t, :], *dstate[1:])
        h_given = True
        if mask3 is None:
            dstate, dax[t], dah[t] = cell.step_backward(xp, dnew, saved[t], tape.Wh)
        else:
            m = mask3[:, t, :]
            dstep = tuple(xp.where(m, d, z) for d, z in zip(dnew, zero))
            dprev, dax[t], dah[t] = cell.step_backward(xp, dstep, saved[t], tape.Wh)
            # A masked step passed the state through (and output a constant
            # zero): the state's gradient passes back through it unchanged.
            dstate = tuple(p + xp.where(m, z, d) for p, d, z in zip(dprev, dstate, zero))
    dax3 = xp.stack(dax, axis=1)
    if getattr(cell, "generic", False):  # per-step parameter gradients: the cell sums them
        return dax3, dah, dstate
    # Elman and LSTM steps return one array as both: stack it once.
    same = all(a is b for a, b in zip(dax, dah))
    return dax3, dax3 if same else xp.stack(dah, axis=1), dstate
