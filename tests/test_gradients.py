"""The analytic backward against finite differences, autodiff and torch.nn.RNN."""

from __future__ import annotations

import numpy as np
import pytest

import rnn_xp
from tests.support import BIAS_SHAPES, assert_close, make_problem

ARGS = ("xs", "h0", "Wx", "Wh", "b")  # in the order rnn_backward returns their gradients


def loss(p, **arrays):
    """sum(hs * dhs) + sum(h_n * dh_n): its gradient is what rnn_backward computes."""
    a = {name: getattr(p, name) for name in ARGS} | arrays
    hs, h_n = rnn_xp.rnn_forward(a["xs"], a["Wx"], a["Wh"], a["b"], h0=a["h0"])
    return float(np.sum(hs * p.dhs) + np.sum(h_n * p.dh_n))


def analytic(p):
    hs, _ = rnn_xp.rnn_forward(p.xs, p.Wx, p.Wh, p.b, h0=p.h0)
    grads = rnn_xp.rnn_backward(p.dhs, p.xs, hs, p.Wx, p.Wh, p.b, h0=p.h0, dh_n=p.dh_n)
    return dict(zip(ARGS, grads))


@pytest.mark.parametrize("bias", list(BIAS_SHAPES))
def test_layer_gradients_match_finite_differences(bias):
    p = make_problem(N=2, T=4, D=3, H=4, bias=bias)
    eps = 1e-6
    for name, grad in analytic(p).items():
        value = getattr(p, name)
        numeric = np.empty_like(value)
        for i in np.ndindex(value.shape):
            up, down = value.copy(), value.copy()
            up[i] += eps
            down[i] -= eps
            numeric[i] = (loss(p, **{name: up}) - loss(p, **{name: down})) / (2 * eps)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8, err_msg=name)


def test_cell_gradients_match_finite_differences():
    p = make_problem(N=2, T=1, D=3, H=4, bias="NH")
    x, dh = p.xs[:, 0, :], p.dh_n
    inputs = {"x": x, "h_prev": p.h0, "Wx": p.Wx, "Wh": p.Wh, "b": p.b}
    h_next = rnn_xp.rnn_cell_forward(**inputs)
    grads = dict(zip(inputs, rnn_xp.rnn_cell_backward(dh, h_next=h_next, **inputs)))
    eps = 1e-6
    for name, value in inputs.items():
        numeric = np.empty_like(value)
        for i in np.ndindex(value.shape):
            up, down = value.copy(), value.copy()
            up[i] += eps
            down[i] -= eps
            f = lambda v: np.sum(rnn_xp.rnn_cell_forward(**inputs | {name: v}) * dh)  # noqa: E731, B023
            numeric[i] = (f(up) - f(down)) / (2 * eps)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-8, err_msg=name)


@pytest.mark.parametrize("bias", ["H", "NH"])
def test_backward_matches_torch_autograd(bias):
    torch = pytest.importorskip("torch")
    p = make_problem(bias=bias)
    t = {name: torch.tensor(getattr(p, name), requires_grad=True) for name in ARGS}
    hs, h_n = rnn_xp.rnn_forward(t["xs"], t["Wx"], t["Wh"], t["b"], h0=t["h0"])
    (torch.sum(hs * torch.tensor(p.dhs)) + torch.sum(h_n * torch.tensor(p.dh_n))).backward()
    for name, grad in analytic(p).items():
        assert_close(t[name].grad.numpy(), grad, "float64", name)


@pytest.mark.parametrize("bias", ["H", "NH"])
def test_backward_matches_jax_vjp(bias):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    p = make_problem(bias=bias)

    def forward(xs, h0, Wx, Wh, b):
        return rnn_xp.rnn_forward(xs, Wx, Wh, b, h0=h0)

    primals = [jax.numpy.asarray(getattr(p, name)) for name in ARGS]
    _, vjp = jax.vjp(forward, *primals)
    cotangents = vjp((jax.numpy.asarray(p.dhs), jax.numpy.asarray(p.dh_n)))
    for (name, grad), got in zip(analytic(p).items(), cotangents):
        assert_close(np.asarray(got), grad, "float64", name)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_layer_matches_torch_nn_rnn(dtype):
    torch = pytest.importorskip("torch")
    p = make_problem(N=4, T=7, D=5, H=6, dtype=dtype)
    module = torch.nn.RNN(5, 6, batch_first=True, dtype=getattr(torch, dtype))
    xs = torch.tensor(p.xs.astype(dtype), requires_grad=True)
    h0 = torch.tensor(p.h0.astype(dtype), requires_grad=True)
    out, h_n = module(xs, h0[None])
    (torch.sum(out * torch.tensor(p.dhs.astype(dtype)))).backward()

    Wx = module.weight_ih_l0.detach().T.numpy()
    Wh = module.weight_hh_l0.detach().T.numpy()
    b = (module.bias_ih_l0 + module.bias_hh_l0).detach().numpy()
    layer = rnn_xp.RNNLayer(Wx, Wh, b, stateful=True)
    layer.set_state(h0.detach().numpy())
    hs = layer.forward(xs.detach().numpy())
    dxs = layer.backward(p.dhs.astype(dtype))
    dWx, dWh, db = layer.grads

    assert_close(hs, out.detach().numpy().astype(np.float64), dtype, "hs")
    assert_close(layer.h, h_n[0].detach().numpy().astype(np.float64), dtype, "h_n")
    expected = {
        "dxs": (dxs, xs.grad),
        "dh": (layer.dh, h0.grad),
        "dWx": (dWx, module.weight_ih_l0.grad.T),
        "dWh": (dWh, module.weight_hh_l0.grad.T),
        "db (bias_ih)": (db, module.bias_ih_l0.grad),
        "db (bias_hh)": (db, module.bias_hh_l0.grad),
    }
    for name, (ours, theirs) in expected.items():
        assert ours.dtype == np.dtype(dtype), name
        assert_close(ours, theirs.numpy().astype(np.float64), dtype, name)
