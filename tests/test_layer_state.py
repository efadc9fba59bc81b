"""The layer's hidden state: stateful carry-over, resets, and the initial-state gradient."""

from __future__ import annotations

import numpy as np

import rnn_xp
from tests.support import assert_close, make_problem, ref_backward, ref_forward


def test_stateful_layer_over_two_halves_equals_one_run(backend, dtype):
    p = make_problem(T=8, dtype=dtype)
    a = p.on(backend)
    whole = rnn_xp.RNNLayer(a["Wx"], a["Wh"], a["b"])
    halves = rnn_xp.RNNLayer(a["Wx"], a["Wh"], a["b"], stateful=True)

    hs = backend.to_numpy(whole.forward(a["xs"]))
    first = backend.to_numpy(halves.forward(a["xs"][:, :4, :]))
    second = backend.to_numpy(halves.forward(a["xs"][:, 4:, :]))

    assert_close(np.concatenate([first, second], axis=1), hs, dtype, "hs")
    assert_close(backend.to_numpy(halves.h), hs[:, -1], dtype, "h")


def test_stateless_layer_starts_every_call_from_zeros(backend):
    p = make_problem()
    a = p.on(backend)
    layer = rnn_xp.RNNLayer(a["Wx"], a["Wh"], a["b"])
    layer.set_state(a["h0"])  # ignored: the layer is not stateful

    first = backend.to_numpy(layer.forward(a["xs"]))
    second = backend.to_numpy(layer.forward(a["xs"]))

    expected = ref_forward(p.xs, p.Wx, p.Wh, p.b, np.zeros_like(p.h0))
    assert_close(first, expected, "float64", "first call")
    assert_close(second, expected, "float64", "second call")


def test_set_state_and_reset_state(backend):
    p = make_problem()
    a = p.on(backend)
    layer = rnn_xp.RNNLayer(a["Wx"], a["Wh"], a["b"], stateful=True)

    layer.set_state(a["h0"])
    from_h0 = backend.to_numpy(layer.forward(a["xs"]))
    layer.reset_state()
    assert layer.h is None
    from_zeros = backend.to_numpy(layer.forward(a["xs"]))

    assert_close(from_h0, ref_forward(p.xs, p.Wx, p.Wh, p.b, p.h0), "float64", "from h0")
    assert_close(
        from_zeros,
        ref_forward(p.xs, p.Wx, p.Wh, p.b, np.zeros_like(p.h0)),
        "float64",
        "from zeros",
    )


def test_stateful_backward_gives_gradient_of_carried_state(backend):
    p = make_problem()
    a = p.on(backend)
    layer = rnn_xp.RNNLayer(a["Wx"], a["Wh"], a["b"], stateful=True)
    layer.set_state(a["h0"])
    layer.forward(a["xs"])
    dxs = layer.backward(a["dhs"])

    ref_hs = ref_forward(p.xs, p.Wx, p.Wh, p.b, p.h0)
    ref_dxs, ref_dh0, *_ = ref_backward(p.dhs, p.xs, ref_hs, p.Wx, p.Wh, p.b, p.h0)
    assert_close(backend.to_numpy(dxs), ref_dxs, "float64", "dxs")
    assert_close(backend.to_numpy(layer.dh), ref_dh0, "float64", "dh")
