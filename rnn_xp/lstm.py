"""The LSTM: cell and time loop, forward and analytic backward, in torch's gate order.

With ``Wx`` of shape (D, 4H), ``Wh`` of shape (H, 4H) and ``b`` of shape (4H,)
(or anything that broadcasts to (N, 4H), or None), each step is one matrix
product followed by elementwise work::

    A = h_{t-1} @ Wh + x_t @ Wx + b          # (N, 4H): the gates stacked i, f, g, o
    i = sigmoid(A[:, 0H:1H])                  # input gate
    f = sigmoid(A[:, 1H:2H])                  # forget gate
    g = tanh(A[:, 2H:3H])                     # candidate
    o = sigmoid(A[:, 3H:4H])                  # output gate
    c_t = f * c_{t-1} + i * g
    h_t = o * tanh(c_t)

torch's ``nn.LSTM`` stores ``weight_ih_l0`` = ``Wx.T`` and ``weight_hh_l0`` =
``Wh.T`` and two biases whose sum is ``b``.
"""

from __future__ import annotations

from typing import Any

from . import _layer
from ._activations import sigmoid
from ._backends import on_input_device
from ._layer import Layer, SequenceCache

Array = Any

__all__ = [
    "LSTM",
    "LSTMLayer",
    "lstm_backward",
    "lstm_cell_backward",
    "lstm_cell_forward",
    "lstm_forward",
]


class LSTMCell:
    """One LSTM step and its backward, for `_scan`."""

    kind = "lstm"
    gates = 4
    n_states = 2

    def step(self, xp, ax, state, Wh, bh):
        h, c = state
        A = xp.matmul(h, Wh) + ax
        if bh is not None:
            A = A + bh
        H = h.shape[1]
        i = sigmoid(xp, A[:, :H])
        f = sigmoid(xp, A[:, H : 2 * H])
        g = xp.tanh(A[:, 2 * H : 3 * H])
        o = sigmoid(xp, A[:, 3 * H :])
        c_next = f * c + i * g
        tc = xp.tanh(c_next)
        return (o * tc, c_next), (i, f, g, o, tc, c)

    def step_backward(self, xp, dstate, saved, Wh):
        dh, dc = dstate
        i, f, g, o, tc, c_prev = saved
        dc = dc + dh * o * (1 - tc * tc)
        dA = xp.concat(
            [
                dc * g * i * (1 - i),
                dc * c_prev * f * (1 - f),
                dc * i * (1 - g * g),
                dh * tc * o * (1 - o),
            ],
            axis=1,
        )
        return (xp.matmul(dA, Wh.T), dc * f), dA, dA


CELL = LSTMCell()


@on_input_device
def lstm_cell_forward(
    x: Array, h_prev: Array, c_prev: Array, Wx: Array, Wh: Array, b: Array | None
) -> tuple[Array, Array]:
    """One LSTM step.

    Parameters
    ----------
    x : array, shape (N, D)
    h_prev, c_prev : arrays, shape (N, H)
    Wx : array, shape (D, 4H)
    Wh : array, shape (H, 4H)
    b : array, broadcastable to (N, 4H), or None

    Returns
    -------
    h_next, c_next : arrays, shape (N, H)
    """
    biases = {"b": b, "bh": None}
    h_next, c_next = _layer.cell_forward(
        CELL, x, Wx, Wh, biases, {"h_prev": h_prev, "c_prev": c_prev}
    )
    return h_next, c_next


@on_input_device
def lstm_cell_backward(
    dh_next: Array,
    dc_next: Array,
    x: Array,
    h_prev: Array,
    c_prev: Array,
    Wx: Array,
    Wh: Array,
    b: Array | None,
) -> tuple[Array, Array, Array, Array, Array, Array | None]:
    """Gradients of `lstm_cell_forward` given those of ``h_next`` and ``c_next``.

    Returns
    -------
    dx, dh_prev, dc_prev, dWx, dWh, db
        Each shaped and typed like the array it is the gradient of; ``db`` is
        None when ``b`` is None.
    """
    dx, dh_prev, dc_prev, dWx, dWh, db, _ = _layer.cell_backward(
        CELL,
        {"dh_next": dh_next, "dc_next": dc_next},
        x,
        Wx,
        Wh,
        {"b": b, "bh": None},
        {"h_prev": h_prev, "c_prev": c_prev},
    )
    return dx, dh_prev, dc_prev, dWx, dWh, db


@on_input_device
def lstm_forward(
    xs: Array,
    Wx: Array,
    Wh: Array,
    b: Array | None,
    h0: Array | None = None,
    c0: Array | None = None,
    *,
    inference: bool = False,
) -> tuple[Array, Array, Array, SequenceCache | None]:
    """Run the LSTM over whole sequences.

    Parameters
    ----------
    xs : array, shape (N, T, D)
    Wx : array, shape (D, 4H)
    Wh : array, shape (H, 4H)
    b : array, broadcastable to (N, 4H), or None
    h0, c0 : arrays, shape (N, H), optional
        Initial hidden and cell states; zeros when omitted.

    Returns
    -------
    hs : array, shape (N, T, H)
    h_n, c_n : arrays, shape (N, H)
        The states after the last step.
    cache : object, or None with ``inference=True``
        Pass it to `lstm_backward`.

    Notes
    -----
    With ``inference=True`` no backward cache is kept: beyond the output, peak
    memory is the input projection (N, T, 4H) plus O(N*H) scratch on NumPy and
    CuPy.
    """
    hs, (h_n, c_n), cache = _layer.sequence_forward(
        CELL, xs, Wx, Wh, b, None, {"h0": h0, "c0": c0}, ("b", "bh"), inference
    )
    return hs, h_n, c_n, cache


@on_input_device
def lstm_backward(
    dhs: Array, cache: SequenceCache, dh_n: Array | None = None, dc_n: Array | None = None
) -> tuple[Array, Array, Array, Array, Array, Array | None]:
    """Backpropagation through time for `lstm_forward`.

    Parameters
    ----------
    dhs : array, shape (N, T, H)
        Gradient with respect to ``hs``.
    cache : object
        From `lstm_forward`.
    dh_n, dc_n : arrays, shape (N, H), optional
        Gradients with respect to the final states; zero when omitted.

    Returns
    -------
    dxs, dh0, dc0, dWx, dWh, db
        Each shaped and typed like the array it is the gradient of (``dh0``,
        ``dc0`` in the computation dtype when the state was omitted).
    """
    dxs, dh0, dc0, dWx, dWh, db, _ = _layer.sequence_backward(
        CELL, dhs, cache, {"dh_n": dh_n, "dc_n": dc_n}
    )
    return dxs, dh0, dc0, dWx, dWh, db


class LSTM:
    """The LSTM cell, in the notebook's style: a stateful wrapper over `lstm_cell_forward`.

    ``params`` is ``[Wx, Wh, b]`` (``[Wx, Wh]`` when ``b`` is None);
    ``grads`` the same after `backward`; ``cache`` the last forward's inputs.
    """

    def __init__(self, Wx: Array, Wh: Array, b: Array | None) -> None:
        self.params = [a for a in (Wx, Wh, b) if a is not None]
        self.grads: list | None = None
        self.cache: tuple | None = None

    def _weights(self):
        Wx, Wh, *b = self.params
        return Wx, Wh, (b[0] if b else None)

    @on_input_device
    def forward(self, x: Array, h_prev: Array, c_prev: Array) -> tuple[Array, Array]:
        """x (N, D), h_prev and c_prev (N, H) -> ``(h_next, c_next)``."""
        out = lstm_cell_forward(x, h_prev, c_prev, *self._weights())
        self.cache = (x, h_prev, c_prev)
        return out

    @on_input_device
    def backward(self, dh_next: Array, dc_next: Array) -> tuple[Array, Array, Array]:
        """Return ``(dx, dh_prev, dc_prev)`` and set ``grads``."""
        if self.cache is None:
            raise RuntimeError("LSTM.backward: call forward first")
        dx, dh_prev, dc_prev, dWx, dWh, db = lstm_cell_backward(
            dh_next, dc_next, *self.cache, *self._weights()
        )
        self.grads = [g for g in (dWx, dWh, db) if g is not None]
        return dx, dh_prev, dc_prev


class LSTMLayer(Layer):
    """An LSTM over whole sequences: a stateful wrapper over `lstm_forward`.

    Parameters
    ----------
    Wx : array, shape (D, 4H)
    Wh : array, shape (H, 4H)
    b : array, broadcastable to (N, 4H), or None
    stateful : bool, default False
        If True, ``h`` and ``c`` after one `forward` are the initial states of
        the next, until `reset_state`.

    Attributes
    ----------
    params, grads : lists, as for `LSTM`
    h, c : arrays, shape (N, H), or None
        States after the last step of the last `forward`.
    dh, dc : arrays, shape (N, H), or None
        After `backward`, the gradients with respect to the initial states.
    """

    _states = ("h", "c")

    def __init__(self, Wx: Array, Wh: Array, b: Array | None, stateful: bool = False) -> None:
        super().__init__([a for a in (Wx, Wh, b) if a is not None], stateful)

    _weights = LSTM._weights

    @on_input_device
    def set_state(self, h: Array, c: Array | None = None) -> None:
        """Set the states a stateful layer starts from; ``c=None`` means zeros."""
        self._set_states(h=h, c=c)

    def _forward(self, xs, h0, c0):
        hs, h_n, c_n, cache = lstm_forward(xs, *self._weights(), h0=h0, c0=c0)
        return hs, (h_n, c_n), cache

    def _backward(self, dhs, cache):
        dxs, dh0, dc0, dWx, dWh, db = lstm_backward(dhs, cache)
        return dxs, (dh0, dc0), [g for g in (dWx, dWh, db) if g is not None]
