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
    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose(backend.to_numpy(clipped["a"]), [0.6, 0.0])
    np.testing.assert_allclose(backend.to_numpy(clipped["b"]), [0.8])
    same, _ = clip_by_global_norm(grads, max_norm=10.0)
    assert same is grads
