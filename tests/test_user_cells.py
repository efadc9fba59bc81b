"""The public cell protocol: a user cell gets what the built-in cells have.

The cell is the README's IndRNN, taken from the README itself. Its agreement
with a NumPy float64 reference on every backend, its finite differences and its
torch.autograd and jax.vjp checks are in `tests/test_lstm_variants.py` (case
``indrnn``); here: the autodiff fallback without ``step_backward``, the
sequence functions and the layer class, Dask chunks, ``step``, the JAX loop,
and the errors.
"""

from __future__ import annotations

import numpy as np
import pytest

import rnn_xp
from rnn_xp import _fastpath, cells
from tests import reference_cells as ref
from tests.support import assert_close

IndRNN = ref.readme_cell("IndRNN")


class AutoIndRNN(IndRNN):
    """The README's IndRNN without its step_backward: torch and JAX derive it."""

    kind = "indrnn_auto"
    step_backward = None


class AutoLayerNormLSTM(rnn_xp.lstm_variants.LayerNormLSTMCell):
    """A cell with a ``prepare`` and neither backward: both come from autodiff."""

    kind = "lstm_layernorm_auto"
    step_backward = None

    def __eq__(self, other):
        return type(other) is type(self)

    def __hash__(self):
        return hash(type(self))


def _pair(auto, analytic, backend, dtype):
    """Two models of the same parameters on ``backend``: ``auto``'s cell and ``analytic``'s."""
    base = rnn_xp.Recurrent(analytic, 3, 4, 2, True, True, True, seed=0, dtype="float64")
    sd = ref.perturbed(base)
    like = backend.asarray(np.zeros(1, dtype))
    models = []
    for cell in (auto, analytic):
        m = rnn_xp.Recurrent(cell, 3, 4, 2, True, True, True, like=like, dtype=dtype)
        m.load_state_dict(sd)
        models.append(m)
    return base, models


@pytest.mark.parametrize(
    ("auto", "analytic"),
    [(AutoIndRNN(), IndRNN()), (AutoLayerNormLSTM(), rnn_xp.lstm_variants.LayerNormLSTMCell())],
    ids=["indrnn", "layernorm"],
)
def test_without_step_backward_torch_and_jax_differentiate_the_step(
    backend, dtype, auto, analytic
):
    base, (m_auto, m_analytic) = _pair(auto, analytic, backend, dtype)
    xs, lengths, states0, dout, dstates = ref.problem(base)
    a = lambda v: backend.asarray(np.asarray(v, dtype))  # noqa: E731
    results = []
    for m in (m_auto, m_analytic):
        out, _ = m.forward(a(xs), ref.state_arg(tuple(map(a, states0))), lengths=lengths.tolist())
        results.append(out)
    assert_close(backend.to_numpy(results[0]), backend.to_numpy(results[1]), dtype, "out")
    library = backend.xp.__name__
    if not ("torch" in library or "jax" in library):
        # No autodiff here: one clear error before any work, and nothing changes.
        with pytest.raises(TypeError, match=r"cell: .* defines no step_backward, and .* has no"):
            m_auto.backward(a(dout), ref.state_arg(tuple(map(a, dstates))))
        assert m_auto.grads is None
        assert m_auto.dh0 is None
        return
    grads = []
    for m in (m_auto, m_analytic):
        dxs = m.backward(a(dout), ref.state_arg(tuple(map(a, dstates))))
        grads.append({"dxs": dxs, "dh0": m.dh0, **m.grads})
    assert sorted(grads[0]) == sorted(grads[1])
    for name in grads[1]:
        want = backend.to_numpy(grads[1][name])
        assert_close(backend.to_numpy(grads[0][name]), want, dtype, name)


def test_sequence_functions_and_the_layer_class(backend, dtype):
    cell = IndRNN()
    rng = np.random.default_rng(3)
    N, T, D, H = 2, 5, 3, 4
    p = {
        "weight_ih": rng.standard_normal((H, D)),
        "bias_ih": rng.standard_normal(H),
        "weight_hh": rng.standard_normal(H),
    }
    xs = rng.standard_normal((N, T, D))
    a = lambda v: backend.asarray(np.asarray(v, dtype))  # noqa: E731
    params = {k: a(v) for k, v in p.items()}

    hs, (h_n,), cache = cells.sequence_forward(cell, a(xs), params)
    want, (want_h,) = ref.run_model(
        ref.indrnn_step,
        {k + "_l0": v for k, v in p.items()},
        xs,
        [T] * N,
        (np.zeros((1, N, H)),),
        1,
        False,
    )
    assert_close(backend.to_numpy(hs), want, dtype, "hs")
    assert_close(backend.to_numpy(h_n), want_h[0], dtype, "h_n")
    dxs, (dh0,), dparams = cells.sequence_backward(cell, a(np.ones((N, T, H))), cache)
    assert tuple(dxs.shape) == (N, T, D)
    assert tuple(dh0.shape) == (N, H)
    assert sorted(dparams) == sorted(p)
    for k, g in dparams.items():
        assert g.dtype == params[k].dtype
        assert tuple(g.shape) == p[k].shape

    # The stateful layer: two halves in a row are the whole sequence.
    layer = cells.CellLayer(cell, params, stateful=True)
    first = layer.forward(a(xs[:, :2]))
    second = layer.forward(a(xs[:, 2:]))
    got = np.concatenate([backend.to_numpy(first), backend.to_numpy(second)], axis=1)
    assert_close(got, want, dtype, "stateful halves")
    assert_close(backend.to_numpy(layer.h), want_h[0], dtype, "layer.h")
    layer.backward(a(np.ones((N, T - 2, H))))
    assert sorted(layer.grads) == sorted(p)
    assert layer.dh is not None
    layer.reset_state()
    assert layer.h is None


def test_a_dask_input_runs_one_task_per_chunk():
    da = pytest.importorskip("dask.array")
    model = rnn_xp.Recurrent(IndRNN(), 3, 4, num_layers=2, bidirectional=True, seed=0).eval()
    xs = np.random.default_rng(0).standard_normal((5, 6, 3)).astype(np.float32)
    chunked = da.from_array(xs, chunks=(5, 2, 3))
    out, h_n = model.forward(chunked, lengths=da.from_array(np.array([5, 3, 4, 5, 1, 2]), 2))
    assert out.numblocks[1] == 3
    want, want_h = model.forward(xs, lengths=[5, 3, 4, 5, 1, 2])
    np.testing.assert_array_equal(out.compute(), want)
    np.testing.assert_array_equal(h_n.compute(), want_h)


@pytest.mark.parametrize("mode", [IndRNN(), "lstm_peephole", "lstm_layernorm"])
def test_step_equals_forward(mode):
    model = rnn_xp.Recurrent(mode, 3, 4, num_layers=2, seed=0, dtype="float64")
    proj = rnn_xp.Recurrent("lstm", 3, 4, num_layers=2, seed=0, dtype="float64", proj_size=2)
    xs = np.random.default_rng(1).standard_normal((6, 2, 3))
    for m in (model, proj):
        out, h_n = m.forward(xs)
        state = None
        for t in range(xs.shape[0]):
            y, state = m.step(xs[t], state)
            np.testing.assert_allclose(y, out[t], rtol=0, atol=1e-14)
        for got, want in zip(ref.finals_of(state), ref.finals_of(h_n)):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-14)


@pytest.mark.parametrize("mode", [IndRNN(), AutoIndRNN(), "lstm_layernorm"])
def test_the_jax_scan_agrees_with_the_generic_loop(mode):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    model = rnn_xp.Recurrent(
        mode, 3, 4, 2, True, True, True, seed=0, like=jnp.zeros(1), dtype="float64"
    )
    xs = jnp.asarray(np.random.default_rng(2).standard_normal((3, 5, 3)))
    mask = jnp.asarray(np.random.default_rng(3).random((3, 5)) > 0.3)
    results = []
    for disabled in (False, True):
        before = _fastpath.DISABLED
        _fastpath.DISABLED = disabled
        try:
            out, _ = model.forward(xs, mask=mask)
            dxs = model.backward(jnp.ones_like(out))
        finally:
            _fastpath.DISABLED = before
        results.append({"out": out, "dxs": dxs, **model.grads})
    for name, value in results[0].items():
        np.testing.assert_allclose(
            np.asarray(value),
            np.asarray(results[1][name]),
            rtol=1e-12,
            atol=1e-12,
            err_msg=name,
        )


def test_bad_cells_and_parameters_get_one_clear_error():
    with pytest.raises(TypeError, match=r"cell: expected an instance of a subclass of rnn_xp"):
        cells.sequence_forward(object(), np.zeros((1, 2, 3)), {})
    with pytest.raises(ValueError, match=r"mode: expected one of .* or an rnn_xp.cells.Cell"):
        rnn_xp.Recurrent(IndRNN, 3, 4)  # the class, not an instance

    class Clash(IndRNN):
        kind = "gru"

    with pytest.raises(ValueError, match=r"mode: the cell's kind 'gru' is the name of a built-in"):
        rnn_xp.Recurrent(Clash(), 3, 4)

    class ThreeStates(IndRNN):
        state_names = ("h", "c", "m")

    with pytest.raises(ValueError, match=r"cell: state_names: expected one or two names"):
        rnn_xp.Recurrent(ThreeStates(), 3, 4)

    p = {"weight_ih": np.zeros((4, 3)), "weight_hh": np.zeros(4)}
    xs = np.zeros((2, 5, 3))
    with pytest.raises(ValueError, match=r"params: missing keys \[\], unexpected keys \['u'\]"):
        cells.sequence_forward(IndRNN(), xs, {**p, "u": np.zeros(4)})
    with pytest.raises(ValueError, match=r"params\['weight_hh'\]: expected shape \(4,\)"):
        cells.sequence_forward(IndRNN(), xs, {**p, "weight_hh": np.zeros(5)})
    with pytest.raises(ValueError, match=r"xs: expected shape \(N, T, D=3\)"):
        cells.sequence_forward(IndRNN(), np.zeros((2, 5, 2)), p)
    with pytest.raises(ValueError, match=r"state0: expected 1 arrays"):
        cells.sequence_forward(IndRNN(), xs, p, (np.zeros((2, 4)), np.zeros((2, 4))))
    _, _, cache = cells.sequence_forward(IndRNN(), xs, p)
    with pytest.raises(ValueError, match=r"dhs: expected shape \(N=2, T=5, width=4\)"):
        cells.sequence_backward(IndRNN(), np.zeros((2, 5, 3)), cache)
    # Nothing the caller passed was modified by the calls that failed.
    assert not p["weight_hh"].any()
