"""Test support: a NumPy float64 reference, problem generation and tolerances.

The reference is written independently of rnn_xp, step by step as in the
notebook, with no hoisting: it is what every backend is compared against.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

import rnn_xp
from rnn_xp._backends import TOLERANCE, Loaded


@functools.cache
def two_states(mode: str) -> bool:
    """Whether ``mode``'s state is a pair ``(h, c)`` ('lstm' and its variants), not ``h``.

    Asked of the cell itself (``n_states``), so a mode added to `rnn_xp.MODES`
    needs no change here.
    """
    return rnn_xp.Recurrent(mode, 1, 1).cell.n_states == 2


def assert_close(actual: np.ndarray, desired: np.ndarray, dtype: str, what: str = "") -> None:
    assert actual.shape == desired.shape, f"{what}: shape {actual.shape} != {desired.shape}"
    scale = max(1.0, float(np.max(np.abs(desired), initial=0.0)))
    err = float(np.max(np.abs(actual.astype(np.float64) - desired), initial=0.0))
    assert err <= TOLERANCE[dtype] * scale, (
        f"{what}: max error {err:.3g} exceeds {TOLERANCE[dtype]:.1g} * {scale:.3g} for {dtype}"
    )


# -- the reference ------------------------------------------------------------


def ref_forward(xs, Wx, Wh, b, h0):
    N, T, _ = xs.shape
    h = h0
    hs = np.empty((N, T, Wh.shape[0]))
    for t in range(T):
        h = np.tanh(np.dot(h, Wh) + np.dot(xs[:, t, :], Wx) + b)
        hs[:, t, :] = h
    return hs


def _reduce_like(g, b):
    while g.ndim > b.ndim:
        g = g.sum(axis=0)
    for axis, size in enumerate(b.shape):
        if size == 1:
            g = g.sum(axis=axis, keepdims=True)
    return g


def ref_backward(dhs, xs, hs, Wx, Wh, b, h0, dh_n=None):
    """Return (dxs, dh0, dWx, dWh, db) by plain BPTT, one step at a time."""
    T = xs.shape[1]
    dxs = np.empty_like(xs)
    dWx, dWh, db = np.zeros_like(Wx), np.zeros_like(Wh), np.zeros_like(b)
    dh = np.zeros_like(h0) if dh_n is None else dh_n
    for t in reversed(range(T)):
        h_prev = h0 if t == 0 else hs[:, t - 1, :]
        dt = (dhs[:, t, :] + dh) * (1 - hs[:, t, :] ** 2)
        dWx += xs[:, t, :].T @ dt
        dWh += h_prev.T @ dt
        db += _reduce_like(dt, b)
        dxs[:, t, :] = dt @ Wx.T
        dh = dt @ Wh.T
    return dxs, dh, dWx, dWh, db


# -- problems -------------------------------------------------------------------

BIAS_SHAPES = {
    "H": lambda N, H: (H,),
    "NH": lambda N, H: (N, H),
    "1H": lambda N, H: (1, H),
    "scalar": lambda N, H: (),
}


@dataclass(frozen=True)
class Problem:
    """NumPy float64 inputs of one layer call, already rounded to ``dtype``."""

    xs: np.ndarray
    Wx: np.ndarray
    Wh: np.ndarray
    b: np.ndarray
    h0: np.ndarray
    dhs: np.ndarray
    dh_n: np.ndarray
    dtype: str

    def on(self, backend: Loaded) -> dict:
        """Every array of the problem, on ``backend`` in ``dtype``."""
        return {
            name: backend.asarray(getattr(self, name).astype(self.dtype))
            for name in ("xs", "Wx", "Wh", "b", "h0", "dhs", "dh_n")
        }


def make_problem(N=3, T=5, D=4, H=6, bias="H", dtype="float64", seed=0) -> Problem:
    rng = np.random.default_rng(seed)

    def draw(*shape, scale=1.0):
        # Round to dtype first, so that the reference sees exactly the inputs
        # the backend sees and only the computation's error is measured.
        return np.asarray(scale * rng.standard_normal(shape)).astype(dtype).astype(np.float64)

    return Problem(
        xs=draw(N, T, D),
        Wx=draw(D, H, scale=D**-0.5),
        Wh=draw(H, H, scale=H**-0.5),
        b=draw(*BIAS_SHAPES[bias](N, H), scale=0.5),
        h0=draw(N, H, scale=0.5),
        dhs=draw(N, T, H),
        dh_n=draw(N, H),
        dtype=dtype,
    )


# -- LSTM and GRU references (forward only; backward is checked by finite
#    differences, autodiff and torch.nn against rnn_xp on NumPy float64) ----------


def _sigmoid(a):
    return 1 / (1 + np.exp(-a))


def ref_lstm_forward(xs, Wx, Wh, b, h0, c0):
    H = Wh.shape[0]
    h, c, hs = h0, c0, []
    for t in range(xs.shape[1]):
        A = h @ Wh + xs[:, t, :] @ Wx + (0 if b is None else b)
        i, f, o = _sigmoid(A[:, :H]), _sigmoid(A[:, H : 2 * H]), _sigmoid(A[:, 3 * H :])
        c = f * c + i * np.tanh(A[:, 2 * H : 3 * H])
        h = o * np.tanh(c)
        hs.append(h)
    return np.stack(hs, axis=1), c


def ref_gru_forward(xs, Wx, Wh, bx, bh, h0):
    H = Wh.shape[0]
    h, hs = h0, []
    for t in range(xs.shape[1]):
        ax = xs[:, t, :] @ Wx + (0 if bx is None else bx)
        ah = h @ Wh + (0 if bh is None else bh)
        r = _sigmoid(ax[:, :H] + ah[:, :H])
        z = _sigmoid(ax[:, H : 2 * H] + ah[:, H : 2 * H])
        n = np.tanh(ax[:, 2 * H :] + r * ah[:, 2 * H :])
        h = (1 - z) * n + z * h
        hs.append(h)
    return np.stack(hs, axis=1)


def to_dtype(arrays: dict, dtype: str) -> dict:
    """Round float64 arrays to ``dtype`` and back, so a reference sees the same inputs."""
    return {
        k: None if v is None else v.astype(dtype).astype(np.float64) for k, v in arrays.items()
    }


def call(argv, capsys) -> tuple[int, str, str]:
    """``rnn-xp ARGV`` in this process: ``(exit status, stdout, stderr)``, argparse's exits too."""
    from rnn_xp import cli

    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err
