"""The Elman RNN: cell and time loop, forward and analytic backward (BPTT).

The recurrence, for a batch of N sequences of T steps of D features and a
hidden state of H features::

    h_t = act(h_{t-1} @ Wh + x_t @ Wx + b),    act = tanh (default) or relu

with ``Wx`` of shape (D, H), ``Wh`` of shape (H, H) and ``b`` of any shape that
broadcasts to (N, H), or None for no bias.

The pure functions (`rnn_cell_forward`, `rnn_cell_backward`, `rnn_forward`,
`rnn_backward`) hold no state; `RNN` and `RNNLayer` are the notebook's stateful
classes, thin wrappers over them. Every function infers the array namespace once
from its inputs, computes in the result type of its inputs, and returns arrays of
the caller's library on the caller's device. No array is ever written in place.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from . import _checks, _chunks, _scan
from ._backends import on_input_device, zeros
from ._layer import (
    Layer,
    cast,
    cast_back,
    check_biases,
    check_sequence,
    check_states,
    check_weights,
    result_dtype,
)

Array = Any
"""Any array of a library that array-api-compat supports."""

__all__ = [
    "RNN",
    "RNNLayer",
    "rnn_backward",
    "rnn_cell_backward",
    "rnn_cell_forward",
    "rnn_forward",
]

NONLINEARITIES = ("tanh", "relu")


class ElmanCell:
    """One Elman step and its backward, for `_scan`. ``saved`` is the step's output h."""

    kind = "elman"
    gates = 1
    n_states = 1

    def __init__(self, nonlinearity: str = "tanh") -> None:
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(
                f"nonlinearity: expected one of {', '.join(map(repr, NONLINEARITIES))}, "
                f"got {nonlinearity!r}"
            )
        self.nonlinearity = nonlinearity

    # Equal cells compute the same thing: compiled loops keyed on a cell (the JAX
    # fast path) are then shared between the cells that each call creates.
    def __eq__(self, other: object) -> bool:
        return isinstance(other, ElmanCell) and other.nonlinearity == self.nonlinearity

    def __hash__(self) -> int:
        return hash((ElmanCell, self.nonlinearity))

    def activate(self, xp: ModuleType, a: Array) -> Array:
        if self.nonlinearity == "tanh":
            return xp.tanh(a)
        # relu without a scalar-array maximum (not in every namespace): exact,
        # since (a + |a|) / 2 is a or 0 with no rounding.
        return (a + xp.abs(a)) / 2

    def step(self, xp, ax, state, Wh, bh):
        a = xp.matmul(state[0], Wh) + ax
        h = self.activate(xp, a if bh is None else a + bh)
        return (h,), h

    def step_backward(self, xp, dstate, h, Wh):
        d = dstate[0]
        # tanh' = 1 - h**2, applied as d - d*h*h: no scalar-array operation
        da = d - d * h * h if self.nonlinearity == "tanh" else d * xp.astype(h > 0, h.dtype)
        return (xp.matmul(da, Wh.T),), da, da


# -- the cell ---------------------------------------------------------------


def _check_cell(
    x: Array, h_prev: Array, Wx: Array, Wh: Array, b: Array | None, **more: Array
) -> tuple[ModuleType, Any]:
    xp, dtype, _ = _checks.common(x=x, h_prev=h_prev, Wx=Wx, Wh=Wh, b=b, **more)
    D, H = check_weights(Wx, Wh, 1)
    _checks.check_shape("x", x, [("N", None), ("D", D)], f"to match Wx of shape {(D, H)}")
    N = x.shape[0]
    check_states(N, H, f"to match x {tuple(x.shape)} and Wh {(H, H)}", h_prev=h_prev, **more)
    check_biases(N, H, b=b)
    return xp, dtype


@on_input_device
def rnn_cell_forward(
    x: Array, h_prev: Array, Wx: Array, Wh: Array, b: Array | None, *, nonlinearity: str = "tanh"
) -> Array:
    """One step of the Elman recurrence.

    Parameters
    ----------
    x : array, shape (N, D)
        Input at this step.
    h_prev : array, shape (N, H)
        Hidden state from the previous step.
    Wx : array, shape (D, H)
    Wh : array, shape (H, H)
    b : array, broadcastable to (N, H), or None
    nonlinearity : {'tanh', 'relu'}

    Returns
    -------
    h_next : array, shape (N, H)
        ``act(h_prev @ Wh + x @ Wx + b)``, in the result type of the inputs.
        On NumPy float64 with tanh this is bit for bit
        ``np.tanh(np.dot(h_prev, Wh) + np.dot(x, Wx) + b)``.
    """
    cell = ElmanCell(nonlinearity)
    xp, dtype = _check_cell(x, h_prev, Wx, Wh, b)
    x, h_prev, Wx, Wh, b = cast(xp, dtype, x, h_prev, Wx, Wh, b)
    a = h_prev @ Wh + x @ Wx
    return cell.activate(xp, a if b is None else a + b)


@on_input_device
def rnn_cell_backward(
    dh_next: Array,
    x: Array,
    h_prev: Array,
    h_next: Array,
    Wx: Array,
    Wh: Array,
    b: Array | None,
    *,
    nonlinearity: str = "tanh",
) -> tuple[Array, Array, Array, Array, Array | None]:
    """Gradients of one step, given the gradient with respect to its output.

    Parameters
    ----------
    dh_next : array, shape (N, H)
        Gradient of the loss with respect to ``h_next``.
    x, h_prev, Wx, Wh, b, nonlinearity :
        The inputs of `rnn_cell_forward`.
    h_next : array, shape (N, H)
        Its output.

    Returns
    -------
    dx : array, shape (N, D)
    dh_prev : array, shape (N, H)
    dWx : array, shape (D, H)
    dWh : array, shape (H, H)
    db : array, the shape of ``b``, or None when ``b`` is None
        Each gradient has the dtype of the array it is the gradient of.

    Notes
    -----
    With ``dt = dh_next * act'``, where ``act' = 1 - h_next**2`` for tanh and
    ``h_next > 0`` for relu: ``dx = dt @ Wx.T``, ``dh_prev = dt @ Wh.T``,
    ``dWx = x.T @ dt``, ``dWh = h_prev.T @ dt``, and ``db`` is ``dt`` summed
    over the axes along which ``b`` was broadcast.
    """
    cell = ElmanCell(nonlinearity)
    xp, dtype = _check_cell(x, h_prev, Wx, Wh, b, h_next=h_next, dh_next=dh_next)
    dh_next_, x_, h_prev_, h_next_, Wx_, Wh_ = cast(xp, dtype, dh_next, x, h_prev, h_next, Wx, Wh)
    (dh_prev,), dt, _ = cell.step_backward(xp, (dh_next_,), h_next_, Wh_)
    db = None if b is None else _checks.sum_to_shape(xp, dt, tuple(b.shape))
    grads = [dt @ Wx_.T, dh_prev, x_.T @ dt, h_prev_.T @ dt, db]
    dx, dh_prev, dWx, dWh, db = cast_back(xp, grads, [x, h_prev, Wx, Wh, b])
    return dx, dh_prev, dWx, dWh, db


# -- the time loop ----------------------------------------------------------


def _check_sequence(
    xs: Array, Wx: Array, Wh: Array, b: Array | None, h0: Array | None, **more: Array | None
) -> tuple[ModuleType, Any, Any, int, int, int]:
    xp, dtype, dev = _checks.common(xs=xs, Wx=Wx, Wh=Wh, b=b, h0=h0, **more)
    N, T, _, H = check_sequence(1, xs, Wx, Wh, {"b": b}, {"h0": h0})
    return xp, dtype, dev, N, T, H


@on_input_device
def rnn_forward(
    xs: Array,
    Wx: Array,
    Wh: Array,
    b: Array | None,
    h0: Array | None = None,
    *,
    nonlinearity: str = "tanh",
) -> tuple[Array, Array]:
    """Run the Elman recurrence over whole sequences.

    Parameters
    ----------
    xs : array, shape (N, T, D)
        N sequences of T steps of D features, T >= 1.
    Wx : array, shape (D, H)
    Wh : array, shape (H, H)
    b : array, broadcastable to (N, H), or None
    h0 : array, shape (N, H), optional
        Initial hidden state; zeros when omitted.
    nonlinearity : {'tanh', 'relu'}

    Returns
    -------
    hs : array, shape (N, T, H)
        Hidden state after every step, in the result type of the inputs.
    h_n : array, shape (N, H)
        Hidden state after the last step (equal to ``hs[:, -1]``).

    Notes
    -----
    The input projection ``xs @ Wx + b`` of all N*T rows is one matrix product
    before the loop; only ``h @ Wh`` and the activation stay inside it. The
    steps are collected and stacked, never written into a buffer.
    """
    cell = ElmanCell(nonlinearity)
    # A 2-D bias of N rows belongs to the sequences: it is split with them.
    b_rows = b is not None and getattr(b, "ndim", 0) == 2 and b.shape[0] != 1

    def outputs():
        _checks.real_floating(xs=xs, Wx=Wx, Wh=Wh, b=b, h0=h0)
        _, T, _, H = check_sequence(1, xs, Wx, Wh, {"b": b}, {"h0": h0})
        return [(0, (None, T, H), result_dtype(xs, Wx, Wh, b, h0))]

    try:  # Dask: each batch chunk runs this same function where it lives
        (hs,) = _chunks.on_dask_chunks(
            _rnn_chunk,
            {"xs": (xs, 0), "h0": (h0, 0), "b": (b if b_rows else None, 0)},
            outputs,
            {"Wx": Wx, "Wh": Wh, "b_whole": None if b_rows else b, "nonlinearity": nonlinearity},
        )
        return hs, hs[:, -1, :]
    except NotImplementedError:
        pass
    xp, dtype, dev, N, _, H = _check_sequence(xs, Wx, Wh, b, h0)
    xs, Wx, Wh, b, h0 = cast(xp, dtype, xs, Wx, Wh, b, h0)
    zero_state = h0 is None
    h0 = zeros(xp, (N, H), dtype, dev) if zero_state else h0
    # rnn_backward rebuilds everything it needs from hs: no tape to keep.
    hs, (h_n,), _ = _scan.forward(
        xp, cell, xs, Wx, Wh, b, None, (h0,), keep_tape=False, zero_state=zero_state
    )
    return hs, h_n


def _rnn_chunk(xs, Wx, Wh, b_whole, nonlinearity, h0=None, b=None):
    return rnn_forward(xs, Wx, Wh, b_whole if b is None else b, h0, nonlinearity=nonlinearity)[0]


@on_input_device
def rnn_backward(
    dhs: Array,
    xs: Array,
    hs: Array,
    Wx: Array,
    Wh: Array,
    b: Array | None,
    h0: Array | None = None,
    dh_n: Array | None = None,
    *,
    nonlinearity: str = "tanh",
) -> tuple[Array, Array, Array, Array, Array | None]:
    """Backpropagation through time for `rnn_forward`.

    Parameters
    ----------
    dhs : array, shape (N, T, H)
        Gradient of the loss with respect to ``hs``.
    xs, Wx, Wh, b, h0, nonlinearity :
        The inputs of `rnn_forward` (``h0=None`` meaning zeros, as there).
    hs : array, shape (N, T, H)
        Its output.
    dh_n : array, shape (N, H), optional
        Gradient with respect to ``h_n``, when the loss also depends on it
        through something other than ``hs``; zero when omitted.

    Returns
    -------
    dxs : array, shape (N, T, D)
    dh0 : array, shape (N, H)
        Gradient with respect to the initial state.
    dWx : array, shape (D, H)
    dWh : array, shape (H, H)
    db : array, the shape of ``b``, or None when ``b`` is None
        Each gradient has the dtype of the array it is the gradient of
        (``dh0`` the computation dtype when ``h0`` was omitted).

    Notes
    -----
    Only ``dt_t = (dhs_t + dh_t) * act'_t`` and ``dh_{t-1} = dt_t @ Wh.T``
    stay in the loop. After it, ``dxs``, ``dWx``, ``dWh`` and ``db`` are each
    one matrix product or sum over all N*T rows.
    """
    cell = ElmanCell(nonlinearity)
    xp, dtype, dev, N, T, H = _check_sequence(xs, Wx, Wh, b, h0, dhs=dhs, hs=hs, dh_n=dh_n)
    why = f"to match xs {tuple(xs.shape)} and Wh {(H, H)}"
    _checks.check_shape("hs", hs, [("N", N), ("T", T), ("H", H)], why)
    _checks.check_shape("dhs", dhs, [("N", N), ("T", T), ("H", H)], why)
    check_states(N, H, why, dh_n=dh_n)
    dhs_, xs_, hs_, Wx_, Wh_, b_, h0_, dh_n_ = cast(xp, dtype, dhs, xs, hs, Wx, Wh, b, h0, dh_n)
    h0_ = zeros(xp, (N, H), dtype, dev) if h0_ is None else h0_

    # The Elman step saves only its output, so hs rebuilds the forward's tape.
    outs = [hs_[:, t, :] for t in range(T)]
    tape = _scan.Tape(xs_, Wx_, Wh_, b_, None, outs, [h0_, *outs[:-1]], None, False, widths=(H,))
    dxs, (dh0,), dWx, dWh, db, _ = _scan.backward(xp, cell, tape, dhs_, (dh_n_,))
    dxs, dh0, dWx, dWh, db = cast_back(xp, [dxs, dh0, dWx, dWh, db], [xs, h0, Wx, Wh, b])
    return dxs, dh0, dWx, dWh, db


# -- the notebook's classes -------------------------------------------------


def _params(*arrays: Array | None) -> list[Array]:
    return [a for a in arrays if a is not None]


class RNN:
    """The notebook's Elman cell: a stateful wrapper over `rnn_cell_forward`.

    Parameters
    ----------
    Wx : array, shape (D, H)
    Wh : array, shape (H, H)
    b : array, broadcastable to (N, H), or None for no bias
    nonlinearity : {'tanh', 'relu'}, default 'tanh'

    Attributes
    ----------
    params : list
        ``[Wx, Wh, b]``, the very objects passed in (``[Wx, Wh]`` without bias).
    grads : list or None
        ``[dWx, dWh, db]`` (``[dWx, dWh]``) after `backward`, each the shape of
        its parameter.
    cache : tuple or None
        ``(x, h_prev, h_next)`` of the last `forward`.
    """

    def __init__(self, Wx: Array, Wh: Array, b: Array | None, nonlinearity: str = "tanh") -> None:
        ElmanCell(nonlinearity)  # validates the name now rather than at the first call
        self.params = _params(Wx, Wh, b)
        self.nonlinearity = nonlinearity
        self.grads: list[Array] | None = None
        self.cache: tuple[Array, Array, Array] | None = None

    def _weights(self) -> tuple[Array, Array, Array | None]:
        Wx, Wh, *b = self.params
        return Wx, Wh, (b[0] if b else None)

    @on_input_device
    def forward(self, x: Array, h_prev: Array) -> Array:
        """``act(h_prev @ Wh + x @ Wx + b)``; x (N, D), h_prev (N, H) -> (N, H)."""
        h_next = rnn_cell_forward(x, h_prev, *self._weights(), nonlinearity=self.nonlinearity)
        self.cache = (x, h_prev, h_next)
        return h_next

    @on_input_device
    def backward(self, dh_next: Array) -> tuple[Array, Array]:
        """Return ``(dx, dh_prev)`` and set ``grads``; dh_next has shape (N, H)."""
        if self.cache is None:
            raise RuntimeError("RNN.backward: call forward first")
        dx, dh_prev, dWx, dWh, db = rnn_cell_backward(
            dh_next, *self.cache, *self._weights(), nonlinearity=self.nonlinearity
        )
        self.grads = _params(dWx, dWh, db)
        return dx, dh_prev


class RNNLayer(Layer):
    """The notebook's time loop: a stateful wrapper over `rnn_forward` and `rnn_backward`.

    Parameters
    ----------
    Wx : array, shape (D, H)
    Wh : array, shape (H, H)
    b : array, broadcastable to (N, H), or None for no bias
    stateful : bool, default False
        If True, the last hidden state of one `forward` is the initial state of
        the next (truncated BPTT), until `reset_state`. If False, every call
        starts from zeros.
    nonlinearity : {'tanh', 'relu'}, default 'tanh'

    Attributes
    ----------
    params : list
        ``[Wx, Wh, b]``, the very objects passed in (``[Wx, Wh]`` without bias).
    h : array, shape (N, H), or None
        Hidden state after the last step of the last `forward`.
    grads : list or None
        ``[dWx, dWh, db]`` (``[dWx, dWh]``) after `backward`.
    dh : array, shape (N, H), or None
        After `backward`, the gradient with respect to the initial state.

    Notes
    -----
    Unlike the notebook, which stores ``hs`` as float32 whatever its inputs, the
    layer computes and returns the result type of its inputs: float64 weights
    and inputs give float64 states.
    """

    def __init__(
        self,
        Wx: Array,
        Wh: Array,
        b: Array | None,
        stateful: bool = False,
        nonlinearity: str = "tanh",
    ) -> None:
        ElmanCell(nonlinearity)
        super().__init__(_params(Wx, Wh, b), stateful)
        self.nonlinearity = nonlinearity

    @on_input_device
    def set_state(self, h: Array) -> None:
        """Set the hidden state, shape (N, H), that a stateful layer starts from."""
        self._set_states(h=h)

    _weights = RNN._weights

    def _forward(self, xs, h0):
        hs, h_n = rnn_forward(xs, *self._weights(), h0=h0, nonlinearity=self.nonlinearity)
        return hs, (h_n,), (xs, h0, hs)

    def _backward(self, dhs, cache):
        xs, h0, hs = cache
        dxs, dh0, dWx, dWh, db = rnn_backward(
            dhs, xs, hs, *self._weights(), h0=h0, nonlinearity=self.nonlinearity
        )
        return dxs, (dh0,), _params(dWx, dWh, db)
