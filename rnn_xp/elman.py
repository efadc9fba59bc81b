"""The Elman RNN: cell and time loop, forward and analytic backward (BPTT).

The recurrence, for a batch of N sequences of T steps of D features and a
hidden state of H features::

    h_t = tanh(h_{t-1} @ Wh + x_t @ Wx + b)

with ``Wx`` of shape (D, H), ``Wh`` of shape (H, H) and ``b`` of any shape that
broadcasts to (N, H).

The pure functions (`rnn_cell_forward`, `rnn_cell_backward`, `rnn_forward`,
`rnn_backward`) hold no state; `RNN` and `RNNLayer` are the notebook's stateful
classes, thin wrappers over them. Every function infers the array namespace once
from its inputs, computes in the result type of its inputs, and returns arrays of
the caller's library on the caller's device. No array is ever written in place.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from . import _checks
from ._backends import zeros

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


# -- validation --------------------------------------------------------------


def _check_weights(Wx: Array, Wh: Array) -> tuple[int, int]:
    if Wx.ndim != 2:
        raise ValueError(f"Wx: expected shape (D, H), got {tuple(Wx.shape)}")
    D, H = Wx.shape
    _checks.check_shape("Wh", Wh, [("H", H), ("H", H)], f"to match Wx of shape {tuple(Wx.shape)}")
    return D, H


def _cast(xp: ModuleType, dtype: Any, *arrays: Array) -> list[Array]:
    return [a if a is None or a.dtype == dtype else xp.astype(a, dtype) for a in arrays]


def _cast_back(xp: ModuleType, pairs: list[tuple[Array, Array]]) -> list[Array]:
    """Give each gradient the dtype of the array it is the gradient of."""
    return [g if g.dtype == like.dtype else xp.astype(g, like.dtype) for g, like in pairs]


# -- the cell ---------------------------------------------------------------


def rnn_cell_forward(x: Array, h_prev: Array, Wx: Array, Wh: Array, b: Array) -> Array:
    """One step of the Elman recurrence.

    Parameters
    ----------
    x : array, shape (N, D)
        Input at this step.
    h_prev : array, shape (N, H)
        Hidden state from the previous step.
    Wx : array, shape (D, H)
    Wh : array, shape (H, H)
    b : array, broadcastable to (N, H)

    Returns
    -------
    h_next : array, shape (N, H)
        ``tanh(h_prev @ Wh + x @ Wx + b)``, in the result type of the inputs.
        On NumPy float64 this is bit for bit
        ``np.tanh(np.dot(h_prev, Wh) + np.dot(x, Wx) + b)``.
    """
    xp, dtype, _ = _checks.common(x=x, h_prev=h_prev, Wx=Wx, Wh=Wh, b=b)
    D, H = _check_weights(Wx, Wh)
    _checks.check_shape("x", x, [("N", None), ("D", D)], f"to match Wx of shape {(D, H)}")
    N = x.shape[0]
    _checks.check_shape(
        "h_prev", h_prev, [("N", N), ("H", H)], f"to match x {tuple(x.shape)} and Wh {(H, H)}"
    )
    _checks.check_bias("b", b, N, H)
    x, h_prev, Wx, Wh, b = _cast(xp, dtype, x, h_prev, Wx, Wh, b)
    return xp.tanh(h_prev @ Wh + x @ Wx + b)


def rnn_cell_backward(
    dh_next: Array, x: Array, h_prev: Array, h_next: Array, Wx: Array, Wh: Array, b: Array
) -> tuple[Array, Array, Array, Array, Array]:
    """Gradients of one step, given the gradient with respect to its output.

    Parameters
    ----------
    dh_next : array, shape (N, H)
        Gradient of the loss with respect to ``h_next``.
    x, h_prev, Wx, Wh, b :
        The inputs of `rnn_cell_forward`.
    h_next : array, shape (N, H)
        Its output.

    Returns
    -------
    dx : array, shape (N, D)
    dh_prev : array, shape (N, H)
    dWx : array, shape (D, H)
    dWh : array, shape (H, H)
    db : array, the shape of ``b``
        Each gradient has the dtype of the array it is the gradient of.

    Notes
    -----
    With ``dt = dh_next * (1 - h_next**2)``: ``dx = dt @ Wx.T``,
    ``dh_prev = dt @ Wh.T``, ``dWx = x.T @ dt``, ``dWh = h_prev.T @ dt`` and
    ``db`` is ``dt`` summed over the axes along which ``b`` was broadcast.
    """
    xp, dtype, _ = _checks.common(
        dh_next=dh_next, x=x, h_prev=h_prev, h_next=h_next, Wx=Wx, Wh=Wh, b=b
    )
    D, H = _check_weights(Wx, Wh)
    _checks.check_shape("x", x, [("N", None), ("D", D)], f"to match Wx of shape {(D, H)}")
    N = x.shape[0]
    for name, a in (("h_prev", h_prev), ("h_next", h_next), ("dh_next", dh_next)):
        _checks.check_shape(
            name, a, [("N", N), ("H", H)], f"to match x {tuple(x.shape)} and Wh {(H, H)}"
        )
    _checks.check_bias("b", b, N, H)
    c = _cast(xp, dtype, dh_next, x, h_prev, h_next, Wx, Wh)
    dh_next_, x_, h_prev_, h_next_, Wx_, Wh_ = c

    dt = dh_next_ * (1 - h_next_ * h_next_)
    grads = [
        (dt @ Wx_.T, x),
        (dt @ Wh_.T, h_prev),
        (x_.T @ dt, Wx),
        (h_prev_.T @ dt, Wh),
        (_checks.sum_to_shape(xp, dt, tuple(b.shape)), b),
    ]
    dx, dh_prev, dWx, dWh, db = _cast_back(xp, grads)
    return dx, dh_prev, dWx, dWh, db


# -- the time loop ----------------------------------------------------------


def _check_sequence(
    xs: Array, Wx: Array, Wh: Array, b: Array, h0: Array | None
) -> tuple[int, int, int, int]:
    D, H = _check_weights(Wx, Wh)
    _checks.check_shape(
        "xs", xs, [("N", None), ("T", None), ("D", D)], f"to match Wx of shape {(D, H)}"
    )
    N, T = xs.shape[0], xs.shape[1]
    if T < 1:
        raise ValueError(f"xs: expected at least one time step, got shape {tuple(xs.shape)}")
    if h0 is not None:
        _checks.check_shape(
            "h0", h0, [("N", N), ("H", H)], f"to match xs {tuple(xs.shape)} and Wh {(H, H)}"
        )
    _checks.check_bias("b", b, N, H)
    return N, T, D, H


def _bias_over_time(xp: ModuleType, b: Array) -> Array:
    # b broadcasts to (N, H); over (N, T, H) a 2-D bias needs its time axis.
    return xp.expand_dims(b, axis=-2) if b.ndim == 2 else b


def rnn_forward(
    xs: Array, Wx: Array, Wh: Array, b: Array, h0: Array | None = None
) -> tuple[Array, Array]:
    """Run the Elman recurrence over whole sequences.

    Parameters
    ----------
    xs : array, shape (N, T, D)
        N sequences of T steps of D features, T >= 1.
    Wx : array, shape (D, H)
    Wh : array, shape (H, H)
    b : array, broadcastable to (N, H)
    h0 : array, shape (N, H), optional
        Initial hidden state; zeros when omitted.

    Returns
    -------
    hs : array, shape (N, T, H)
        Hidden state after every step, in the result type of the inputs.
    h_n : array, shape (N, H)
        Hidden state after the last step (equal to ``hs[:, -1]``).

    Notes
    -----
    The input projection ``xs @ Wx + b`` of all N*T rows is one matrix product
    before the loop; only ``h @ Wh`` and the ``tanh`` stay inside it. The steps
    are collected and stacked, never written into a buffer.
    """
    xp, dtype, dev = _checks.common(xs=xs, Wx=Wx, Wh=Wh, b=b, h0=h0)
    N, T, D, H = _check_sequence(xs, Wx, Wh, b, h0)
    xs, Wx, Wh, b, h0 = _cast(xp, dtype, xs, Wx, Wh, b, h0)
    if h0 is None:
        h0 = zeros(xp, (N, H), dtype, dev)

    xw = xp.reshape(xp.reshape(xs, (N * T, D)) @ Wx, (N, T, H)) + _bias_over_time(xp, b)
    h = h0
    hs = []
    for t in range(T):
        h = xp.tanh(h @ Wh + xw[:, t, :])
        hs.append(h)
    return xp.stack(hs, axis=1), h


def rnn_backward(
    dhs: Array,
    xs: Array,
    hs: Array,
    Wx: Array,
    Wh: Array,
    b: Array,
    h0: Array | None = None,
    dh_n: Array | None = None,
) -> tuple[Array, Array, Array, Array, Array]:
    """Backpropagation through time for `rnn_forward`.

    Parameters
    ----------
    dhs : array, shape (N, T, H)
        Gradient of the loss with respect to ``hs``.
    xs, Wx, Wh, b, h0 :
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
    db : array, the shape of ``b``
        Each gradient has the dtype of the array it is the gradient of
        (``dh0`` the computation dtype when ``h0`` was omitted).

    Notes
    -----
    Only ``dt_t = (dhs_t + dh_{t+1}) * (1 - h_t**2)`` and ``dh_t = dt_t @ Wh.T``
    stay in the loop. After it, ``dxs``, ``dWx``, ``dWh`` and ``db`` are each
    one matrix product or sum over all N*T rows.
    """
    xp, dtype, dev = _checks.common(dhs=dhs, xs=xs, hs=hs, Wx=Wx, Wh=Wh, b=b, h0=h0, dh_n=dh_n)
    N, T, D, H = _check_sequence(xs, Wx, Wh, b, h0)
    why = f"to match xs {tuple(xs.shape)} and Wh {(H, H)}"
    _checks.check_shape("hs", hs, [("N", N), ("T", T), ("H", H)], why)
    _checks.check_shape("dhs", dhs, [("N", N), ("T", T), ("H", H)], why)
    if dh_n is not None:
        _checks.check_shape("dh_n", dh_n, [("N", N), ("H", H)], why)
    dhs_, xs_, hs_, Wx_, Wh_, h0_, dh = _cast(xp, dtype, dhs, xs, hs, Wx, Wh, h0, dh_n)
    if h0_ is None:
        h0_ = zeros(xp, (N, H), dtype, dev)

    WhT = Wh_.T
    dts = []
    for t in reversed(range(T)):
        dh = dhs_[:, t, :] if dh is None else dhs_[:, t, :] + dh
        h = hs_[:, t, :]
        dt = dh * (1 - h * h)
        dts.append(dt)
        dh = dt @ WhT
    dts = xp.stack(dts[::-1], axis=1)
    dt_all = xp.reshape(dts, (N * T, H))

    h_prev = xp.concat([xp.expand_dims(h0_, axis=1), hs_[:, :-1, :]], axis=1)
    grads = [
        (xp.reshape(dt_all @ Wx_.T, (N, T, D)), xs),
        (dh, h0 if h0 is not None else dh),
        (xp.reshape(xs_, (N * T, D)).T @ dt_all, Wx),
        (xp.reshape(h_prev, (N * T, H)).T @ dt_all, Wh),
        (_checks.sum_to_shape(xp, xp.sum(dts, axis=1), tuple(b.shape)), b),
    ]
    dxs, dh0, dWx, dWh, db = _cast_back(xp, grads)
    return dxs, dh0, dWx, dWh, db


# -- the notebook's classes -------------------------------------------------


class RNN:
    """The notebook's Elman cell: a stateful wrapper over `rnn_cell_forward`.

    Parameters
    ----------
    Wx : array, shape (D, H)
    Wh : array, shape (H, H)
    b : array, broadcastable to (N, H)

    Attributes
    ----------
    params : list
        ``[Wx, Wh, b]``, the very objects passed in.
    grads : list or None
        ``[dWx, dWh, db]`` after `backward`, each the shape of its parameter.
    cache : tuple or None
        ``(x, h_prev, h_next)`` of the last `forward`.
    """

    def __init__(self, Wx: Array, Wh: Array, b: Array) -> None:
        self.params = [Wx, Wh, b]
        self.grads: list[Array] | None = None
        self.cache: tuple[Array, Array, Array] | None = None

    def forward(self, x: Array, h_prev: Array) -> Array:
        """``tanh(h_prev @ Wh + x @ Wx + b)``; x (N, D), h_prev (N, H) -> (N, H)."""
        h_next = rnn_cell_forward(x, h_prev, *self.params)
        self.cache = (x, h_prev, h_next)
        return h_next

    def backward(self, dh_next: Array) -> tuple[Array, Array]:
        """Return ``(dx, dh_prev)`` and set ``grads``; dh_next has shape (N, H)."""
        if self.cache is None:
            raise RuntimeError("RNN.backward: call forward first")
        dx, dh_prev, *grads = rnn_cell_backward(dh_next, *self.cache, *self.params)
        self.grads = grads
        return dx, dh_prev


class RNNLayer:
    """The notebook's time loop: a stateful wrapper over `rnn_forward` and `rnn_backward`.

    Parameters
    ----------
    Wx : array, shape (D, H)
    Wh : array, shape (H, H)
    b : array, broadcastable to (N, H)
    stateful : bool, default False
        If True, the last hidden state of one `forward` is the initial state of
        the next (truncated BPTT), until `reset_state`. If False, every call
        starts from zeros.

    Attributes
    ----------
    params : list
        ``[Wx, Wh, b]``, the very objects passed in.
    h : array, shape (N, H), or None
        Hidden state after the last step of the last `forward`.
    grads : list or None
        ``[dWx, dWh, db]`` after `backward`.
    dh : array, shape (N, H), or None
        After `backward`, the gradient with respect to the initial state.

    Notes
    -----
    Unlike the notebook, which stores ``hs`` as float32 whatever its inputs, the
    layer computes and returns the result type of its inputs: float64 weights
    and inputs give float64 states.
    """

    def __init__(self, Wx: Array, Wh: Array, b: Array, stateful: bool = False) -> None:
        self.params = [Wx, Wh, b]
        self.stateful = stateful
        self.h: Array | None = None
        self.dh: Array | None = None
        self.grads: list[Array] | None = None
        self.cache: tuple[Array, Array | None, Array] | None = None

    def set_state(self, h: Array) -> None:
        """Set the hidden state, shape (N, H), that a stateful layer starts from."""
        self.h = h

    def reset_state(self) -> None:
        """Forget the hidden state: the next `forward` starts from zeros."""
        self.h = None

    def forward(self, xs: Array) -> Array:
        """Run the layer over ``xs`` of shape (N, T, D); return ``hs`` of shape (N, T, H)."""
        h0 = self.h if self.stateful else None
        shape = getattr(xs, "shape", None)
        if h0 is not None and shape is not None and len(shape) == 3 and shape[0] != h0.shape[0]:
            raise ValueError(
                f"xs: this stateful layer holds a state for batch size N={h0.shape[0]}, "
                f"got xs of shape {tuple(shape)}; call reset_state() to start a new batch"
            )
        hs, h = rnn_forward(xs, *self.params, h0=h0)
        self.cache = (xs, h0, hs)
        self.h = h
        return hs

    def backward(self, dhs: Array) -> Array:
        """Backpropagate ``dhs`` of shape (N, T, H); return ``dxs`` of shape (N, T, D)."""
        if self.cache is None:
            raise RuntimeError("RNNLayer.backward: call forward first")
        xs, h0, hs = self.cache
        dxs, dh0, *grads = rnn_backward(dhs, xs, hs, *self.params, h0=h0)
        self.grads = grads
        self.dh = dh0
        return dxs
