"""The GRU: cell and time loop, forward and analytic backward, in torch's formulation.

With ``Wx`` of shape (D, 3H), ``Wh`` of shape (H, 3H), and two biases ``bx`` and
``bh`` of shape (3H,) (or anything that broadcasts to (N, 3H), or None), the
gates stacked r, z, n::

    ax = x_t @ Wx + bx                        # (N, 3H)
    ah = h_{t-1} @ Wh + bh                    # (N, 3H)
    r = sigmoid(ax[:, 0H:1H] + ah[:, 0H:1H])  # reset gate
    z = sigmoid(ax[:, 1H:2H] + ah[:, 1H:2H])  # update gate
    n = tanh(ax[:, 2H:3H] + r * ah[:, 2H:3H]) # candidate: reset applied after the product
    h_t = (1 - z) * n + z * h_{t-1}

Because ``r`` multiplies ``h @ Whn + bhn``, the recurrent bias cannot be folded
into the input bias: hence two biases, torch's ``bias_ih`` (``bx``) and
``bias_hh`` (``bh``). ``weight_ih_l0`` is ``Wx.T`` and ``weight_hh_l0`` is ``Wh.T``.
"""

from __future__ import annotations

from typing import Any

from . import _layer
from ._activations import sigmoid
from ._backends import on_input_device
from ._layer import Layer, SequenceCache

Array = Any

__all__ = [
    "GRU",
    "GRULayer",
    "gru_backward",
    "gru_cell_backward",
    "gru_cell_forward",
    "gru_forward",
]


class GRUCell:
    """One GRU step and its backward, for `_scan`."""

    kind = "gru"
    gates = 3
    n_states = 1

    def step(self, xp, ax, state, Wh, bh):
        (h,) = state
        ah = xp.matmul(h, Wh)
        if bh is not None:
            ah = ah + bh
        H = h.shape[1]
        r = sigmoid(xp, ax[:, :H] + ah[:, :H])
        z = sigmoid(xp, ax[:, H : 2 * H] + ah[:, H : 2 * H])
        ahn = ah[:, 2 * H :]
        n = xp.tanh(ax[:, 2 * H :] + r * ahn)
        return ((1 - z) * n + z * h,), (r, z, n, ahn, h)

    def step_backward(self, xp, dstate, saved, Wh):
        (dh,) = dstate
        r, z, n, ahn, h_prev = saved
        dn = dh * (1 - z) * (1 - n * n)
        dr = dn * ahn * r * (1 - r)
        dz = dh * (h_prev - n) * z * (1 - z)
        dax = xp.concat([dr, dz, dn], axis=1)
        dah = xp.concat([dr, dz, dn * r], axis=1)
        return (dh * z + xp.matmul(dah, Wh.T),), dax, dah


CELL = GRUCell()
BIASES = ("bx", "bh")


@on_input_device
def gru_cell_forward(
    x: Array, h_prev: Array, Wx: Array, Wh: Array, bx: Array | None, bh: Array | None
) -> Array:
    """One GRU step: x (N, D), h_prev (N, H) -> h_next (N, H).

    ``Wx`` is (D, 3H), ``Wh`` is (H, 3H); ``bx`` and ``bh`` broadcast to (N, 3H)
    or are None.
    """
    (h_next,) = _layer.cell_forward(CELL, x, Wx, Wh, {"bx": bx, "bh": bh}, {"h_prev": h_prev})
    return h_next


@on_input_device
def gru_cell_backward(
    dh_next: Array,
    x: Array,
    h_prev: Array,
    Wx: Array,
    Wh: Array,
    bx: Array | None,
    bh: Array | None,
) -> tuple[Array, Array, Array, Array, Array | None, Array | None]:
    """Gradients ``(dx, dh_prev, dWx, dWh, dbx, dbh)`` of `gru_cell_forward`."""
    dx, dh_prev, dWx, dWh, dbx, dbh = _layer.cell_backward(
        CELL, {"dh_next": dh_next}, x, Wx, Wh, {"bx": bx, "bh": bh}, {"h_prev": h_prev}
    )
    return dx, dh_prev, dWx, dWh, dbx, dbh


@on_input_device
def gru_forward(
    xs: Array,
    Wx: Array,
    Wh: Array,
    bx: Array | None,
    bh: Array | None,
    h0: Array | None = None,
    *,
    inference: bool = False,
) -> tuple[Array, Array, SequenceCache | None]:
    """Run the GRU over whole sequences.

    Parameters
    ----------
    xs : array, shape (N, T, D)
    Wx : array, shape (D, 3H)
    Wh : array, shape (H, 3H)
    bx, bh : arrays, broadcastable to (N, 3H), or None
    h0 : array, shape (N, H), optional
        Initial state; zeros when omitted.

    Returns
    -------
    hs : array, shape (N, T, H)
    h_n : array, shape (N, H)
    cache : object, or None with ``inference=True``
        Pass it to `gru_backward`. With ``inference=True`` no backward cache is
        kept (peak memory: the input projection plus O(N*H) beyond the output).
    """
    hs, (h_n,), cache = _layer.sequence_forward(
        CELL, xs, Wx, Wh, bx, bh, {"h0": h0}, BIASES, inference
    )
    return hs, h_n, cache


@on_input_device
def gru_backward(
    dhs: Array, cache: SequenceCache, dh_n: Array | None = None
) -> tuple[Array, Array, Array, Array, Array | None, Array | None]:
    """Backpropagation through time for `gru_forward`.

    Returns
    -------
    dxs, dh0, dWx, dWh, dbx, dbh
        Each shaped and typed like the array it is the gradient of.
    """
    dxs, dh0, dWx, dWh, dbx, dbh = _layer.sequence_backward(CELL, dhs, cache, {"dh_n": dh_n})
    return dxs, dh0, dWx, dWh, dbx, dbh


def _present(*arrays):
    return [a for a in arrays if a is not None]


class GRU:
    """The GRU cell, in the notebook's style: a stateful wrapper over `gru_cell_forward`.

    ``params`` is ``[Wx, Wh, bx, bh]``, without the biases that are None;
    ``grads`` the same after `backward`.
    """

    def __init__(self, Wx: Array, Wh: Array, bx: Array | None, bh: Array | None) -> None:
        self._has = (bx is not None, bh is not None)
        self.params = _present(Wx, Wh, bx, bh)
        self.grads: list | None = None
        self.cache: tuple | None = None

    def _weights(self):
        Wx, Wh, *biases = self.params
        it = iter(biases)
        return Wx, Wh, *(next(it) if has else None for has in self._has)

    @on_input_device
    def forward(self, x: Array, h_prev: Array) -> Array:
        """x (N, D), h_prev (N, H) -> h_next (N, H)."""
        h_next = gru_cell_forward(x, h_prev, *self._weights())
        self.cache = (x, h_prev)
        return h_next

    @on_input_device
    def backward(self, dh_next: Array) -> tuple[Array, Array]:
        """Return ``(dx, dh_prev)`` and set ``grads``."""
        if self.cache is None:
            raise RuntimeError("GRU.backward: call forward first")
        dx, dh_prev, *grads = gru_cell_backward(dh_next, *self.cache, *self._weights())
        self.grads = _present(*grads)
        return dx, dh_prev


class GRULayer(Layer):
    """A GRU over whole sequences: a stateful wrapper over `gru_forward`.

    Parameters
    ----------
    Wx : array, shape (D, 3H)
    Wh : array, shape (H, 3H)
    bx, bh : arrays, broadcastable to (N, 3H), or None
    stateful : bool, default False

    Attributes
    ----------
    params, grads : lists, as for `GRU`
    h : array, shape (N, H), or None
    dh : array, shape (N, H), or None
    """

    def __init__(
        self, Wx: Array, Wh: Array, bx: Array | None, bh: Array | None, stateful: bool = False
    ) -> None:
        super().__init__(_present(Wx, Wh, bx, bh), stateful)
        self._has = (bx is not None, bh is not None)

    _weights = GRU._weights

    @on_input_device
    def set_state(self, h: Array) -> None:
        """Set the hidden state, shape (N, H), that a stateful layer starts from."""
        self._set_states(h=h)

    def _forward(self, xs, h0):
        hs, h_n, cache = gru_forward(xs, *self._weights(), h0=h0)
        return hs, (h_n,), cache

    def _backward(self, dhs, cache):
        dxs, dh0, *grads = gru_backward(dhs, cache)
        return dxs, (dh0,), _present(*grads)
