"""Every backend agrees with the NumPy float64 reference, forward and backward."""

from __future__ import annotations

import numpy as np
import pytest
from array_api_compat import array_namespace, device

import rnn_xp
from tests.support import BIAS_SHAPES, assert_close, make_problem, ref_backward, ref_forward


def assert_native(out, backend, dtype, what):
    """``out`` is an array of the backend's library, in ``dtype``, on its device."""
    assert array_namespace(out) is backend.xp, f"{what}: wrong library {type(out)}"
    assert out.dtype == getattr(backend.xp, dtype), f"{what}: dtype {out.dtype} != {dtype}"
    assert device(out) == backend.device, f"{what}: device {device(out)} != {backend.device}"


@pytest.mark.parametrize("bias", list(BIAS_SHAPES))
def test_layer_forward_and_backward_match_reference(backend, dtype, bias):
    p = make_problem(bias=bias, dtype=dtype)
    a = p.on(backend)

    hs, h_n = rnn_xp.rnn_forward(a["xs"], a["Wx"], a["Wh"], a["b"], h0=a["h0"])
    grads = rnn_xp.rnn_backward(
        a["dhs"], a["xs"], hs, a["Wx"], a["Wh"], a["b"], h0=a["h0"], dh_n=a["dh_n"]
    )

    ref_hs = ref_forward(p.xs, p.Wx, p.Wh, p.b, p.h0)
    ref_grads = ref_backward(p.dhs, p.xs, ref_hs, p.Wx, p.Wh, p.b, p.h0, p.dh_n)
    for name, out, ref in [
        ("hs", hs, ref_hs),
        ("h_n", h_n, ref_hs[:, -1]),
        *zip(["dxs", "dh0", "dWx", "dWh", "db"], grads, ref_grads),
    ]:
        assert_native(out, backend, dtype, name)
        assert_close(backend.to_numpy(out), ref, dtype, name)


def test_layer_class_matches_reference(backend, dtype):
    p = make_problem(bias="NH", dtype=dtype)
    a = p.on(backend)
    layer = rnn_xp.RNNLayer(a["Wx"], a["Wh"], a["b"])

    hs = layer.forward(a["xs"])
    dxs = layer.backward(a["dhs"])

    zeros = np.zeros_like(p.h0)
    ref_hs = ref_forward(p.xs, p.Wx, p.Wh, p.b, zeros)
    ref_dxs, ref_dh0, *ref_grads = ref_backward(p.dhs, p.xs, ref_hs, p.Wx, p.Wh, p.b, zeros)
    assert_close(backend.to_numpy(hs), ref_hs, dtype, "hs")
    assert_close(backend.to_numpy(layer.h), ref_hs[:, -1], dtype, "h")
    assert_close(backend.to_numpy(dxs), ref_dxs, dtype, "dxs")
    assert_close(backend.to_numpy(layer.dh), ref_dh0, dtype, "dh")
    for name, g, ref, param in zip(["dWx", "dWh", "db"], layer.grads, ref_grads, layer.params):
        assert g.shape == param.shape, name
        assert_native(g, backend, dtype, name)
        assert_close(backend.to_numpy(g), ref, dtype, name)


def test_cell_forward_and_backward_match_reference(backend, dtype):
    p = make_problem(bias="NH", dtype=dtype)
    a = p.on(backend)
    x, h_prev, dh_next = a["xs"][:, 0, :], a["h0"], a["dh_n"]
    cell = rnn_xp.RNN(a["Wx"], a["Wh"], a["b"])

    h_next = cell.forward(x, h_prev)
    dx, dh_prev = cell.backward(dh_next)

    ref_hs = ref_forward(p.xs[:, :1], p.Wx, p.Wh, p.b, p.h0)
    ref_dxs, ref_dh_prev, *ref_grads = ref_backward(
        p.dh_n[:, None, :], p.xs[:, :1], ref_hs, p.Wx, p.Wh, p.b, p.h0
    )
    for name, out, ref in [
        ("h_next", h_next, ref_hs[:, 0]),
        ("dx", dx, ref_dxs[:, 0]),
        ("dh_prev", dh_prev, ref_dh_prev),
        *zip(["dWx", "dWh", "db"], cell.grads, ref_grads),
    ]:
        assert_native(out, backend, dtype, name)
        assert_close(backend.to_numpy(out), ref, dtype, name)


def test_mixed_precision_computes_in_result_type(backend):
    p = make_problem(dtype="float32")
    a = p.on(backend)
    Wx64 = backend.asarray(p.Wx)  # float64

    hs, _ = rnn_xp.rnn_forward(a["xs"], Wx64, a["Wh"], a["b"])
    dxs, dh0, dWx, dWh, _ = rnn_xp.rnn_backward(a["dhs"], a["xs"], hs, Wx64, a["Wh"], a["b"])

    assert_native(hs, backend, "float64", "hs")
    # Each gradient comes back in the dtype of what it is the gradient of.
    assert_native(dxs, backend, "float32", "dxs")
    assert_native(dWx, backend, "float64", "dWx")
    assert_native(dWh, backend, "float32", "dWh")
    assert_native(dh0, backend, "float64", "dh0")  # h0 omitted: computation dtype
    ref = ref_forward(p.xs, p.Wx, p.Wh, p.b, np.zeros_like(p.h0))
    assert_close(backend.to_numpy(hs), ref, "float64", "hs")


def test_inputs_are_left_untouched(backend):
    p = make_problem(bias="NH")
    a = p.on(backend)
    before = {k: backend.to_numpy(v).copy() for k, v in a.items()}
    layer = rnn_xp.RNNLayer(a["Wx"], a["Wh"], a["b"], stateful=True)
    layer.set_state(a["h0"])
    hs = layer.forward(a["xs"])
    layer.backward(a["dhs"])
    rnn_xp.rnn_backward(
        a["dhs"], a["xs"], hs, a["Wx"], a["Wh"], a["b"], h0=a["h0"], dh_n=a["dh_n"]
    )
    for k, v in a.items():
        np.testing.assert_array_equal(backend.to_numpy(v), before[k], err_msg=k)
