"""Elman (tanh, relu, no bias), LSTM and GRU cells and layers on every backend."""

from __future__ import annotations

import numpy as np
import pytest

import rnn_xp
from rnn_xp._backends import BACKENDS
from tests.support import assert_close, ref_forward, ref_gru_forward, ref_lstm_forward

NUMPY = BACKENDS["numpy"].load()
N, T, D, H = 3, 5, 4, 6


def draw(kind: str, bias: bool, dtype: str, seed: int = 0) -> dict:
    """Float64 arrays already rounded to ``dtype``: inputs, states and output gradients."""
    rng = np.random.default_rng(seed)
    G = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}[kind]

    def r(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(dtype).astype(np.float64)

    arrays = {
        "xs": r(N, T, D),
        "Wx": r(D, G * H, scale=D**-0.5),
        "Wh": r(H, G * H, scale=H**-0.5),
        "bx": r(G * H, scale=0.5) if bias else None,
        "bh": r(G * H, scale=0.5) if bias and kind == "gru" else None,
        "h0": r(N, H, scale=0.5),
        "c0": r(N, H, scale=0.5) if kind == "lstm" else None,
        "dhs": r(N, T, H),
        "dh_n": r(N, H),
        "dc_n": r(N, H) if kind == "lstm" else None,
    }
    return arrays


def run_layer(kind: str, a: dict) -> list:
    """Forward and backward of the sequence function of ``kind``; every output, in order."""
    if kind.startswith("rnn"):
        nl = kind.removeprefix("rnn_")
        hs, h_n = rnn_xp.rnn_forward(a["xs"], a["Wx"], a["Wh"], a["bx"], a["h0"], nonlinearity=nl)
        grads = rnn_xp.rnn_backward(
            a["dhs"], a["xs"], hs, a["Wx"], a["Wh"], a["bx"], a["h0"], a["dh_n"], nonlinearity=nl
        )
        return [hs, h_n, *grads]
    if kind == "lstm":
        hs, h_n, c_n, cache = rnn_xp.lstm_forward(
            a["xs"], a["Wx"], a["Wh"], a["bx"], a["h0"], a["c0"]
        )
        return [hs, h_n, c_n, *rnn_xp.lstm_backward(a["dhs"], cache, a["dh_n"], a["dc_n"])]
    hs, h_n, cache = rnn_xp.gru_forward(a["xs"], a["Wx"], a["Wh"], a["bx"], a["bh"], a["h0"])
    return [hs, h_n, *rnn_xp.gru_backward(a["dhs"], cache, a["dh_n"])]


def reference_hs(kind: str, a: dict) -> np.ndarray:
    if kind == "rnn_tanh":
        return ref_forward(a["xs"], a["Wx"], a["Wh"], 0 if a["bx"] is None else a["bx"], a["h0"])
    if kind == "rnn_relu":
        h, hs = a["h0"], []
        for t in range(T):
            h = np.maximum(
                h @ a["Wh"] + a["xs"][:, t] @ a["Wx"] + (0 if a["bx"] is None else a["bx"]), 0
            )
            hs.append(h)
        return np.stack(hs, axis=1)
    if kind == "lstm":
        return ref_lstm_forward(a["xs"], a["Wx"], a["Wh"], a["bx"], a["h0"], a["c0"])[0]
    return ref_gru_forward(a["xs"], a["Wx"], a["Wh"], a["bx"], a["bh"], a["h0"])


KINDS = ["rnn_tanh", "rnn_relu", "lstm", "gru"]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("kind", KINDS)
def test_layer_matches_numpy_float64(backend, dtype, kind, bias):
    a = draw(kind, bias, dtype)
    on_backend = {k: None if v is None else backend.asarray(v.astype(dtype)) for k, v in a.items()}

    outputs = run_layer(kind, on_backend)
    expected = run_layer(kind, a)  # rnn_xp on NumPy float64

    assert_close(NUMPY.to_numpy(expected[0]), reference_hs(kind, a), "float64", "reference hs")
    assert len(outputs) == len(expected)
    for i, (out, ref) in enumerate(zip(outputs, expected)):
        assert (out is None) == (ref is None), i
        if out is not None:
            assert out.dtype == getattr(backend.xp, dtype), i
            assert_close(backend.to_numpy(out), ref, dtype, f"output {i}")


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_relu"])
def test_cell_backward_equals_one_step_layer(backend, kind):
    a = {
        k: None if v is None else backend.asarray(v)
        for k, v in draw(kind, True, "float64").items()
    }
    x, h, c = a["xs"][:, 0, :], a["h0"], a["c0"]
    one = dict(a, xs=a["xs"][:, :1, :], dhs=a["dh_n"][:, None, :], dh_n=None, dc_n=None)
    layer = run_layer(kind, one)
    if kind == "lstm":
        cell = rnn_xp.LSTM(a["Wx"], a["Wh"], a["bx"])
        h_next, c_next = cell.forward(x, h, c)
        dx, dh_prev, dc_prev = cell.backward(a["dh_n"], backend.asarray(np.zeros((N, H))))
        got = [h_next, c_next, dx, dh_prev, dc_prev, *cell.grads]
        want = [layer[1], layer[2], layer[3][:, 0, :], layer[4], layer[5], *layer[6:]]
    elif kind == "gru":
        cell = rnn_xp.GRU(a["Wx"], a["Wh"], a["bx"], a["bh"])
        h_next = cell.forward(x, h)
        dx, dh_prev = cell.backward(a["dh_n"])
        got = [h_next, dx, dh_prev, *cell.grads]
        want = [layer[1], layer[2][:, 0, :], layer[3], *layer[4:]]
    else:
        cell = rnn_xp.RNN(a["Wx"], a["Wh"], a["bx"], nonlinearity="relu")
        h_next = cell.forward(x, h)
        dx, dh_prev = cell.backward(a["dh_n"])
        got = [h_next, dx, dh_prev, *cell.grads]
        want = [layer[1], layer[2][:, 0, :], layer[3], *layer[4:]]
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(backend.to_numpy(g), backend.to_numpy(w), "float64", f"output {i}")


def test_lstm_layer_state_rules(backend):
    a = {
        k: None if v is None else backend.asarray(v)
        for k, v in draw("lstm", True, "float64").items()
    }
    whole = rnn_xp.LSTMLayer(a["Wx"], a["Wh"], a["bx"])
    halves = rnn_xp.LSTMLayer(a["Wx"], a["Wh"], a["bx"], stateful=True)
    hs = backend.to_numpy(whole.forward(a["xs"]))
    first = backend.to_numpy(halves.forward(a["xs"][:, :2, :]))
    second = backend.to_numpy(halves.forward(a["xs"][:, 2:, :]))
    assert_close(np.concatenate([first, second], axis=1), hs, "float64", "halves")
    assert_close(backend.to_numpy(halves.c), backend.to_numpy(whole.c), "float64", "c")

    # set_state(h) without c means c = 0.
    only_h = rnn_xp.LSTMLayer(a["Wx"], a["Wh"], a["bx"], stateful=True)
    only_h.set_state(a["h0"])
    got = backend.to_numpy(only_h.forward(a["xs"]))
    ref = ref_lstm_forward(
        *(backend.to_numpy(a[k]) for k in ("xs", "Wx", "Wh", "bx", "h0")), np.zeros((N, H))
    )[0]
    assert_close(got, ref, "float64", "c=None means zeros")
    only_h.backward(a["dhs"])
    assert only_h.dh.shape == (N, H)
    assert only_h.dc.shape == (N, H)
    assert [tuple(g.shape) for g in only_h.grads] == [(D, 4 * H), (H, 4 * H), (4 * H,)]


def test_gru_layer_grads_and_dh(backend):
    a = {
        k: None if v is None else backend.asarray(v)
        for k, v in draw("gru", True, "float64").items()
    }
    layer = rnn_xp.GRULayer(a["Wx"], a["Wh"], a["bx"], a["bh"], stateful=True)
    layer.set_state(a["h0"])
    layer.forward(a["xs"])
    dxs = layer.backward(a["dhs"])
    _, _, cache = rnn_xp.gru_forward(a["xs"], a["Wx"], a["Wh"], a["bx"], a["bh"], a["h0"])
    want = rnn_xp.gru_backward(a["dhs"], cache)
    for name, g, w in zip(
        ["dxs", "dh", "dWx", "dWh", "dbx", "dbh"], [dxs, layer.dh, *layer.grads], want
    ):
        assert_close(backend.to_numpy(g), backend.to_numpy(w), "float64", name)


@pytest.mark.parametrize("kind", KINDS)
def test_layer_gradients_match_finite_differences(kind):
    # Fewer sequences and steps than elsewhere: every entry is perturbed twice.
    a = {
        k: v if v is None or k in ("Wx", "Wh", "bx", "bh") else v[:2]
        for k, v in draw(kind, True, "float64").items()
    }
    a["xs"], a["dhs"] = a["xs"][:, :3], a["dhs"][:, :3]
    outputs = run_layer(kind, a)
    n_fwd = 3 if kind == "lstm" else 2  # hs, h_n (, c_n): the rest are gradients
    # The order in which run_layer returns the gradients.
    inputs = {
        "lstm": ["xs", "h0", "c0", "Wx", "Wh", "bx"],
        "gru": ["xs", "h0", "Wx", "Wh", "bx", "bh"],
    }.get(kind, ["xs", "h0", "Wx", "Wh", "bx"])

    def loss(arrays):
        out = run_layer(kind, arrays)[:n_fwd]
        cot = [arrays["dhs"], arrays["dh_n"], arrays["dc_n"]][:n_fwd]
        return sum(float(np.sum(o * c)) for o, c in zip(out, cot))

    eps = 1e-6
    for name, grad in zip(inputs, outputs[n_fwd:]):
        value = a[name]
        numeric = np.empty_like(value)
        for i in np.ndindex(value.shape):
            up, down = value.copy(), value.copy()
            up[i] += eps
            down[i] -= eps
            numeric[i] = (loss(a | {name: up}) - loss(a | {name: down})) / (2 * eps)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8, err_msg=f"{kind} {name}")
