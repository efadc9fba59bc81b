"""The dynamic loss scaler: skip and back off on overflow, grow after finite steps."""

from __future__ import annotations

import numpy as np
import pytest

import rnn_xp
from rnn_xp.optim import SGD, Adam, LossScaler


def _arrays(backend, values: dict, dtype: str) -> dict:
    return {k: backend.asarray(np.asarray(v, dtype)) for k, v in values.items()}


def _half(backend) -> str:
    """float16 where the backend has it (array-api-strict has not: float32 there)."""
    return "float16" if hasattr(backend.xp, "float16") else "float32"


def test_a_finite_step_equals_the_unscaled_step(backend):
    rng = np.random.default_rng(0)
    params = _arrays(backend, {"w": rng.standard_normal((3, 4))}, "float32")
    grads = rng.standard_normal((3, 4)) * 1e-3
    scaler = LossScaler(init_scale=1024.0)
    scaled = _arrays(backend, {"w": grads * 1024.0}, _half(backend))
    new = scaler.step(SGD(lr=0.5, max_norm=None), params, scaled)
    want = backend.to_numpy(params["w"]) - 0.5 * grads
    got = backend.to_numpy(new["w"])
    assert got.dtype == np.float32
    # the scaled float16 gradient rounds to 11 bits; that is all that differs
    np.testing.assert_allclose(got, want, rtol=0, atol=0.5 * 1e-3 * 2.0**-10 * 4)
    assert (scaler.scale, scaler.skipped) == (1024.0, 0)


def test_an_overflowing_step_is_skipped_and_the_scale_backs_off(backend):
    params = _arrays(backend, {"w": np.ones((2, 2))}, "float32")
    grads = np.array([[1.0, np.inf], [0.0, 1.0]])
    adam = Adam(max_norm=None)
    scaler = LossScaler(init_scale=2.0**16, backoff_factor=0.25)
    new = scaler.step(adam, params, _arrays(backend, {"w": grads}, _half(backend)))
    assert new is params
    assert (scaler.scale, scaler.skipped, adam.t) == (2.0**14, 1, 0)
    assert adam.m == {}
    nan = _arrays(backend, {"w": np.full((2, 2), np.nan)}, "float32")
    assert scaler.step(adam, params, nan) is params
    assert (scaler.scale, scaler.skipped) == (2.0**12, 2)


def test_the_scale_grows_after_growth_interval_finite_steps():
    scaler = LossScaler(init_scale=8.0, growth_interval=3)
    params = {"w": np.zeros(2, np.float32)}
    grads = {"w": np.ones(2, np.float16)}
    scales = []
    for _ in range(7):
        params = scaler.step(SGD(lr=0.1, max_norm=None), params, grads)
        scales.append(scaler.scale)
    assert scales == [8.0, 8.0, 16.0, 16.0, 16.0, 32.0, 32.0]


def test_float16_gradients_that_underflow_unscaled_survive_scaled():
    """A model's backward in float16: without scaling the small gradients are zero."""
    model = rnn_xp.Recurrent("lstm", 3, 4, seed=0, dtype="float16")
    xs = np.random.default_rng(1).standard_normal((5, 2, 3)).astype(np.float16)
    out, _ = model.forward(xs)
    tiny = np.full(out.shape, 1e-8, np.float16)  # rounds to 0 in float16
    assert not tiny.any()
    scaler = LossScaler(init_scale=2.0**20)
    dout = scaler.scale_gradient(np.full(out.shape, 1e-8, np.float32)).astype(np.float16)
    model.backward(dout)
    assert any(np.any(g != 0) for g in model.grads.values())
    params = {k: v.astype(np.float32) for k, v in model.state_dict().items()}
    new = scaler.step(SGD(lr=1.0, max_norm=None), params, model.grads)
    assert scaler.skipped == 0
    assert any(np.any(new[k] != params[k]) for k in params)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"init_scale": 0}, r"init_scale: expected a number in \(0, inf\)"),
        ({"growth_factor": 1.0}, r"growth_factor: expected a number in \(1, inf\)"),
        ({"backoff_factor": 1.0}, r"backoff_factor: expected a number in \(0, 1\)"),
        ({"growth_interval": 0}, r"growth_interval: expected a positive integer"),
        ({"init_scale": True}, r"init_scale: expected a number"),
    ],
)
def test_bad_settings_get_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossScaler(**kwargs)


def test_mismatched_gradients_change_nothing():
    scaler = LossScaler()
    params = {"w": np.zeros(2, np.float32)}
    with pytest.raises(ValueError, match=r"grads: expected the keys of params"):
        scaler.step(SGD(), params, {"v": np.zeros(2, np.float32)})
    assert (scaler.scale, scaler.skipped) == (2.0**15, 0)
