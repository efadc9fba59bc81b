"""Bad input raises a clear exception and changes nothing.

Shape and device problems raise ValueError; library and dtype problems raise
TypeError. The message names the argument, the expected and the actual value.
"""

from __future__ import annotations

import re

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
        match=r"xs: this stateful layer holds a state h for batch size N=3, got xs of shape \(4, 5, 4\)",
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


# -- the sequence model (issue: LSTM/GRU, masks, torch interop) -------------------------


@pytest.fixture
def model(backend):
    like = backend.asarray(np.zeros(1))
    return rnn_xp.Recurrent(
        "lstm", D, H, num_layers=2, batch_first=True, seed=0, like=like, dtype="float64"
    )


def test_unknown_mode_raises_value_error():
    modes = re.escape(", ".join(map(repr, rnn_xp.MODES)))  # 'rnn_tanh', ..., every mode
    with pytest.raises(
        ValueError,
        match=rf"mode: expected one of {modes} or an rnn_xp\.cells\.Cell, got 'transformer'",
    ):
        rnn_xp.Recurrent("transformer", D, H)
    with pytest.raises(
        ValueError, match=r"nonlinearity: expected one of 'tanh', 'relu', got 'sigmoid'"
    ):
        rnn_xp.RNNLayer(np.zeros((D, H)), np.zeros((H, H)), None, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match=r"hidden_size: expected a positive integer, got 0"):
        rnn_xp.Recurrent("gru", D, 0)
    with pytest.raises(ValueError, match=r"dropout: expected a probability in \[0, 1\), got 1.0"):
        rnn_xp.Recurrent("gru", D, H, dropout=1.0)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([5, 0, 2], r"lengths: expected every length in \[1, T=5\], got values from 0 to 5"),
        ([6, 1, 2], r"lengths: expected every length in \[1, T=5\], got values from 1 to 6"),
    ],
)
def test_lengths_out_of_range_raise_value_error(backend, model, values, message):
    xs = backend.asarray(np.zeros((N, T, D)))
    with pytest.raises(ValueError, match=message):
        model.forward(xs, lengths=backend.asarray(np.array(values)))


def test_lengths_of_wrong_type_or_shape_raise(backend, model):
    xs = backend.asarray(np.zeros((N, T, D)))
    with pytest.raises(TypeError, match=r"lengths: expected an integer dtype, got .*float64"):
        model.forward(xs, lengths=backend.asarray(np.array([5.0, 1.0, 2.0])))
    with pytest.raises(ValueError, match=r"lengths: expected shape \(N=3,\), got \(2,\)"):
        model.forward(xs, lengths=backend.asarray(np.array([5, 1])))
    with pytest.raises(
        TypeError, match=r"^lengths: expected an integer array or a sequence of ints"
    ):
        model.forward(xs, lengths=[5, 1, 2.0])
    with pytest.raises(TypeError, match=r"^lengths: expected an array, got builtins.str"):
        model.forward(xs, lengths="512")


def test_mask_of_wrong_shape_or_type_raises(backend, model):
    xs = backend.asarray(np.zeros((N, T, D)))
    with pytest.raises(ValueError, match=r"mask: expected shape \(N=3, T=5\), got \(3, 4\)"):
        model.forward(xs, mask=backend.asarray(np.ones((N, T - 1), dtype=bool)))
    with pytest.raises(TypeError, match=r"mask: expected a boolean dtype, got .*int"):
        model.forward(xs, mask=backend.asarray(np.ones((N, T), dtype=np.int32)))
    with pytest.raises(ValueError, match=r"lengths, mask: expected one of them, got both"):
        model.forward(
            xs,
            lengths=backend.asarray(np.array([1, 2, 3])),
            mask=backend.asarray(np.ones((N, T), dtype=bool)),
        )


def test_model_state_and_shape_errors(backend, model):
    xs = backend.asarray(np.zeros((N, T, D)))
    with pytest.raises(
        ValueError, match=r"xs: expected shape \(N, T, D=4\) with batch_first, got \(3, 5, 7\)"
    ):
        model.forward(backend.asarray(np.zeros((N, T, D + 3))))
    with pytest.raises(TypeError, match=r"h0: expected a pair \(h, c\) for mode 'lstm', got"):
        model.forward(xs, backend.asarray(np.zeros((2, N, H))))
    h0 = backend.asarray(np.zeros((1, N, H)))
    with pytest.raises(
        ValueError,
        match=r"h0: expected shape \(num_layers\*num_directions=2, N=3, H=6\), got \(1, 3, 6\)",
    ):
        model.forward(xs, (h0, h0))
    with pytest.raises(RuntimeError, match="call forward first"):
        model.backward(backend.asarray(np.zeros((N, T, H))))
    model.forward(xs)
    cache, params = model._cache, model.state_dict()
    with pytest.raises(
        ValueError,
        match=r"dout: expected shape \(N=3, T=5, F=6\) to match the forward's output, got \(3, 5, 7\)",
    ):
        model.backward(backend.asarray(np.zeros((N, T, H + 1))))
    assert model._cache is cache
    assert model.grads is None
    assert all(model.state_dict()[k] is v for k, v in params.items())


def test_from_torch_rejects_what_it_cannot_map():
    torch = pytest.importorskip("torch")
    with pytest.raises(
        TypeError,
        match=r"module: expected a torch.nn.RNN, torch.nn.LSTM or torch.nn.GRU, got torch.nn.modules.linear.Linear",
    ):
        rnn_xp.from_torch(torch.nn.Linear(2, 3))
    with pytest.raises(TypeError, match=r"module: expected .* got torch.nn.modules.rnn.LSTMCell"):
        rnn_xp.from_torch(torch.nn.LSTMCell(2, 3))
    assert rnn_xp.from_torch(torch.nn.LSTM(4, 3, proj_size=2)).proj_size == 2  # mapped now
    with pytest.raises(
        TypeError, match=r"module: its parameters are bfloat16, which like.s library cannot hold"
    ):
        rnn_xp.from_torch(torch.nn.GRU(4, 3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"module: its parameters are on the meta device"):
        rnn_xp.from_torch(torch.nn.GRU(4, 3, device="meta"))
    gru = torch.nn.GRU(4, 3, dtype=torch.bfloat16)  # torch holds it: converted exactly
    weight = rnn_xp.from_torch(gru, like=torch.zeros(1)).state_dict()["weight_ih_l0"]
    assert torch.equal(weight, gru.weight_ih_l0.detach())


def lstm_gru_arrays(backend, kind):
    G = 4 if kind == "lstm" else 3
    rng = np.random.default_rng(0)
    return {
        "xs": backend.asarray(rng.standard_normal((N, T, D))),
        "Wx": backend.asarray(rng.standard_normal((D, G * H))),
        "Wh": backend.asarray(rng.standard_normal((H, G * H))),
        "b": backend.asarray(rng.standard_normal(G * H)),
    }


def run_kind(kind, a):
    if kind == "lstm":
        return rnn_xp.lstm_forward(a["xs"], a["Wx"], a["Wh"], a["b"])
    return rnn_xp.gru_forward(a["xs"], a["Wx"], a["Wh"], a["b"], a["b"])


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_lstm_and_gru_check_their_inputs(backend, kind):
    G = 4 if kind == "lstm" else 3
    a = lstm_gru_arrays(backend, kind)
    with pytest.raises(ValueError, match=rf"Wx: expected shape \(D, {G}\*H\), got \(4, 7\)"):
        run_kind(kind, a | {"Wx": backend.asarray(np.zeros((D, 7)))})
    with pytest.raises(
        ValueError,
        match=rf"Wh: expected shape \(H=6, {G}\*H={G * H}\) to match Wx of shape \(4, {G * H}\), got \(6, 6\)",
    ):
        run_kind(kind, a | {"Wh": backend.asarray(np.zeros((H, H)))})
    with pytest.raises(
        ValueError,
        match=rf"b[xh]?: expected a shape that broadcasts to \(N=3, H={G * H}\).*got \(6,\)",
    ):
        run_kind(kind, a | {"b": backend.asarray(np.zeros(H))})
    with pytest.raises(TypeError, match=r"xs: expected a real floating dtype .*got .*int"):
        run_kind(kind, a | {"xs": backend.asarray(np.zeros((N, T, D), dtype=np.int64))})


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_failed_lstm_or_gru_layer_call_keeps_state(backend, kind):
    a = lstm_gru_arrays(backend, kind)
    layer = (
        rnn_xp.LSTMLayer(a["Wx"], a["Wh"], a["b"], stateful=True)
        if kind == "lstm"
        else rnn_xp.GRULayer(a["Wx"], a["Wh"], a["b"], a["b"], stateful=True)
    )
    layer.forward(a["xs"])
    before = (layer.h, getattr(layer, "c", None), layer.cache, list(layer.params))
    with pytest.raises(
        ValueError,
        match=r"xs: this stateful layer holds a state h for batch size N=3, got xs of shape \(2, 5, 4\)",
    ):
        layer.forward(backend.asarray(np.zeros((N - 1, T, D))))
    with pytest.raises(ValueError, match=r"dhs: expected shape \(N=3, T=5, H=6\)"):
        layer.backward(backend.asarray(np.zeros((N, T, H + 1))))
    after = (layer.h, getattr(layer, "c", None), layer.cache, list(layer.params))
    assert all(x is y for x, y in zip(before[:3], after[:3]))
    assert all(x is y for x, y in zip(before[3], after[3]))
    assert layer.grads is None
