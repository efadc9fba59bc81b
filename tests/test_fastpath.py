"""The fused fast paths (`rnn_xp._fastpath`) agree with the generic loop on every backend,
and inference mode gives the training-mode forward."""

from __future__ import annotations

import numpy as np
import pytest
from array_api_compat import array_namespace

import rnn_xp
from rnn_xp import _fastpath, _fused_numpy, _scan
from rnn_xp.model import MODES, TORCH_MODES
from tests.support import assert_close, two_states
from tests.test_cells import draw, run_layer
from tests.test_model import D, H, N, T, outputs, step_mask

KINDS = ["rnn_tanh", "rnn_relu", "lstm", "gru"]


@pytest.mark.parametrize("state", ["given", "omitted"])
@pytest.mark.parametrize("kind", KINDS)
def test_fast_and_generic_layers_agree(backend, dtype, kind, state, monkeypatch):
    # An omitted initial state is zero, and lets the fast path skip the first
    # step's recurrent product; omitted final-state gradients are zero too.
    # Both cases must agree with the generic loops, forward and backward.
    drawn = draw(kind, state == "given", dtype)
    if state == "omitted":
        drawn.update(h0=None, c0=None, dh_n=None, dc_n=None)
    a = {k: None if v is None else backend.asarray(v.astype(dtype)) for k, v in drawn.items()}
    fast = run_layer(kind, a)
    monkeypatch.setattr(_fastpath, "DISABLED", True)
    generic = run_layer(kind, a)
    # The gradient of an omitted bias or state is None on both paths.
    assert [f is None for f in fast] == [g is None for g in generic]
    present = [i for i, g in enumerate(generic) if g is not None]
    fast = backend.to_numpy_all([fast[i] for i in present])
    generic = backend.to_numpy_all([generic[i] for i in present])
    for i, f, g in zip(present, fast, generic):
        assert_close(f, g.astype(np.float64), dtype, f"output {i}")


@pytest.mark.parametrize("bias_shape", [(4,), (1, 4), (4, 4), (4, 1), (1,)])
@pytest.mark.parametrize("state", ["given", "omitted"])
def test_fast_and_generic_elman_agree_for_every_bias_shape(
    backend, bias_shape, state, monkeypatch
):
    # The fused Elman loops add the bias while copying the projection to time-major
    # order, where a row, a matrix of one row per sequence and a column all broadcast
    # differently. N == H, so a column of H biases (one per sequence) cannot pass
    # for a row.
    rng = np.random.default_rng(2)
    n, t, d, h = 4, 5, 3, 4
    xs, Wx, Wh, b, h0, dhs = (
        backend.asarray(rng.standard_normal(shape))
        for shape in [(n, t, d), (d, h), (h, h), bias_shape, (n, h), (n, t, h)]
    )
    h0 = h0 if state == "given" else None

    def run():
        hs, h_n = rnn_xp.rnn_forward(xs, Wx, Wh, b, h0)
        return [hs, h_n, *rnn_xp.rnn_backward(dhs, xs, hs, Wx, Wh, b, h0)]

    fast = run()
    monkeypatch.setattr(_fastpath, "DISABLED", True)
    generic = run()
    for i, (f, g) in enumerate(zip(fast, generic)):
        if g is None:
            assert f is None
            continue
        assert_close(backend.to_numpy(f), backend.to_numpy(g), "float64", f"output {i}")


@pytest.mark.parametrize("steps_kind", ["none", "mask"])
# The fused kinds only: the other modes have no fast path, both runs would be the generic loop.
@pytest.mark.parametrize("mode", TORCH_MODES)
def test_fast_and_generic_models_agree(backend, mode, steps_kind, monkeypatch):
    rng = np.random.default_rng(0)
    like = backend.asarray(np.zeros(1))
    model = rnn_xp.Recurrent(
        mode, D, H, num_layers=2, bidirectional=True, seed=0, like=like, dtype="float64"
    )
    xs = backend.asarray(rng.standard_normal((T, N, D)))
    dout = backend.asarray(rng.standard_normal((T, N, 2 * H)))
    steps = step_mask(steps_kind)
    steps = None if steps is None else backend.asarray(steps)
    fast = backend.to_numpy_all(outputs(model, xs, None, steps, steps_kind, dout))
    monkeypatch.setattr(_fastpath, "DISABLED", True)
    generic = backend.to_numpy_all(outputs(model, xs, None, steps, steps_kind, dout))
    for i, (f, g) in enumerate(zip(fast, generic)):
        assert_close(f, g, "float64", f"output {i}")


@pytest.mark.parametrize("mode", list(rnn_xp.MODES))
def test_inference_mode_equals_training_forward(backend, mode):
    rng = np.random.default_rng(1)
    like = backend.asarray(np.zeros(1))
    model = rnn_xp.Recurrent(
        mode, D, H, num_layers=2, bidirectional=True, seed=0, like=like, dtype="float64"
    )
    xs = backend.asarray(rng.standard_normal((T, N, D)))
    train_out, train_h = model.forward(xs)
    infer_out, infer_h = model.forward(xs, inference=True)
    assert_close(backend.to_numpy(infer_out), backend.to_numpy(train_out), "float64", "out")
    h_pair = zip(infer_h, train_h) if two_states(mode) else [(infer_h, train_h)]
    for got, want in h_pair:
        assert_close(backend.to_numpy(got), backend.to_numpy(want), "float64", "h_n")
    with pytest.raises(RuntimeError, match="call forward first"):
        model.backward(xs)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_inference_peak_memory_is_output_projection_and_scratch(kind):
    # The bound on NumPy: beyond the output, at most the input projection
    # plus O(N*H) scratch (here also the copy of Wh whose sigmoid gates' columns
    # the fast path halves). Training keeps every step's gates, so it must not fit.
    from rnn_xp.bench import _forward_backward, peak_bytes, problem

    N, T, D, H = 32, 64, 16, 32
    G = {"lstm": 4, "gru": 3}[kind] * H
    a = problem(kind, N, T, D, H, "float32")
    item = 4
    bound = (N * T * H + N * T * G + 32 * N * H + 2 * (D + H) * G) * item
    inference = peak_bytes(lambda: _forward_backward(kind, a, False, inference=True))
    training = peak_bytes(lambda: _forward_backward(kind, a, False, inference=False))
    assert inference <= bound < training, (inference, bound, training)


class _NumPyMultiplyingContiguousOnly:
    """NumPy for the fused loops, whose ``matmul`` refuses a strided matrix.

    The loops run the same code on CuPy, which copies an operand that is
    neither C- nor F-contiguous before the product (cuBLAS takes only those
    layouts), and computes into a temporary for an ``out`` that is not
    C-contiguous. Counts the products it was asked for.
    """

    def __init__(self) -> None:
        self.products = 0

    def __getattr__(self, name: str):
        return getattr(np, name)

    def matmul(self, a, b, out=None):
        for name, m in (("a", a), ("b", b)):
            assert m.flags.c_contiguous or m.flags.f_contiguous, (name, m.shape, m.strides)
        assert out is None or out.flags.c_contiguous, ("out", out.shape, out.strides)
        self.products += 1
        return np.matmul(a, b, out=out)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("mode", ["rnn_tanh", "lstm", "gru"])
def test_fused_loops_multiply_only_contiguous_matrices(mode, reverse, monkeypatch):
    # The backward's gate gradients are kept time-major, (T, N, G), so that the
    # step's (N, G) block that the next step multiplies by Wh.T is contiguous;
    # a batch-major (N, T, G) array's slice [:, t, :] is strided (N, T > 1).
    lib = _NumPyMultiplyingContiguousOnly()
    monkeypatch.setattr(_fastpath, "_library", lambda xp, *arrays: lib)
    # On NumPy the Elman backward takes the generic loop; the fused one runs on
    # CuPy's sibling, torch, and its slicing is what is checked here.
    monkeypatch.setattr(_fused_numpy, "_fused_backward_pays", lambda lib, kind: True)
    cell = MODES[mode]
    n, t, d, h = 3, 5, 4, 6
    g = cell.gates * h
    rng = np.random.default_rng(3)
    xs, Wx, Wh, b, dhs, h0, dh_n = (
        rng.standard_normal(shape)
        for shape in [(n, t, d), (d, g), (h, g), (g,), (n, t, h), (n, h), (n, h)]
    )
    state0 = (h0, np.zeros((n, h))) if two_states(mode) else (h0,)
    bh = b if mode == "gru" else None
    xp = array_namespace(xs)
    _, _, tape = _scan.forward(xp, cell, xs, Wx, Wh, b, bh, state0, reverse=reverse)
    assert lib.products == t + 1  # the input projection and every step's h @ Wh
    _scan.backward(xp, cell, tape, dhs, (dh_n, None) if two_states(mode) else (dh_n,))
    # The fused backward ran: T - 1 recurrent products, dh0's, and dWx's and
    # dxs's from the time-major gradients.
    assert lib.products == 2 * t + 3
