"""The seed notebook (shared/seed/000_644709595855f1dc.txt), replayed cell by cell.

Each ``In [k]`` cell is copied as written, except cells 7 and 16, which defined
``RNN`` and ``RNNLayer`` and are replaced by ``from rnn_xp import RNN, RNNLayer``.
After each cell, the test checks what the notebook showed as its output.
"""

from __future__ import annotations

import numpy as np


class NotebookRNNLayer:
    """The notebook's own layer (cell 16, with its own cell 7), kept to compare against."""

    def __init__(self, Wx, Wh, b):
        self.Wx, self.Wh, self.b = Wx, Wh, b

    def forward(self, xs):
        N, T, _ = xs.shape
        _, H = self.Wx.shape
        hs = np.empty((N, T, H), dtype="f")
        h = np.zeros((N, H), dtype="f")
        for t in range(T):
            h = np.tanh(np.dot(h, self.Wh) + np.dot(xs[:, t, :], self.Wx) + self.b)
            hs[:, t, :] = h
        return hs


def test_notebook_replays_under_rnn_xp():
    np.random.seed(0)
    # In [2]
    N = 32
    T = 16
    D = 100
    H = 100
    xs = np.random.randn(N, T, D)
    x = xs[:, 0, :]
    assert x.shape == (32, 100)
    # In [3]
    h_prev = np.zeros((N, H))
    Wh = np.random.randn(H, H)
    Wx = np.random.randn(D, H)
    b = np.random.randn(N, H)
    # In [4]
    u = np.dot(h_prev, Wh) + np.dot(x, Wx) + b
    assert u.shape == (32, 100)
    # In [5]
    h_next = np.tanh(u)
    assert h_next.shape == (32, 100)
    # In [7], replaced
    from rnn_xp import RNN, RNNLayer

    # In [8]
    rnn_unit = RNN(Wx, Wh, b)
    res = rnn_unit.forward(x, h_prev)
    # In [9]: every entry True
    assert (res == h_next).all()
    assert all(p is q for p, q in zip(rnn_unit.params, [Wx, Wh, b]))
    # In [10], [11]
    xs = np.random.randn(N, T, D)
    rnn_unit = RNN(Wx, Wh, b)
    # In [12]
    h_0 = np.zeros((N, H))
    h_1 = rnn_unit.forward(xs[:, 0, :], h_0)
    h_2 = rnn_unit.forward(xs[:, 1, :], h_1)
    h_3 = rnn_unit.forward(xs[:, 2, :], h_2)
    assert h_3.shape == (N, H)
    # In [13]
    N, T, D = xs.shape
    # In [14]
    h = np.zeros((N, H), dtype="f")
    hs = np.empty((N, T, H), dtype="f")
    for t in range(T):
        h = rnn_unit.forward(xs[:, t, :], h)
        hs[:, t, :] = h
    # In [15]
    assert hs.shape == (32, 16, 100)
    loop_hs = hs
    # In [16], replaced; In [17]
    rnn_layer = RNNLayer(Wx, Wh, b, stateful=False)
    # In [18]
    hs = rnn_layer.forward(xs)
    # In [19]
    assert hs.shape == (32, 16, 100)

    # The documented difference: the notebook stores hs as float32; rnn_xp keeps
    # the computation dtype, float64 here. The values agree to float32 precision.
    assert hs.dtype == np.float64
    notebook_hs = NotebookRNNLayer(Wx, Wh, b).forward(xs)
    assert notebook_hs.dtype == np.float32
    np.testing.assert_allclose(hs, notebook_hs, atol=1e-6)
    np.testing.assert_allclose(hs, loop_hs, atol=1e-6)
    assert rnn_layer.h.shape == (N, H)
