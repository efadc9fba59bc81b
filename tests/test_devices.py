"""Every array stays on its own device: CuPy's current-device rule, on the CPU.

CuPy creates arrays, and runs kernels, on the *current* device, whatever
device its operands are on; with arrays on GPU 1 and GPU 0 current, a kernel
fails (or reaches across by peer access). So every public entry point of
rnn_xp enters its input's device once (`_backends.on_input_device`,
`on_model_device`).

No GPU is needed to check that. array_api_strict has a second device,
``device1``. Here it is given CuPy's rule: the fixture gives array_api_strict
a current device, which rnn_xp's device contexts set, and records every array
that comes into being anywhere else. A call is clean when, with its inputs on
``device1``, nothing is created or computed on the default device.
"""

from __future__ import annotations

import contextlib
import traceback
from types import SimpleNamespace

import numpy as np
import pytest

import rnn_xp
from rnn_xp import _backends, _scan, optim
from rnn_xp.elman import ElmanCell

aas = pytest.importorskip("array_api_strict")
Array = aas._array_object.Array
DEVICE1 = aas.Device("device1")
N, T, D, H = 3, 4, 5, 6


@pytest.fixture
def current():
    """array_api_strict with CuPy's current device; ``.stray`` lists what broke it."""
    state = SimpleNamespace(device=aas.__array_namespace_info__().default_device(), stray=[])
    watching = [False]
    on, device_context = _backends._on, _backends._device_context
    new = Array.__dict__["_new"].__func__

    @contextlib.contextmanager
    def enter(dev):
        before, state.device = state.device, dev
        try:
            yield
        finally:
            state.device = before

    def strict_on(xp, dev):
        return enter(dev) if xp is aas and dev is not None else on(xp, dev)

    def strict_context(a):
        return enter(a.device) if isinstance(a, Array) else device_context(a)

    def checked_new(cls, x, /, device):
        if watching[0] and device != state.device and not _scalar_bound(device):
            ours = [f for f in traceback.extract_stack() if "/rnn_xp/" in f.filename]
            where = f"{ours[-1].filename.rsplit('/', 1)[-1]}:{ours[-1].name}" if ours else "?"
            state.stray.append(f"{device} while {state.device} is current, at {where}")
        return new(cls, x, device=device)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_backends, "_on", strict_on)
        mp.setattr(_backends, "_device_context", strict_context)
        mp.setattr(Array, "_new", classmethod(checked_new))

        @contextlib.contextmanager
        def watch():
            watching[0] = True
            try:
                yield
            finally:
                watching[0] = False

        state.watch = watch
        yield state


def _scalar_bound(device) -> bool:
    """array_api_strict's own clip wraps a Python bound as a default-device array
    and takes its NumPy data at once (CuPy passes the scalar to its kernel)."""
    if device is not None:
        return False
    caller = traceback.extract_stack(limit=4)[0]
    return caller.name == "clip" and "array_api_strict" in caller.filename


def on1(a):
    return aas.asarray(np.asarray(a, dtype=np.float64), device=DEVICE1)


def arrays(*shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [on1(rng.standard_normal(s) * 0.5) for s in shapes]


def _sequence_calls():
    xs, dhs, h0, c0 = arrays((N, T, D), (N, T, H), (N, H), (N, H))
    Wx1, Wh1, b1 = arrays((D, H), (H, H), (H,), seed=1)
    Wx4, Wh4, b4 = arrays((D, 4 * H), (H, 4 * H), (4 * H,), seed=2)
    Wx3, Wh3, b3, c3 = arrays((D, 3 * H), (H, 3 * H), (3 * H,), (3 * H,), seed=3)
    x, dh = xs[:, 0, :], dhs[:, 0, :]

    def elman():
        hs, _ = rnn_xp.rnn_forward(xs, Wx1, Wh1, b1, h0)
        rnn_xp.rnn_backward(dhs, xs, hs, Wx1, Wh1, b1, h0)
        h = rnn_xp.rnn_cell_forward(x, h0, Wx1, Wh1, b1)
        rnn_xp.rnn_cell_backward(dh, x, h0, h, Wx1, Wh1, b1)
        cell = rnn_xp.RNN(Wx1, Wh1, b1)
        cell.forward(x, h0)
        cell.backward(dh)
        layer = rnn_xp.RNNLayer(Wx1, Wh1, b1, stateful=True)
        layer.set_state(h0)
        layer.forward(xs)
        layer.backward(dhs)

    def lstm():
        *_, cache = rnn_xp.lstm_forward(xs, Wx4, Wh4, b4, h0, c0)
        rnn_xp.lstm_backward(dhs, cache, h0, c0)
        rnn_xp.lstm_forward(xs, Wx4, Wh4, b4, inference=True)
        rnn_xp.lstm_cell_forward(x, h0, c0, Wx4, Wh4, b4)
        rnn_xp.lstm_cell_backward(dh, dh, x, h0, c0, Wx4, Wh4, b4)
        cell = rnn_xp.LSTM(Wx4, Wh4, b4)
        cell.forward(x, h0, c0)
        cell.backward(dh, dh)
        layer = rnn_xp.LSTMLayer(Wx4, Wh4, b4, stateful=True)
        layer.set_state(h0, c0)
        layer.forward(xs)
        layer.backward(dhs)

    def gru():
        _, _, cache = rnn_xp.gru_forward(xs, Wx3, Wh3, b3, c3, h0)
        rnn_xp.gru_backward(dhs, cache, h0)
        rnn_xp.gru_cell_forward(x, h0, Wx3, Wh3, b3, c3)
        rnn_xp.gru_cell_backward(dh, x, h0, Wx3, Wh3, b3, c3)
        cell = rnn_xp.GRU(Wx3, Wh3, b3, c3)
        cell.forward(x, h0)
        cell.backward(dh)
        layer = rnn_xp.GRULayer(Wx3, Wh3, b3, c3)
        layer.forward(xs)
        layer.backward(dhs)

    return {"elman": elman, "lstm": lstm, "gru": gru}


@pytest.mark.parametrize("kind", ["elman", "lstm", "gru"])
def test_cells_and_layers_stay_on_the_inputs_device(current, kind):
    call = _sequence_calls()[kind]
    with current.watch():
        call()
    assert sorted(set(current.stray)) == []


@pytest.mark.parametrize("mode", sorted(rnn_xp.MODES))
def test_the_sequence_model_stays_on_its_device(current, mode):
    xs, dout = arrays((T, N, D), (T, N, 2 * H))
    lengths = aas.asarray(np.array([T, 2, 1]), device=DEVICE1)
    mask = aas.asarray(np.arange(T) < np.array([[1], [T], [3]]), device=DEVICE1)
    with current.watch():
        model = rnn_xp.Recurrent(
            mode, D, H, num_layers=2, bidirectional=True, dropout=0.25, seed=0, like=xs
        )
        state = model.state_dict()
        model.load_state_dict(state)
        model = model.astype("float64")
        out, _ = model.forward(xs, lengths=lengths, dropout_seed=1)
        model.backward(dout)
        model.eval().forward(xs, mask=mask, inference=True)
        optim.SGD(lr=0.1).step(model.state_dict(), model.grads)
        optim.Adam().step(model.state_dict(), model.grads)
    assert sorted(set(current.stray)) == []
    assert out.device == DEVICE1
    assert all(g.device == DEVICE1 for g in model.grads.values())


def test_from_torch_lands_on_the_device_of_like(current):
    torch = pytest.importorskip("torch")
    (like,) = arrays((1,))
    module = torch.nn.LSTM(D, H, num_layers=2, bidirectional=True)
    (xs,) = arrays((T, N, D))
    with current.watch():
        model = rnn_xp.from_torch(module, like=like)
        out, _ = model.forward(xs)
    assert sorted(set(current.stray)) == []
    assert out.device == DEVICE1


def test_the_check_sees_a_call_that_does_not_enter_the_device(current):
    """The fixture can fail: the time loop, called past the entry points, is caught."""
    xs, Wx, Wh, h0 = arrays((N, T, D), (D, H), (H, H), (N, H))
    with current.watch():
        _scan.forward(aas, ElmanCell("tanh"), xs, Wx, Wh, None, None, (h0,))
    assert current.stray, "array_api_strict made no array off the current device"
    assert all("'device1') while" in s for s in current.stray)
