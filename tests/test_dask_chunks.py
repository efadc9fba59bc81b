"""Dask arrays whose chunks are not NumPy (CuPy on GPU workers), checked on the CPU.

* The op-by-op path (training, every backward) creates arrays with Dask's own,
  NumPy-backed functions; with chunks of another library it refuses at the
  call, naming the argument, instead of failing inside a worker later.
  NumPy's masked arrays stand in for CuPy here: Dask keeps their chunk type.
* Weights and models that a Dask graph sends to every chunk are one node of
  the graph, and move to a worker's device once (`_chunks.resident`).
"""

from __future__ import annotations

import gc

import numpy as np
import pytest

import rnn_xp
from rnn_xp import _chunks

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
N, T, D, H = 6, 4, 3, 5


def _masked_chunks(a):
    return da.ma.masked_array(da.from_array(a, chunks=(N // 2, *a.shape[1:])))


def _weights(gates, seed=0):
    rng = np.random.default_rng(seed)
    return [da.from_array(rng.standard_normal(s)) for s in ((D, gates * H), (H, gates * H))]


def test_backward_refuses_chunks_of_another_library():
    rng = np.random.default_rng(0)
    xs, dhs = _masked_chunks(rng.standard_normal((N, T, D))), da.ones((N, T, H))
    Wx, Wh = _weights(1)
    with pytest.raises(TypeError, match=r"^xs: a Dask array of numpy\.ma\.MaskedArray chunks"):
        rnn_xp.rnn_backward(dhs, xs, dhs, Wx, Wh, None)


def test_training_forward_refuses_chunks_of_another_library():
    xs = _masked_chunks(np.ones((N, T, D)))
    Wx, Wh = _weights(4)
    with pytest.raises(TypeError, match=r"inference=True"):
        rnn_xp.lstm_forward(xs, Wx, Wh, None)
    model = rnn_xp.Recurrent("gru", D, H, like=da.ones(1))
    with pytest.raises(TypeError, match=r"^xs: a Dask array of numpy\.ma\.MaskedArray"):
        model.forward(da.ma.masked_array(da.ones((T, N, D), chunks=(T, 3, D))))


def test_numpy_chunks_still_train():
    rng = np.random.default_rng(1)
    xs = da.from_array(rng.standard_normal((N, T, D)), chunks=(3, T, D))
    Wx, Wh = _weights(4)
    hs, _, _, cache = rnn_xp.lstm_forward(xs, Wx, Wh, None)
    dxs = rnn_xp.lstm_backward(da.ones_like(hs), cache)[0]
    assert np.isfinite(dxs.compute()).all()


def test_static_weights_are_one_node_of_the_graph():
    rng = np.random.default_rng(2)
    Wx, Wh = rng.standard_normal((D, H)), rng.standard_normal((H, H))
    xs = da.from_array(rng.standard_normal((12, T, D)), chunks=(2, T, D))
    hs, _ = rnn_xp.rnn_forward(xs, Wx, Wh, None)
    graph = dict(hs.__dask_graph__())
    holders = [k for k, v in graph.items() if v is Wx or getattr(v, "value", None) is Wx]
    assert len(holders) == 1, f"Wx is held by {len(holders)} nodes of the graph, not one"
    np.testing.assert_allclose(hs.compute(), rnn_xp.rnn_forward(xs.compute(), Wx, Wh, None)[0])


def test_a_model_is_one_node_of_the_graph():
    model = rnn_xp.Recurrent("lstm", D, H, seed=0).eval()
    xs = da.ones((T, 12, D), chunks=(T, 2, D))
    out, _ = model.forward(xs, inference=True)
    graph = dict(out.__dask_graph__())
    models = [k for k, v in graph.items() if isinstance(getattr(v, "value", v), rnn_xp.Recurrent)]
    assert len(models) == 1


class _Weights:  # np.ndarray stands for itself; any object that lives and dies will do
    pass


def test_resident_moves_once_per_object_and_device_and_forgets_the_dead():
    made = []

    def make(tag):
        made.append(tag)
        return f"copy {tag}"

    w = _Weights()
    assert _chunks.resident(w, "gpu0", lambda: make(0)) == "copy 0"
    assert _chunks.resident(w, "gpu0", lambda: make(1)) == "copy 0"
    assert _chunks.resident(w, "gpu1", lambda: make(2)) == "copy 2"
    assert made == [0, 2]
    keys = {k for k in _chunks._RESIDENT if k[0] == id(w)}
    assert len(keys) == 2
    del w
    gc.collect()
    assert not keys & set(_chunks._RESIDENT)


def test_numpy_weights_are_resident_in_the_chunks_library(monkeypatch):
    """A chunk of another library (torch standing in for CuPy) gets each weight moved once."""
    torch = pytest.importorskip("torch")
    moved = []
    import rnn_xp._backends as backends

    real = backends.asarray

    def counting(xp, a, dtype, dev):
        moved.append(a.shape)
        return real(xp, a, dtype, dev)

    monkeypatch.setattr(backends, "asarray", counting)
    W = np.ones((D, H))
    tokens = {"W": dask.base.tokenize(W)}
    seen = [
        _chunks._on_chunk(lambda xs, W: W, "xs", tokens, xs=torch.ones(2, D), W=W)
        for _ in range(3)
    ]
    assert moved == [(D, H)]
    assert all(s is seen[0] for s in seen)
    assert isinstance(seen[0], torch.Tensor)


def test_weights_changed_in_place_are_moved_again():
    """The copy is keyed by the weights' content (the graph's token), not their identity."""
    torch = pytest.importorskip("torch")
    W = np.ones((D, H))
    xs = torch.ones(2, D, dtype=torch.float64)

    def run():
        return _chunks._on_chunk(
            lambda xs, W: xs @ W, "xs", {"W": dask.base.tokenize(W)}, xs=xs, W=W
        )

    first = run()
    W *= 10
    second = run()
    np.testing.assert_array_equal(first.numpy(), np.full((2, H), 3.0))
    np.testing.assert_array_equal(second.numpy(), np.full((2, H), 30.0))
