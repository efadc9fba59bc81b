"""The optimizers, written once against the array API, on every backend."""

from __future__ import annotations

import numpy as np
import pytest

from rnn_xp.optim import SGD, Adam, clip_by_global_norm

TARGET = np.array([1.0, -2.0, 3.0])


def test_sgd_minimizes_a_quadratic(backend):
    target = backend.asarray(TARGET)
    params = {"w": backend.asarray(np.zeros(3))}
    opt = SGD(lr=0.1, max_norm=None)
    for _ in range(40):
        params = opt.step(params, {"w": 2 * (params["w"] - target)})
    np.testing.assert_allclose(backend.to_numpy(params["w"]), TARGET, atol=1e-3)


def test_adam_follows_its_update_rule(backend):
    """Ten steps against Adam written out in NumPy (Kingma & Ba, Algorithm 1)."""
    target = backend.asarray(TARGET)
    params = {"w": backend.asarray(np.zeros(3))}
    opt = Adam(lr=0.1, max_norm=None)
    w, m, v = np.zeros(3), np.zeros(3), np.zeros(3)
    for t in range(1, 11):
        params = opt.step(params, {"w": 2 * (params["w"] - target)})
        g = 2 * (w - TARGET)
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        w = w - 0.1 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    np.testing.assert_allclose(backend.to_numpy(params["w"]), w, rtol=1e-12)
    assert np.all(np.abs(w - TARGET) < np.abs(TARGET))  # and it moved towards the minimum


def test_clipping_by_global_norm_keeps_direction(backend):
    grads = {"a": backend.asarray(np.array([3.0, 0.0])), "b": backend.asarray(np.array([4.0]))}
    clipped, norm = clip_by_global_norm(grads, max_norm=1.0)
    assert norm.shape == ()  # a 0-d array on the device, not a float read back
    assert float(norm) == pytest.approx(5.0)
    np.testing.assert_allclose(backend.to_numpy(clipped["a"]), [0.6, 0.0])
    np.testing.assert_allclose(backend.to_numpy(clipped["b"]), [0.8])
    below, _ = clip_by_global_norm(grads, max_norm=10.0)
    for k in grads:  # scaled by exactly 1
        np.testing.assert_array_equal(backend.to_numpy(below[k]), backend.to_numpy(grads[k]))
    assert clip_by_global_norm(grads, max_norm=None)[0] is grads


SHAPES = {"Wx": (5, 12), "Wh": (3, 12), "b": (12,), "scalar": ()}


@pytest.mark.parametrize("max_norm", [None, 0.5, 3.0, 1e6])
def test_clipping_matches_a_float64_reference(backend, dtype, max_norm):
    """Global-norm clipping against NumPy float64, on gradients of several shapes."""
    rng = np.random.default_rng(3)
    grads = {k: np.asarray(rng.standard_normal(s), dtype) for k, s in SHAPES.items()}
    norm_ref = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values()))
    scale = 1.0 if max_norm is None else min(1.0, max_norm / (norm_ref + 1e-12))
    clipped, norm = clip_by_global_norm(
        {k: backend.asarray(g) for k, g in grads.items()}, max_norm
    )
    rtol = {"float32": 1e-6, "float64": 1e-13}[dtype]
    assert float(norm) == pytest.approx(norm_ref, rel=rtol)
    for k, g in grads.items():
        got = backend.to_numpy(clipped[k])
        assert got.dtype == g.dtype, k
        np.testing.assert_allclose(got, g.astype(np.float64) * scale, rtol=rtol, err_msg=k)


def test_clipping_keeps_each_gradients_dtype(backend):
    xp = backend.xp
    a = backend.asarray(np.full((2, 3), 3.0, np.float32))
    b = backend.asarray(np.full(4, 4.0, np.float64))
    clipped, norm = clip_by_global_norm({"a": a, "b": b}, max_norm=1.0)
    assert (clipped["a"].dtype, clipped["b"].dtype) == (xp.float32, xp.float64)
    assert norm.dtype == xp.float64  # the widest gradient's precision
    assert float(norm) == pytest.approx(np.sqrt(6 * 9 + 4 * 16), rel=1e-15)
    only32, norm32 = clip_by_global_norm({"a": a}, max_norm=1.0)
    assert (only32["a"].dtype, norm32.dtype) == (xp.float32, xp.float32)


@pytest.mark.parametrize("low", ["float16", "bfloat16"])
def test_low_precision_gradients_are_summed_in_float32(backend, low):
    """300 squared overflows float16 (largest 65504): the norm is summed in float32."""
    xp = backend.xp
    if getattr(xp, low, None) is None:
        pytest.skip(f"{backend.name} has no {low}")
    g = xp.astype(backend.asarray(np.full((8, 8), 300.0, np.float32)), getattr(xp, low))
    clipped, norm = clip_by_global_norm({"g": g}, max_norm=1200.0)
    assert norm.dtype == xp.float32
    assert float(norm) == 2400.0  # 300 * 8, exact in float32
    assert clipped["g"].dtype == g.dtype
    np.testing.assert_array_equal(backend.to_numpy(xp.astype(clipped["g"], xp.float32)), 150.0)


@pytest.mark.parametrize("optimizer", [SGD, Adam])
def test_optimizers_clip_before_their_step(backend, optimizer):
    """A gradient of norm 5 clipped to norm 1 moves the parameters as that gradient would."""
    zeros = {"w": backend.asarray(np.zeros(2))}
    clipped = optimizer(lr=0.1, max_norm=1.0).step(
        zeros, {"w": backend.asarray(np.array([3.0, 4.0]))}
    )
    unit = optimizer(lr=0.1, max_norm=None).step(
        zeros, {"w": backend.asarray(np.array([0.6, 0.8]))}
    )
    np.testing.assert_allclose(
        backend.to_numpy(clipped["w"]), backend.to_numpy(unit["w"]), rtol=1e-12
    )
