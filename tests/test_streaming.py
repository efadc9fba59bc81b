"""Streaming: `rnn_xp._streaming.step`, one time step through every layer (issue 13).

Stepping through a sequence must give what `Recurrent.forward` gives over it:
to rounding on every backend, and to the last bit on NumPy float64 wherever the
BLAS gives a row of a matrix product the same bits. It does not always:
forward's input projection is one product over all N*T rows, a step's over N,
and OpenBLAS's rows can differ in the last bit between the two. So the exact
tests take that out of the comparison in two ways: weights with one nonzero
entry per output column (a power of two, so every product of the cell is exact
whatever the order of its sums), and, with any weights, a step against a
forward over that one step (the same products, row for row).
"""

from __future__ import annotations

import numpy as np
import pytest

import rnn_xp
from rnn_xp import _fastpath
from rnn_xp._streaming import step
from tests.support import assert_close, two_states

MODES = list(rnn_xp.MODES)
N, T, D, H = 3, 6, 4, 5


def states(mode: str, state) -> list:
    """The arrays of a state: ``[h]``, or ``[h, c]`` for the LSTMs."""
    return list(state) if two_states(mode) else [state]


def initial_state(mode: str, L: int, n: int, h: int, rng, convert=lambda a: a):
    h0, c0 = (convert(rng.standard_normal((L, n, h))) for _ in range(2))
    return (h0, c0) if two_states(mode) else h0


def stepped(model, xs, state):
    """``(ys, state)`` from stepping through the time-major ``xs`` (T, N, D)."""
    ys = []
    for t in range(xs.shape[0]):
        y, state = step(model, xs[t, ...], state)
        ys.append(y)
    return ys, state


def one_term_weights(model, rng) -> None:
    """Weights with one nonzero entry, a power of two, in each row of torch's layout.

    Each gate's pre-activation then sums one input, one state entry and the
    biases, with products that are exact: the bits depend only on the order
    of the elementwise operations, which must be forward's. Only matrices are
    made so: a vector (a peephole) multiplies elementwise, one term already.
    """
    params = {}
    for name, p in model.state_dict().items():
        if name.startswith("weight") and p.ndim == 2:
            rows, cols = p.shape
            w = np.zeros((rows, cols))
            w[np.arange(rows), rng.integers(0, cols, rows)] = rng.choice(
                [-2.0, -1.0, -0.5, 0.25, 0.5, 1.0], rows
            )
            params[name] = w
        else:
            params[name] = rng.standard_normal(p.shape)
    model.load_state_dict(params)


# -- stepping equals forward ------------------------------------------------------


@pytest.mark.parametrize("given", [False, True], ids=["zero_state", "h0"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("mode", MODES)
def test_stepping_through_a_sequence_matches_forward(
    backend, dtype, mode, num_layers, bias, given
):
    rng = np.random.default_rng(7)
    like = backend.asarray(np.zeros(1, dtype=dtype))
    model = rnn_xp.Recurrent(mode, D, H, num_layers, bias, seed=2, like=like, dtype=dtype)
    xs = backend.asarray(rng.standard_normal((T, N, D)).astype(dtype))
    convert = lambda a: backend.asarray(a.astype(dtype))  # noqa: E731
    state0 = initial_state(mode, num_layers, N, H, rng, convert) if given else None

    out, h_n = model.forward(xs, state0, inference=True)
    ys, state = stepped(model, xs, state0)

    expected = backend.to_numpy_all([out, *states(mode, h_n)])
    got = backend.to_numpy_all([*ys, *states(mode, state)])
    for t in range(T):
        assert got[t].dtype == np.dtype(dtype)
        assert_close(got[t], expected[0][t].astype(np.float64), dtype, f"y_{t}")
    for k, (a, b) in enumerate(zip(got[T:], expected[1:])):
        assert a.shape == (num_layers, N, H)
        assert_close(a, b.astype(np.float64), dtype, f"state {k}")


@pytest.mark.parametrize("path", ["fused", "generic"])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("given", [False, True], ids=["zero_state", "h0"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("mode", MODES)
def test_step_matches_forward_to_the_last_bit_on_numpy_float64(
    monkeypatch, mode, num_layers, bias, given, n, path
):
    monkeypatch.setattr(_fastpath, "DISABLED", path == "generic")
    rng = np.random.default_rng(11)
    hidden = 33  # not a multiple of any SIMD width: tanh's vector tails run too
    model = rnn_xp.Recurrent(mode, 7, hidden, num_layers, bias, dtype="float64").eval()
    one_term_weights(model, rng)
    xs = rng.standard_normal((T, n, 7))
    state0 = initial_state(mode, num_layers, n, hidden, rng) if given else None

    out, h_n = model.forward(xs, state0, inference=True)
    ys, state = stepped(model, xs, state0)

    assert all(np.array_equal(y, out[t]) for t, y in enumerate(ys))
    assert all(np.array_equal(a, b) for a, b in zip(states(mode, state), states(mode, h_n)))


@pytest.mark.parametrize("path", ["fused", "generic"])
@pytest.mark.parametrize("given", [False, True], ids=["zero_state", "h0"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("mode", MODES)
def test_each_step_matches_a_one_step_forward_to_the_last_bit(
    monkeypatch, mode, bias, given, path
):
    monkeypatch.setattr(_fastpath, "DISABLED", path == "generic")
    rng = np.random.default_rng(5)
    n, d, hidden = 1, 64, 40
    model = rnn_xp.Recurrent(mode, d, hidden, 2, bias, seed=4, dtype="float64")
    xs = rng.standard_normal((T, n, d))
    state = forward_state = initial_state(mode, 2, n, hidden, rng) if given else None
    for t in range(T):
        y, state = step(model, xs[t], state)
        out, forward_state = model.forward(xs[t : t + 1], forward_state, inference=True)
        assert np.array_equal(y, out[0])
        assert all(
            np.array_equal(a, b) for a, b in zip(states(mode, state), states(mode, forward_state))
        )


def test_a_long_stream_stays_with_forward():
    rng = np.random.default_rng(3)
    model = rnn_xp.Recurrent("lstm", 16, 32, 2, seed=1, dtype="float64")
    xs = rng.standard_normal((200, 2, 16))
    out, (h_n, c_n) = model.forward(xs, inference=True)
    ys, (h, c) = stepped(model, xs, None)
    assert_close(np.stack(ys), out, "float64", "ys")
    assert_close(h, h_n, "float64", "h")
    assert_close(c, c_n, "float64", "c")


# -- what the model allows ----------------------------------------------------------


def test_step_refuses_a_bidirectional_model():
    model = rnn_xp.Recurrent("gru", D, H, bidirectional=True).eval()
    with pytest.raises(ValueError, match=r"model: a bidirectional model cannot run one step"):
        step(model, np.zeros((N, D), np.float32))


def test_step_refuses_dropout_that_training_mode_would_apply():
    model = rnn_xp.Recurrent("lstm", D, H, num_layers=2, dropout=0.5, seed=0)
    x = np.ones((N, D), np.float32)
    with pytest.raises(ValueError, match=r"model: dropout=0.5 .* call model.eval\(\) first"):
        step(model, x)
    y, _ = step(model.eval(), x)
    out, _ = model.forward(x[None], inference=True)
    assert np.array_equal(y, out[0])


def test_dropout_with_one_layer_applies_nowhere_and_step_runs_in_training_mode():
    model = rnn_xp.Recurrent("rnn_tanh", D, H, num_layers=1, dropout=0.5, seed=0)
    y, _ = step(model, np.ones((N, D), np.float32))
    assert y.shape == (N, H)


# -- bad input: a clear error naming the argument, nothing changed -----------------


def _bad_cases():
    f32 = np.float32
    good_x = np.ones((N, D), f32)
    good_h = np.zeros((2, N, H), f32)
    return [
        ("gru", np.ones((N, 1, D), f32), None, ValueError, r"x_t: expected shape \(N, D=4\)"),
        ("gru", np.ones((N, D + 1), f32), None, ValueError, r"x_t: expected shape \(N, D=4\)"),
        ("gru", np.ones((N, D), np.int64), None, TypeError, r"x_t: expected a real floating"),
        ("gru", [[1.0] * D] * N, None, TypeError, r"x_t: expected an array"),
        ("gru", np.ma.masked_array(good_x), None, TypeError, r"x_t: expected a plain array"),
        (
            "gru",
            good_x,
            np.zeros((1, N, H), f32),
            ValueError,
            r"state: expected shape \(num_layers=2, N=3, H=5\), got \(1, 3, 5\)",
        ),
        ("gru", good_x, np.zeros((2, N + 1, H), f32), ValueError, r"state: expected shape"),
        ("gru", good_x, (good_h, good_h), TypeError, r"state: expected one array"),
        ("lstm", good_x, good_h, TypeError, r"state: expected a pair \(h, c\)"),
        (
            "lstm",
            good_x,
            (good_h, np.zeros((2, N, H + 1), f32)),
            ValueError,
            r"state\[1\]: expected shape \(num_layers=2, N=3, H=5\)",
        ),
        ("lstm", good_x, (good_h, good_h.astype(np.int32)), TypeError, r"state\[1\]: expected"),
    ]


@pytest.mark.parametrize(("mode", "x_t", "state", "error", "message"), _bad_cases())
def test_bad_input_raises_naming_the_argument(mode, x_t, state, error, message):
    model = rnn_xp.Recurrent(mode, D, H, num_layers=2, seed=0)
    before = [np.array(a, copy=True) for a in states(mode, state) if a is not None]
    params = {k: v.copy() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        step(model, x_t, state)
    after = [a for a in states(mode, state) if a is not None]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    assert all(np.array_equal(v, params[k]) for k, v in model.state_dict().items())


def test_an_input_of_another_library_names_x_t():
    torch = pytest.importorskip("torch")
    model = rnn_xp.Recurrent("lstm", D, H, seed=0)
    with pytest.raises(TypeError, match=r"x_t: expected an array of the model's library"):
        step(model, torch.zeros((N, D)))


# -- what step returns and what it leaves alone -----------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_step_returns_new_arrays_and_changes_no_input(mode):
    rng = np.random.default_rng(0)
    model = rnn_xp.Recurrent(mode, D, H, num_layers=2, seed=0)
    x = rng.standard_normal((N, D)).astype(np.float32)
    state0 = initial_state(mode, 2, N, H, rng, lambda a: a.astype(np.float32))
    kept = [a.copy() for a in (x, *states(mode, state0))]
    y, state = step(model, x, state0)
    assert all(np.array_equal(a, b) for a, b in zip(kept, (x, *states(mode, state0))))
    assert np.array_equal(y, states(mode, state)[0][-1])
    before = [a.copy() for a in states(mode, state)]
    y += 1
    assert all(np.array_equal(a, b) for a, b in zip(before, states(mode, state)))


def test_step_computes_in_the_dtype_forward_computes_in():
    rng = np.random.default_rng(0)
    model = rnn_xp.Recurrent("gru", D, H, num_layers=2, seed=0)  # float32
    xs = rng.standard_normal((T, N, D))  # float64
    out, h_n = model.forward(xs, inference=True)
    ys, h = stepped(model, xs, None)
    assert out.dtype == h.dtype == ys[0].dtype == np.float64
    assert_close(np.stack(ys), out, "float64", "ys")
    assert_close(h, h_n, "float64", "h")


def test_step_follows_parameters_loaded_or_changed_in_place():
    rng = np.random.default_rng(0)
    model = rnn_xp.Recurrent("lstm", D, H, num_layers=2, seed=0, dtype="float64")
    x = rng.standard_normal((N, D))
    step(model, x)  # the model's plan is made here
    model.load_state_dict({k: v * 2 for k, v in model.state_dict().items()})
    assert np.array_equal(step(model, x)[0], model.forward(x[None], inference=True)[0][0])
    model.state_dict()["bias_hh_l1"][...] = 1.5  # the parameter array itself
    assert np.array_equal(step(model, x)[0], model.forward(x[None], inference=True)[0][0])
    twin = model.astype("float32")
    assert step(twin, x.astype(np.float32))[0].dtype == np.float32


def test_step_leaves_the_tape_of_the_last_forward():
    rng = np.random.default_rng(0)
    model = rnn_xp.Recurrent("gru", D, H, num_layers=2, seed=0, dtype="float64")
    xs = rng.standard_normal((T, N, D))
    dout = rng.standard_normal((T, N, H))
    model.forward(xs)
    expected = model.backward(dout)
    model.forward(xs)
    step(model, xs[0])
    assert np.array_equal(model.backward(dout), expected)


# -- autodiff and tracing go through the generic path ------------------------------


def test_step_is_differentiable_on_torch():
    torch = pytest.importorskip("torch")
    like = torch.zeros(1, dtype=torch.float64)
    model = rnn_xp.Recurrent("lstm", D, H, num_layers=2, seed=0, like=like, dtype="float64")
    rng = np.random.default_rng(0)
    xs = torch.tensor(rng.standard_normal((T, N, D)), requires_grad=True)
    out, _ = model.forward(xs)
    (dxs,) = torch.autograd.grad(out.sum(), xs)
    ys, _ = stepped(model, xs, None)
    (dxs_stepped,) = torch.autograd.grad(torch.stack(ys).sum(), xs)
    assert_close(dxs_stepped.numpy(), dxs.numpy(), "float64", "dxs")


def test_step_runs_under_jax_jit():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    model = rnn_xp.Recurrent("gru", D, H, num_layers=2, seed=0, like=jnp.zeros(1))
    xs = jnp.asarray(np.random.default_rng(0).standard_normal((T, N, D)), dtype=jnp.float32)
    jitted = jax.jit(lambda x, s: step(model, x, s))
    out, h_n = model.forward(xs, inference=True)
    h = jnp.zeros((2, N, H), jnp.float32)
    for t in range(T):
        y, h = jitted(xs[t], h)
        assert_close(np.asarray(y), np.asarray(out[t], dtype=np.float64), "float32", "y")
    assert_close(np.asarray(h), np.asarray(h_n, dtype=np.float64), "float32", "h")
