"""Bad input raises a clear exception and changes nothing.

Shape and device problems raise ValueError; library and dtype problems raise
TypeError. The message names the argument, the expected and the actual value.
"""

from __future__ import annotations

import numpy as np
import pytest

import rnn_xp
from tests.support import make_problem

N, T, D, H = 3, 5, 4, 6


@pytest.fixture
def arrays(backend):
    return make_problem(N, T, D, H).on(backend)


def forward(a, **changes):
    a = a | changes
    return rnn_xp.rnn_forward(a["xs"], a["Wx"], a["Wh"], a["b"], h0=a["h0"])


@pytest.mark.parametrize(
    ("name", "shape", "message"),
    [
        (
            "xs",
            (N, D),
            r"xs: expected shape \(N, T, D=4\) to match Wx of shape \(4, 6\), got \(3, 4\)",
        ),
        ("xs", (N, T, D + 1), r"xs: expected shape \(N, T, D=4\).*got \(3, 5, 5\)"),
        ("xs", (N, 0, D), r"xs: expected at least one time step, got shape \(3, 0, 4\)"),
        ("Wx", (D, H, 1), r"Wx: expected shape \(D, H\), got \(4, 6, 1\)"),
        (
            "Wh",
            (H, H + 1),
            r"Wh: expected shape \(H=6, H=6\) to match Wx of shape \(4, 6\), got \(6, 7\)",
        ),
        ("h0", (N + 1, H), r"h0: expected shape \(N=3, H=6\).*got \(4, 6\)"),
        ("h0", (N, H - 1), r"h0: expected shape \(N=3, H=6\).*got \(3, 5\)"),
        ("h0", (H,), r"h0: expected shape \(N=3, H=6\).*got \(6,\)"),
        ("b", (H + 1,), r"b: expected a shape that broadcasts to \(N=3, H=6\).*got \(7,\)"),
        ("b", (N + 1, H), r"b: expected a shape that broadcasts to \(N=3, H=6\).*got \(4, 6\)"),
        ("b", (1, N, H), r"b: expected a shape that broadcasts to \(N=3, H=6\).*got \(1, 3, 6\)"),
    ],
)
def test_wrong_shape_raises_value_error(backend, arrays, name, shape, message):
    bad = backend.asarray(np.zeros(shape))
    with pytest.raises(ValueError, match=message):
        forward(arrays, **{name: bad})


@pytest.mark.parametrize(
    ("dtype", "kind"),
    [("int64", "int64"), ("int32", "int32"), ("bool", "bool"), ("complex128", "complex128")],
)
@pytest.mark.parametrize("name", ["xs", "Wh", "b", "h0"])
def test_non_real_floating_dtype_raises_type_error(backend, arrays, name, dtype, kind):
    bad = backend.asarray(np.ones(arrays[name].shape, dtype=dtype))
    with pytest.raises(TypeError, match=rf"{name}: expected a real floating dtype .*got .*{kind}"):
        forward(arrays, **{name: bad})


def test_arrays_from_two_libraries_raise_type_error(backend, arrays):
    import array_api_strict

    # An array of another library than the backend's: array_api_strict, or NumPy
    # when the backend is array_api_strict itself.
    other_lib = np if backend.xp is array_api_strict else array_api_strict
    other = other_lib.asarray(np.zeros((H, H)))
    with pytest.raises(
        TypeError, match=r"Wh: expected an array of the same library as xs \(.+\), got"
    ):
        forward(arrays, Wh=other)


def test_non_array_raises_type_error(backend, arrays):
    with pytest.raises(TypeError, match=r"b: expected an array, got float"):
        forward(arrays, b=0.5)
    with pytest.raises(TypeError, match=r"h0: expected an array, got builtins.list"):
        forward(arrays, h0=[[0.0] * H] * N)


def test_arrays_on_two_devices_raise_value_error():
    xp = pytest.importorskip("array_api_strict")
    a = make_problem(N, T, D, H)
    xs = xp.asarray(a.xs)
    Wh = xp.asarray(a.Wh, device=xp.Device("device1"))
    with pytest.raises(
        ValueError,
        match=r"Wh: expected an array on the same device as xs \(.*CPU_DEVICE.*\), got one on .*device1",
    ):
        rnn_xp.rnn_forward(xs, xp.asarray(a.Wx), Wh, xp.asarray(a.b))


def test_torch_cpu_and_meta_tensors_raise_value_error():
    torch = pytest.importorskip("torch")
    a = make_problem(N, T, D, H)
    Wx = torch.zeros((D, H), device="meta", dtype=torch.float64)
    with pytest.raises(
        ValueError,
        match=r"Wx: expected an array on the same device as xs \(cpu\), got one on meta",
    ):
        rnn_xp.rnn_forward(torch.tensor(a.xs), Wx, torch.tensor(a.Wh), torch.tensor(a.b))


def test_stateful_layer_fed_another_batch_size_raises_and_keeps_state(backend):
    p = make_problem(N, T, D, H)
    a = p.on(backend)
    layer = rnn_xp.RNNLayer(a["Wx"], a["Wh"], a["b"], stateful=True)
    layer.forward(a["xs"])
    h, params = layer.h, list(layer.params)
    h_values = backend.to_numpy(h).copy()
    other = backend.asarray(np.zeros((N + 1, T, D)))

    with pytest.raises(
        ValueError,
        match=r"xs: this stateful layer holds a state for batch size N=3, got xs of shape \(4, 5, 4\)",
    ):
        layer.forward(other)

    assert layer.h is h
    np.testing.assert_array_equal(backend.to_numpy(layer.h), h_values)
    assert all(p is q for p, q in zip(layer.params, params))


def test_failed_layer_call_leaves_layer_and_inputs_unchanged(backend):
    p = make_problem(N, T, D, H)
    a = p.on(backend)
    layer = rnn_xp.RNNLayer(a["Wx"], a["Wh"], a["b"], stateful=True)
    layer.forward(a["xs"])
    h, cache, params = layer.h, layer.cache, list(layer.params)
    snapshot = {k: backend.to_numpy(v).copy() for k, v in a.items()}
    bad = backend.asarray(np.zeros((N, T, D + 1)))

    with pytest.raises(ValueError, match="xs: expected shape"):
        layer.forward(bad)
    with pytest.raises(ValueError, match="dhs: expected shape"):
        layer.backward(backend.asarray(np.zeros((N, T, H + 1))))

    assert layer.h is h
    assert layer.cache is cache
    assert layer.grads is None
    assert layer.dh is None
    assert all(p is q for p, q in zip(layer.params, params))
    for k, v in a.items():
        np.testing.assert_array_equal(backend.to_numpy(v), snapshot[k], err_msg=k)


def test_cell_checks_its_inputs(backend):
    a = make_problem(N, T, D, H).on(backend)
    cell = rnn_xp.RNN(a["Wx"], a["Wh"], a["b"])
    with pytest.raises(ValueError, match=r"x: expected shape \(N, D=4\).*got \(3, 5, 4\)"):
        cell.forward(a["xs"], a["h0"])
    with pytest.raises(ValueError, match=r"h_prev: expected shape \(N=3, H=6\).*got \(3, 5, 6\)"):
        cell.forward(a["xs"][:, 0, :], a["dhs"])
    with pytest.raises(RuntimeError, match="call forward first"):
        cell.backward(a["h0"])
    cell.forward(a["xs"][:, 0, :], a["h0"])
    with pytest.raises(ValueError, match=r"dh_next: expected shape \(N=3, H=6\).*got \(3, 5\)"):
        cell.backward(a["h0"][:, :5])
    assert cell.grads is None
