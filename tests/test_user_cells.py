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

    with pytest.raises(
        ValueError, match=r"cell: ThreeStates.state_names: expected a tuple of one or two"
    ):
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


class _Returns(IndRNN):
    """IndRNN whose step or step_backward returns what ``how`` says."""

    def __init__(self, how):
        self.how = how

    def step(self, xp, ax, state, p):
        (h,), saved = super().step(xp, ax, state, p)
        if self.how == "bare state":
            return h, saved
        if self.how == "wide dtype":
            return (xp.astype(h, xp.float64),), saved
        return (h,), saved

    def step_backward(self, xp, dstate, saved, p):
        dprev, dax, grads = super().step_backward(xp, dstate, saved, p)
        if self.how == "bare dstate_prev":
            return dprev[0], dax, grads
        if self.how == "gradient shape":
            return dprev, dax, {"weight_hh": xp.reshape(grads["weight_hh"], (1, -1))}
        if self.how == "unknown gradient":
            return dprev, dax, {**grads, "u": grads["weight_hh"]}
        return dprev, dax, grads


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("bare state", r"cell: step returned as new state \(ndarray\); expected a tuple of 1"),
        (
            "wide dtype",
            r"cell: step returned as new state \(\(2, 4\) float64\); expected .*float32",
        ),
        ("bare dstate_prev", r"cell: step_backward returned as dstate_prev \(ndarray\)"),
        ("gradient shape", r"the gradient of 'weight_hh' has shape \(1, 4\), summed over"),
        ("unknown gradient", r"step_backward: gradients of unknown parameters \['u'\]"),
    ],
)
def test_the_loop_checks_what_a_cell_returns(how, message):
    model = rnn_xp.Recurrent(_Returns(how), 3, 4, seed=0)
    xs = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    if how in ("bare state", "wide dtype"):
        with pytest.raises(TypeError, match=message):
            model.forward(xs)
        return
    out, _ = model.forward(xs)
    with pytest.raises((TypeError, ValueError), match=message):
        model.backward(np.ones_like(out))
    assert model.grads is None


def test_kernels_of_different_cell_classes_differ():
    """JAX compiles a loop per equal kernel: a subclass must not run its parent's."""

    class Quiet(rnn_xp.lstm_variants.PeepholeLSTMCell):
        kind = "quiet_peephole"

        def step(self, xp, ax, state, params):
            return super().step(xp, ax * 0, state, params)

    base, sub = rnn_xp.lstm_variants.PeepholeLSTMCell(), Quiet()
    assert cells.kernel(base) != cells.kernel(sub)
    assert base != sub

    class Same(rnn_xp.lstm_variants.PeepholeLSTMCell):  # keeps the built-in's kind
        def step(self, xp, ax, state, params):
            return super().step(xp, ax * 0, state, params)

    with pytest.raises(ValueError, match=r"mode: the cell's kind 'lstm_peephole' is the name"):
        rnn_xp.Recurrent(Same(), 3, 4)


def _cell(**attributes):
    return type("Odd", (IndRNN,), attributes)()


@pytest.mark.parametrize(
    ("cell", "message"),
    [
        (_cell(kind=""), r"cell: Odd.kind: expected a non-empty string"),
        (_cell(state_names=["h"]), r"cell: Odd.state_names: expected a tuple of one or two"),
        (_cell(gates=True), r"cell: Odd.gates: expected a positive integer"),
        (_cell(projection=("w", None)), r"cell: Odd.projection: expected \('weight_ih'"),
        (_cell(__eq__=lambda s, o: True, __hash__=None), r"cell: Odd is not hashable"),
        (
            _cell(parameters=lambda s, D, H: {"weight_ih": cells.Param((H, D + 0.5))}),
            r"'weight_ih': expected a Param with a tuple of positive ints as shape",
        ),
        (
            _cell(parameters=lambda s, D, H: {"weight_ih": cells.Param((H, D), bias=True)}),
            r"expected 'weight_ih' of shape \(gates\*H, D\) = \(4, 3\), not a bias",
        ),
        (
            _cell(
                parameters=lambda s, D, H: {
                    "weight_ih": cells.Param((H, D)),
                    "bias_ih": cells.Param((H + 1,)),
                }
            ),
            r"expected the projection's bias 'bias_ih' of shape \(gates\*H,\) = \(4,\)",
        ),
        (_cell(state_sizes=lambda s, H: ()), r"cell: Odd.state_sizes\(4\): expected one"),
    ],
)
def test_a_cell_that_declares_nonsense_gets_one_clear_error(cell, message):
    with pytest.raises((TypeError, ValueError), match=message):
        rnn_xp.Recurrent(cell, 3, 4)


def test_the_layer_and_the_projected_cell_refuse_bad_settings():
    with pytest.raises(ValueError, match=r"cell: CellLayer keeps each state as an attribute"):
        cells.CellLayer(_cell(state_names=("params",)), {})
    for bad in (0, -1, 2.5, True, "a"):
        with pytest.raises(ValueError, match=r"proj_size: expected a positive integer"):
            rnn_xp.lstm_variants.ProjectedLSTMCell(bad)
    with pytest.raises(TypeError, match=r"state0: expected a tuple of 1 arrays"):
        cells.sequence_forward(
            IndRNN(),
            np.zeros((2, 5, 3)),
            {"weight_ih": np.zeros((4, 3)), "weight_hh": np.zeros(4)},
            np.zeros((2, 4)),
        )
