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


@pytest.mark.parametrize("precision", [None, "bf16-mixed"])
@pytest.mark.parametrize("steps_kind", ["none", "lengths", "mask"])
@pytest.mark.parametrize("mode", list(rnn_xp.MODES))
def test_both_jax_scans_agree_with_the_generic_loop(mode, steps_kind, precision, monkeypatch):
    """JAX's scan with each step's input product inside it (the CPU's) and with the
    projection hoisted before it (other devices'), forward and backward, masks, biases
    of each shape the model allows, and the mixed policy, against the generic loop."""
    jax = pytest.importorskip("jax")
    from rnn_xp import _fused_jax

    jax.config.update("jax_enable_x64", True)  # as the matrix's JAX backend has it
    dtype = "float32" if precision else "float64"
    rng = np.random.default_rng(5)
    like = jax.numpy.zeros(1, dtype=dtype)
    model = rnn_xp.Recurrent(
        mode, D, H, num_layers=2, bidirectional=True, seed=0, like=like, dtype=dtype
    )
    model.precision = precision
    xs = jax.numpy.asarray(rng.standard_normal((T, N, D)).astype(dtype))
    dout = jax.numpy.asarray(rng.standard_normal((T, N, 2 * H)).astype(dtype))
    steps = step_mask(steps_kind)
    steps = None if steps is None else jax.numpy.asarray(steps)
    calls = []
    projecting = _fused_jax.forward_projecting

    def count(*args, **kwargs):
        calls.append(1)
        return projecting(*args, **kwargs)

    monkeypatch.setattr(_fused_jax, "forward_projecting", count)
    results = {}
    for per_step in (True, False):
        monkeypatch.setattr(_fused_jax, "projects_per_step", lambda xs, p=per_step: p)
        calls.clear()
        results[per_step] = [
            np.asarray(a) for a in outputs(model, xs, None, steps, steps_kind, dout)
        ]
        # The structure asked for ran (the cells of the public protocol have only the hoisted one).
        assert bool(calls) == (per_step and not getattr(model.cell, "generic", False))
    monkeypatch.setattr(_fastpath, "DISABLED", True)
    generic = [np.asarray(a) for a in outputs(model, xs, None, steps, steps_kind, dout)]
    for per_step, got in results.items():
        for i, (f, g) in enumerate(zip(got, generic)):
            what = f"per_step={per_step} output {i}"
            if precision is None:
                assert_close(f, g.astype(np.float64), dtype, what)
                continue
            # Under a policy a float32 difference in the order of a sum can flip
            # the bfloat16 rounding of a later operand: up to u = 2^-8 each
            # product along the longest path (T steps + 2 layers), backward twice.
            f, g = f.astype(np.float64), g.astype(np.float64)
            scale = max(1.0, float(np.max(np.abs(g))))
            err = float(np.max(np.abs(f - g)))
            assert err <= 2 * (T + 2) * 2.0**-8 * scale, f"{what}: {err:.3g}"


def _torch_native_calls(monkeypatch):
    """A list that `_fused_torch.native_forward` appends "ran" or "refused" to."""
    from rnn_xp import _fused_torch

    calls = []
    native = _fused_torch.native_forward

    def spy(*args, **kwargs):
        try:
            result = native(*args, **kwargs)
        except NotImplementedError:
            calls.append("refused")
            raise
        calls.append("ran")
        return result

    monkeypatch.setattr(_fused_torch, "native_forward", spy)
    return calls


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("mode", TORCH_MODES)
def test_torch_s_own_operators_agree_with_the_generic_loop(mode, dtype, monkeypatch):
    """On torch CPU tensors the layers run ``torch.lstm`` and its kin (both directions,
    two layers, given initial states, the gradients by autograd through them, backward
    twice) and give the generic loop's outputs, states and gradients."""
    torch = pytest.importorskip("torch")
    calls = _torch_native_calls(monkeypatch)
    rng = np.random.default_rng(7)
    model = rnn_xp.Recurrent(
        mode, D, H, num_layers=2, bidirectional=True, seed=1, like=torch.zeros(1), dtype=dtype
    )
    S = 4
    xs = torch.asarray(rng.standard_normal((T, N, D)).astype(dtype))
    h0 = torch.asarray(rng.standard_normal((S, N, H)).astype(dtype))
    h0 = (h0, 2 * h0) if two_states(mode) else h0
    dout = torch.asarray(rng.standard_normal((T, N, 2 * H)).astype(dtype))
    fast = outputs(model, xs, h0, dout=dout)
    assert calls == ["ran"] * S  # every layer and direction
    again = model.backward(dout)  # the tape is kept: the same gradients again
    np.testing.assert_array_equal(again.numpy(), fast[3 if two_states(mode) else 2].numpy())
    monkeypatch.setattr(_fastpath, "DISABLED", True)
    generic = outputs(model, xs, h0, dout=dout)
    for i, (f, g) in enumerate(zip(fast, generic)):
        assert f.dtype == g.dtype, i
        assert f.shape == g.shape, i
        assert_close(f.numpy(), g.numpy().astype(np.float64), dtype, f"output {i}")


def test_torch_s_own_operators_step_aside_where_they_cannot_serve(monkeypatch):
    """A mask, a bias per sequence, float16, an empty batch, a policy and autograd
    recording each run rnn_xp's own loops, which give what the generic loop gives."""
    torch = pytest.importorskip("torch")
    calls = _torch_native_calls(monkeypatch)
    rng = np.random.default_rng(8)
    xs, Wx, Wh, b = (
        torch.asarray(rng.standard_normal(s).astype("float32"))
        for s in [(N, T, D), (D, 4 * H), (H, 4 * H), (N, 4 * H)]
    )
    rnn_xp.lstm_forward(xs, Wx, Wh, b)  # a bias per sequence
    rnn_xp.lstm_forward(xs.half(), Wx.half(), Wh.half(), None)
    rnn_xp.lstm_forward(xs[:0], Wx, Wh, None)
    with torch.enable_grad():
        rnn_xp.lstm_forward(xs, Wx.requires_grad_(), Wh, None)
    assert calls == ["refused"] * 4
    model = rnn_xp.Recurrent("gru", D, H, batch_first=True, like=xs)
    model.forward(xs, lengths=torch.asarray([T, 1, 2]))
    assert calls == ["refused"] * 4  # a mask: not even asked
    model.precision = "bf16-mixed"
    model.forward(xs)
    assert calls == ["refused"] * 4  # a policy: not asked either


def test_torch_s_own_operators_keep_what_the_loops_allowed(monkeypatch):
    """What worked before torch's operators served must still work, as on the generic path:
    an in-place change of the output before backward, forward and backward under
    ``torch.inference_mode``, a gradient that autograd records when the incoming one is
    recorded, and a hidden size of 0."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    xs, Wx, Wh, b, dhs = (
        torch.asarray(rng.standard_normal(s))
        for s in [(N, T, D), (D, 4 * H), (H, 4 * H), (4 * H,), (N, T, H)]
    )

    def runs():
        hs, _, _, cache = rnn_xp.lstm_forward(xs, Wx, Wh, b)
        hs.clamp_(min=0)  # an in-place ReLU after the RNN: the gradients must not see it
        first = rnn_xp.lstm_backward(dhs, cache)
        with torch.inference_mode():
            hs2, _, _, cache2 = rnn_xp.lstm_forward(xs.clone(), Wx, Wh, b)
            second = rnn_xp.lstm_backward(dhs.clone(), cache2)
        d = dhs.clone().requires_grad_()
        with torch.enable_grad():
            _, _, _, cache3 = rnn_xp.lstm_forward(xs, Wx, Wh, b)
            dxs = rnn_xp.lstm_backward(d, cache3)[0]
            assert dxs.requires_grad  # recorded: a gradient penalty can go through it
            (ddhs,) = torch.autograd.grad(dxs.square().sum(), d)
        empty = rnn_xp.lstm_forward(xs, Wx[:, :0], Wh[:0, :0], None)[0]
        assert empty.shape == (N, T, 0)
        return [hs, *first, hs2, *second, ddhs]

    fast = runs()
    monkeypatch.setattr(_fastpath, "DISABLED", True)
    generic = runs()
    for i, (f, g) in enumerate(zip(fast, generic)):
        if g is None:
            assert f is None, i
            continue
        assert_close(f.detach().numpy(), g.detach().numpy(), "float64", f"result {i}")


def _generic_forward(monkeypatch, fn, *args):
    monkeypatch.setattr(_fastpath, "DISABLED", True)
    try:
        return fn(*args, inference=True)[0]
    finally:
        monkeypatch.setattr(_fastpath, "DISABLED", False)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_torch_s_scratch_weights_are_copied_afresh_every_call(kind, monkeypatch):
    """Without a tape, the transposed weights go to scratch buffers that later calls
    reuse: a weight changed in place between calls, an input size equal to the
    hidden size (two weights of one shape), a call under ``torch.inference_mode``
    before one outside it, and more shapes than a thread keeps each give the
    generic loop's outputs."""
    torch = pytest.importorskip("torch")
    from rnn_xp import _fused_torch

    calls = _torch_native_calls(monkeypatch)
    fn = {"lstm": rnn_xp.lstm_forward, "gru": rnn_xp.gru_forward}[kind]
    g = {"lstm": 4, "gru": 3}[kind]
    rng = np.random.default_rng(10)

    def problem(d, h):
        biases = [(g * h,)] * (2 if kind == "gru" else 1)  # the GRU's bx and bh
        return [
            torch.asarray(rng.standard_normal(s).astype("float32"))
            for s in [(N, T, d), (d, g * h), (h, g * h), *biases]
        ]

    args = problem(H, H)  # D == H: Wx and Wh have one shape
    _, Wx, Wh, *_ = args
    checked = 0
    for step in range(3):
        context = torch.inference_mode() if step == 0 else torch.no_grad()
        with context:
            fast = fn(*args, inference=True)[0]
        want = _generic_forward(monkeypatch, fn, *args)
        assert_close(fast.numpy(), want.numpy().astype(np.float64), "float32", f"call {step}")
        checked += 1
        Wx.mul_(1.5)  # in place: the next call must see it
        Wh.add_(0.25)
    for d in range(1, 2 + 2 * _fused_torch.SCRATCH_COUNT):  # more shapes than are kept
        args = problem(d, H)
        fast = fn(*args, inference=True)[0]
        want = _generic_forward(monkeypatch, fn, *args)
        assert_close(fast.numpy(), want.numpy().astype(np.float64), "float32", f"D={d}")
        checked += 1
    assert calls == ["ran"] * checked
    assert len(_fused_torch._scratch.buffers) <= _fused_torch.SCRATCH_COUNT


def test_torch_s_scratch_weights_are_each_thread_s_own():
    """Threads that run at once, each with its own weights, each get their own result."""
    torch = pytest.importorskip("torch")
    import concurrent.futures

    rng = np.random.default_rng(11)
    xs = torch.asarray(rng.standard_normal((N, T, D)).astype("float32"))
    weights = [
        [torch.asarray(rng.standard_normal(s).astype("float32")) for s in [(D, 4 * H), (H, 4 * H)]]
        for _ in range(4)
    ]

    def run(k):
        Wx, Wh = weights[k % 4]
        return rnn_xp.lstm_forward(xs, Wx, Wh, None, inference=True)[0].numpy()

    alone = [run(k) for k in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(run, range(64)))
    for k, got in enumerate(together):
        np.testing.assert_array_equal(got, alone[k % 4])


def test_torch_s_scratch_weights_fall_back_to_a_fresh_copy(monkeypatch):
    """Where NumPy cannot copy into the scratch buffer (a tensor subclass that refuses
    ``numpy()``, say), the weights are copied by torch, with the same result."""
    torch = pytest.importorskip("torch")
    from rnn_xp import _fused_torch

    rng = np.random.default_rng(12)
    xs, Wx, Wh = (
        torch.asarray(rng.standard_normal(s).astype("float32"))
        for s in [(N, T, D), (D, 4 * H), (H, 4 * H)]
    )
    want = rnn_xp.lstm_forward(xs, Wx, Wh, None, inference=True)[0]

    class Refusing:
        @staticmethod
        def copyto(*args):
            raise TypeError("no NumPy view of this tensor")

    monkeypatch.setattr(_fused_torch, "np", Refusing)
    calls = _torch_native_calls(monkeypatch)
    got = rnn_xp.lstm_forward(xs, Wx, Wh, None, inference=True)[0]
    assert calls == ["ran"]
    np.testing.assert_array_equal(got.numpy(), want.numpy())


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torch_s_fast_paths_carry_forward_mode_tangents(monkeypatch):
    """A dual tensor of ``torch.autograd.forward_ad`` (any argument, with or without a
    tape) gets the generic loop's tangent: the fast paths would drop it."""
    torch = pytest.importorskip("torch")
    from torch.autograd import forward_ad

    rng = np.random.default_rng(13)
    args = [torch.asarray(rng.standard_normal(s)) for s in [(N, T, D), (D, 4 * H), (H, 4 * H)]]
    tangent = [torch.asarray(rng.standard_normal(tuple(a.shape))) for a in args]

    def tangents():
        got = []
        for k in range(3):
            for inference in (True, False):
                with forward_ad.dual_level():
                    duals = list(args)
                    duals[k] = forward_ad.make_dual(args[k], tangent[k])
                    hs = rnn_xp.lstm_forward(*duals, None, inference=inference)[0]
                    got.append(forward_ad.unpack_dual(hs).tangent)
        return got

    fast = tangents()
    monkeypatch.setattr(_fastpath, "DISABLED", True)
    generic = tangents()
    for i, (f, g) in enumerate(zip(fast, generic)):
        assert f is not None, i
        assert g is not None, i
        assert_close(f.numpy(), g.numpy(), "float64", f"tangent {i}")


@pytest.mark.filterwarnings("ignore:`torch.jit.(script|trace)` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:Dynamo detected:UserWarning")  # array-api-compat's caches
def test_torch_s_scratch_weights_stay_out_of_traces_and_graphs(monkeypatch):
    """``torch.jit.trace`` and ``torch.compile`` of an inference call give the generic
    loop's outputs for other weights than those traced with, and a default device
    other than the CPU leaves the CPU scratch buffers on the CPU."""
    torch = pytest.importorskip("torch")
    from rnn_xp import _fused_torch

    rng = np.random.default_rng(14)

    def weights():
        return [
            torch.asarray(rng.standard_normal(s).astype("float32"))
            for s in [(D, 4 * H), (H, 4 * H)]
        ]

    xs = torch.asarray(rng.standard_normal((N, T, D)).astype("float32"))

    def forward(xs, Wx, Wh):
        return rnn_xp.lstm_forward(xs, Wx, Wh, None, inference=True)[0]

    traced = torch.jit.trace(forward, (xs, *weights()), check_trace=False)
    compiled = torch.compile(forward, backend="eager")
    Wx, Wh = weights()
    got = [traced(xs, Wx, Wh), compiled(xs, Wx, Wh)]
    more = weights()
    _fused_torch._scratch.buffers = {}
    with torch.device("meta"):  # the default device for new tensors
        forward(xs, *more)
    assert len(_fused_torch._scratch.buffers) == 2
    assert all(b.device.type == "cpu" for b in _fused_torch._scratch.buffers.values())
    monkeypatch.setattr(_fastpath, "DISABLED", True)
    want = forward(xs, Wx, Wh)
    for i, g in enumerate(got):
        assert_close(g.numpy(), want.numpy().astype(np.float64), "float32", f"result {i}")
