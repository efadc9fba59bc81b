"""Regressions for silent wrong answers found by an adversarial look at the Python API.

Each was a plausible call that returned a wrong result, or a traceback, instead
of the right answer or one clear refusal. `tests/test_invariant.py` covers the
whole input space for the fast/generic agreement; these pin the reported cases
against independent references, on every backend.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import rnn_xp
from tests.support import assert_close, ref_gru_forward, ref_lstm_forward, two_states

N, T, D, H = 3, 4, 2, 5
ONE_COLUMN = {"(1,)": (1,), "(N, 1)": (N, 1), "(1, 1)": (1, 1), "0-d": ()}


@pytest.mark.parametrize("shape", list(ONE_COLUMN.values()), ids=list(ONE_COLUMN))
def test_lstm_and_gru_bias_of_one_column_adds_to_every_gate(backend, shape):
    # The fused loops halve the sigmoid gates' bias columns; a bias of one
    # column broadcast over all gates used to be halved for every gate (or
    # raised IndexError when 0-d).
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((N, T, D))
    b = np.full(shape, 0.7)
    full = np.broadcast_to(b, (N, 1)) + np.zeros((N, 4 * H))
    Wx, Wh = rng.standard_normal((D, 4 * H)), rng.standard_normal((H, 4 * H)) / np.sqrt(H)
    zero = np.zeros((N, H))
    a = {k: backend.asarray(v) for k, v in {"xs": xs, "Wx": Wx, "Wh": Wh, "b": b}.items()}

    hs, _, _, _ = rnn_xp.lstm_forward(a["xs"], a["Wx"], a["Wh"], a["b"])
    want, _ = ref_lstm_forward(xs, Wx, Wh, full, zero, zero)
    assert_close(backend.to_numpy(hs), want, "float64", "lstm hs")

    G = 3 * H
    hs, _, _ = rnn_xp.gru_forward(a["xs"], a["Wx"][:, :G], a["Wh"][:, :G], a["b"], a["b"])
    want = ref_gru_forward(xs, Wx[:, :G], Wh[:, :G], full[:, :G], full[:, :G], zero)
    assert_close(backend.to_numpy(hs), want, "float64", "gru hs")


@pytest.mark.parametrize("padding", ["lengths", "mask"])
@pytest.mark.parametrize("mode", list(rnn_xp.MODES))
def test_nan_in_padded_steps_reaches_no_output_or_gradient(backend, mode, padding):
    # NaN is a common padding value. A padded step is absent: its content must
    # not matter, while 0 * NaN is NaN in any masked product.
    rng = np.random.default_rng(1)
    like = backend.asarray(np.zeros(1))
    model = rnn_xp.Recurrent(
        mode, D, H, 2, batch_first=True, bidirectional=True, seed=0, like=like, dtype="float64"
    )
    n = np.array([4, 1, 3])
    valid = np.arange(T)[None, :] < n[:, None]
    if padding == "mask":
        valid[2, 0] = False  # a gap at the start, as left padding leaves
    xs, dout = rng.standard_normal((N, T, D)), rng.standard_normal((N, T, 2 * H))
    steps = {"lengths": n} if padding == "lengths" else {"mask": valid}
    steps = {k: backend.asarray(v) for k, v in steps.items()}

    def run(pad):
        x, d = xs.copy(), dout.copy()
        x[~valid], d[~valid] = pad, pad
        out, _ = model.forward(backend.asarray(x), **steps)
        dxs = model.backward(backend.asarray(d))
        return backend.to_numpy_all([out, dxs, *model.grads.values()])

    clean, poisoned = run(0.0), run(np.nan)
    for i, (want, got) in enumerate(zip(clean, poisoned)):
        assert np.isfinite(got).all(), f"result {i} holds NaN"
        assert_close(got, want, "float64", f"result {i}")


ODD = {
    "matrix": (np.matrix, r"numpy\.matrix, whose \* is a matrix product"),
    "masked": (np.ma.masked_array, r"numpy\.ma\.MaskedArray, whose mask would be ignored"),
}


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
@pytest.mark.parametrize("odd", list(ODD))
@pytest.mark.parametrize("name", ["x", "h_prev", "Wx", "b"])
def test_numpy_matrix_and_masked_arrays_are_refused(name, odd):
    # On np.matrix `*` is a matrix product, and a masked array's mask would be
    # ignored: the LSTM's elementwise algebra would compute something else.
    rng = np.random.default_rng(2)
    a = {
        "x": rng.standard_normal((N, D)),
        "h_prev": rng.standard_normal((N, H)),
        "c_prev": rng.standard_normal((N, H)),
        "Wx": rng.standard_normal((D, 4 * H)),
        "Wh": rng.standard_normal((H, 4 * H)),
        "b": rng.standard_normal((1, 4 * H)),
    }
    make, what = ODD[odd]
    with pytest.raises(TypeError, match=rf"{name}: expected a plain array, got {what}"):
        rnn_xp.lstm_cell_forward(**(a | {name: make(a[name])}))


def test_load_state_dict_gives_arrays_the_models_dtype_and_library(tmp_path):
    model = rnn_xp.Recurrent("gru", D, H, seed=0, dtype="float32")
    wider = {k: v.astype(np.float64) + 1e-9 for k, v in model.state_dict().items()}
    model.load_state_dict(wider)
    for name, value in model.state_dict().items():
        assert value.dtype == np.float32, name
        np.testing.assert_array_equal(value, wider[name].astype(np.float32), err_msg=name)
    xs = np.random.default_rng(3).standard_normal((2, N, D)).astype(np.float32)
    assert model.forward(xs)[0].dtype == np.float32
    model.save(tmp_path / "w.npz")
    again = rnn_xp.load(tmp_path / "w.npz")
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[name], value, err_msg=name)
        assert again.state_dict()[name].dtype == value.dtype


def test_load_state_dict_moves_numpy_arrays_and_refuses_other_libraries():
    torch = pytest.importorskip("torch")
    strict = pytest.importorskip("array_api_strict")
    model = rnn_xp.Recurrent("lstm", D, H, seed=0, like=torch.zeros(1), dtype="float64")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from_numpy = {k: v.numpy().astype(np.float32) for k, v in before.items()}
    model.load_state_dict(from_numpy)
    for name, value in model.state_dict().items():
        assert isinstance(value, torch.Tensor)
        assert value.dtype == torch.float64, name

    other = dict(from_numpy, weight_hh_l0=strict.asarray(from_numpy["weight_hh_l0"]))
    kept = model.state_dict()
    with pytest.raises(
        TypeError,
        match=r"weight_hh_l0: expected an array of the model's library \(array_api_compat\.torch\) "
        r"or a NumPy array, got array_api_strict",
    ):
        model.load_state_dict(other)
    assert all(model.state_dict()[k] is v for k, v in kept.items())  # nothing replaced


def test_autograd_recording_only_a_bias_or_a_state_takes_the_generic_path():
    # The fused backward writes in place, which autograd refuses: it must
    # notice any recorded input of the forward, not only xs and the weights.
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    x = torch.tensor(rng.standard_normal((T, N, D)))
    for mode in rnn_xp.MODES:
        model = rnn_xp.Recurrent(mode, D, H, seed=0, like=x, dtype="float64")
        h0 = torch.tensor(rng.standard_normal((1, N, H)), requires_grad=True)
        state = (h0, torch.zeros(1, N, H, dtype=torch.float64)) if two_states(mode) else h0
        out, _ = model.forward(x, state)
        dxs = model.backward(torch.ones_like(out))
        plain = rnn_xp.Recurrent(mode, D, H, seed=0, like=x, dtype="float64")
        out0, _ = plain.forward(
            x, tuple(s.detach() for s in state) if two_states(mode) else h0.detach()
        )
        assert_close(out.detach().numpy(), out0.numpy(), "float64", mode)
        dxs0 = plain.backward(torch.ones_like(out0))
        assert_close(dxs.detach().numpy(), dxs0.numpy(), "float64", mode)


@pytest.mark.parametrize("mode", list(rnn_xp.MODES))
def test_changing_the_output_in_place_leaves_the_gradients_alone(mode):
    # The fused loops keep views of their output buffer for backward; the
    # caller's output is a copy of its own (as the generic loop's is).
    rng = np.random.default_rng(5)
    xs = rng.standard_normal((N, T, D))
    model = rnn_xp.Recurrent(mode, D, H, seed=0, dtype="float64", batch_first=True)

    def grads(scale):
        out, _ = model.forward(xs)
        out *= scale
        model.backward(np.ones_like(out))
        return dict(model.grads)

    want, got = grads(1.0), grads(2.0)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_a_float64_model_where_jax_has_no_float64_is_refused():
    # Without jax_enable_x64, JAX makes float64 arrays float32 with only a
    # warning: the model would say float64 and compute in float32. A fresh
    # process: the test matrix turns x64 on for its JAX rows.
    pytest.importorskip("jax")
    code = (
        "import jax.numpy as jnp, rnn_xp\n"
        "try:\n"
        "    rnn_xp.Recurrent('gru', 2, 3, like=jnp.zeros(1), dtype='float64')\n"
        "except TypeError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert result.stdout.strip() == (
        "dtype: jax.numpy makes float64 arrays float32 here; enable it first: "
        "jax.config.update('jax_enable_x64', True)"
    )


@pytest.mark.parametrize("index", ["uint8", "uint16", "uint32", "uint64", "int8", "int32"])
def test_lengths_of_any_integer_dtype(backend, index):
    # torch has almost no operations on uint16/32/64, and array_api_strict does
    # not compare uint64 with int64: the lengths are widened first.
    rng = np.random.default_rng(6)
    xs = rng.standard_normal((N, T, D))
    n = np.array([T, 2, 1])
    numpy_model = rnn_xp.Recurrent("gru", D, H, batch_first=True, seed=0, dtype="float64")
    want = numpy_model.forward(xs, lengths=n)[0]
    like = backend.asarray(np.zeros(1))
    model = rnn_xp.Recurrent("gru", D, H, batch_first=True, seed=0, like=like, dtype="float64")
    got = model.forward(backend.asarray(xs), lengths=backend.asarray(n.astype(index)))[0]
    assert_close(backend.to_numpy(got), want, "float64", index)


def test_lengths_under_jax_jit():
    # Traced lengths cannot be read on the host to check their range; the
    # masked forward is defined for any value, and agrees with the eager one.
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    xs = np.random.default_rng(7).standard_normal((N, T, D))
    n = np.array([T, 2, 1])
    model = rnn_xp.Recurrent(
        "lstm", D, H, batch_first=True, seed=0, like=jax.numpy.zeros(1), dtype="float64"
    )
    jitted = jax.jit(lambda x, lengths: model.forward(x, lengths=lengths, inference=True)[0])
    eager = model.forward(jax.numpy.asarray(xs), lengths=jax.numpy.asarray(n))[0]
    got = jitted(jax.numpy.asarray(xs), jax.numpy.asarray(n))
    assert_close(np.asarray(got), np.asarray(eager), "float64", "out")


def test_more_arguments_get_one_clear_error_naming_them(tmp_path):
    torch = pytest.importorskip("torch")
    layer = rnn_xp.LSTMLayer(np.zeros((D, 4 * H)), np.zeros((H, 4 * H)), None, stateful=True)
    for args, error, message in [
        (([[0.0] * H] * N,), TypeError, r"h: expected an array, got builtins\.list"),
        ((np.zeros((N, H), int),), TypeError, r"h: expected a real floating dtype"),
        ((np.zeros((N, H + 1)),), ValueError, r"h: expected shape \(N=3, H=5\) to match Wh"),
        ((np.zeros((N, H)), np.zeros((N + 1, H))), ValueError, r"c: expected shape \(N=3, H=5\)"),
    ]:
        with pytest.raises(error, match=message):
            layer.set_state(*args)
        assert layer.h is None  # nothing set
    model = rnn_xp.Recurrent("gru", D, H, seed=0)
    with pytest.raises(TypeError, match=r"xs: expected an array of the model's library"):
        model.forward(torch.zeros(T, N, D))
    for kwargs, error, message in [
        ({"seed": -1}, ValueError, r"seed: expected None or a non-negative integer, got -1"),
        ({"seed": 1.5}, TypeError, r"seed: expected None or a non-negative integer, got 1\.5"),
        ({"dropout": "0.1"}, ValueError, r"dropout: expected a probability in \[0, 1\)"),
        ({"like": [1.0]}, TypeError, r"like: expected an array .* got builtins\.list"),
        ({"dtype": torch.float32}, TypeError, r"dtype: expected a real floating dtype of"),
    ]:
        with pytest.raises(error, match=message):
            rnn_xp.Recurrent("gru", D, H, **kwargs)
    with pytest.raises(TypeError, match=r"cache: expected the cache the forward returned"):
        rnn_xp.lstm_backward(np.zeros((N, T, H)), "cache")
    masked = np.ma.masked_array(np.zeros(3), mask=[0, 1, 0])
    with pytest.raises(TypeError, match=r"extra: 'a': expected a plain array, got numpy\.ma"):
        model.save(tmp_path / "w.npz", extra={"a": masked})
    assert not list(tmp_path.iterdir())


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_optimizers_refuse_numpy_matrix():
    from rnn_xp.optim import SGD, Adam, clip_by_global_norm

    w = np.matrix([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(TypeError, match=r"w: expected a plain array, got numpy\.matrix"):
        clip_by_global_norm({"w": w}, None)
    for optimizer in (SGD(), Adam()):
        with pytest.raises(TypeError, match=r"w: expected a plain array, got numpy\.matrix"):
            optimizer.step({"w": w}, {"w": np.ones((2, 2))})


def test_dask_inference_checks_the_whole_arrays_before_any_task():
    # A task sees only its chunk: a check there would name the chunk's sizes,
    # and only when the result is computed.
    da = pytest.importorskip("dask.array")
    model = rnn_xp.Recurrent("lstm", D, H, batch_first=True, seed=0, dtype="float64").eval()
    xs = da.from_array(np.zeros((4, T, D)), chunks=(2, T, D))
    n = np.array([T, 2, 3, 1])
    for kwargs, error, message in [
        ({"lengths": n + 5}, ValueError, r"lengths: expected every length in \[1, T=4\]"),
        ({"lengths": n, "mask": np.ones((4, T), bool)}, ValueError, r"expected one of them"),
        ({"lengths": n.astype(float)}, TypeError, r"lengths: expected an integer dtype"),
        ({"h0": (np.zeros((1, 3, H)),) * 2}, ValueError, r"h0: expected shape .*N=4"),
    ]:
        kwargs = {
            k: tuple(da.from_array(s) for s in v) if isinstance(v, tuple) else da.from_array(v)
            for k, v in kwargs.items()
        }
        with pytest.raises(error, match=message):
            model.forward(xs, inference=True, **kwargs)


def test_dask_inference_with_a_bias_per_sequence_and_numpy_weights():
    # The README lets Dask inputs take NumPy weights; a bias of one row per
    # sequence is split along the batch with the input.
    da = pytest.importorskip("dask.array")
    rng = np.random.default_rng(8)
    xs = rng.standard_normal((4, T, D))
    Wx, Wh = rng.standard_normal((D, 3 * H)), rng.standard_normal((H, 3 * H)) / np.sqrt(H)
    bx, bh = rng.standard_normal((4, 3 * H)), rng.standard_normal((1, 3 * H))
    want = rnn_xp.gru_forward(xs, Wx, Wh, bx, bh, inference=True)[0]
    lazy = rnn_xp.gru_forward(da.from_array(xs, chunks=(3, T, D)), Wx, Wh, bx, bh, inference=True)
    assert_close(lazy[0].compute(), want, "float64", "hs")


def test_second_review_regressions():
    torch = pytest.importorskip("torch")
    from rnn_xp.optim import Adam, clip_by_global_norm

    # optimizers take dicts keyed by anything, as before
    assert clip_by_global_norm({0: np.ones(4)}, None)[1] == 2.0
    assert Adam().step({0: np.ones(3)}, {0: np.ones(3)})[0].shape == (3,)
    # a dtype of another library, for a torch model
    with pytest.raises(TypeError, match=r"dtype: expected a real floating dtype of"):
        rnn_xp.Recurrent("gru", 2, 3, like=torch.zeros(1), dtype=np.float32)
    # any parameter on the meta device
    module = torch.nn.GRU(2, 3, 2)
    module.weight_hh_l1 = torch.nn.Parameter(torch.empty(9, 3, device="meta"))
    with pytest.raises(ValueError, match=r"module: its parameters are on the meta device"):
        rnn_xp.from_torch(module)
    # uint64 lengths of 2**63 or more are beyond T, not wrapped below 1
    xs = np.random.default_rng(9).standard_normal((N, T, D))
    model = rnn_xp.Recurrent("gru", D, H, batch_first=True, seed=0, dtype="float64")
    n = np.array([T, 1, 2**64 - 1], np.uint64)
    with pytest.raises(ValueError, match=r"got values from 1 to 2\*\*63 or more"):
        model.forward(xs, lengths=n)
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jmodel = rnn_xp.Recurrent(
        "gru", D, H, batch_first=True, seed=0, like=jax.numpy.zeros(1), dtype="float64"
    )
    jitted = jax.jit(lambda x, lengths: jmodel.forward(x, lengths=lengths, inference=True)[0])
    got = np.asarray(jitted(jax.numpy.asarray(xs), jax.numpy.asarray(n)))
    full = np.asarray(jmodel.forward(jax.numpy.asarray(xs), inference=True)[0])
    assert_close(got[2], full[2], "float64", "a length beyond T keeps every step")
