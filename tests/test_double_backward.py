"""Gradients of gradients (issue 13): a penalty on ``dxs``, differentiated again.

rnn_xp's forward is made of the library's own differentiable operations: on
torch, autograd records the generic loop (the fused in-place loops step aside
whenever autograd records, `_fused_torch.ops`); on JAX, the loop is a
``lax.scan``, which JAX differentiates to any order. So a gradient penalty
works through rnn_xp on both, where cuDNN's RNN kernels refuse the second
backward (pytorch/pytorch#5261; torch's own CPU kernels take it, as the last
tests here check).

Each test computes, with one library's autodiff throughout,

    dxs = d sum(out * w) / d xs            (the first gradient, kept in the graph)
    P   = sum(dxs ** 2)                    (the penalty)
    dP / d theta                           (the second backward)

for every parameter and input theta, and checks ``dP/dtheta . v`` along a
random direction ``v`` in each against the central finite difference
``(P(theta + eps v) - P(theta - eps v)) / (2 eps)``, each P again by autodiff,
in float64.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import rnn_xp
from rnn_xp.model import TORCH_MODES
from tests.support import two_states

MODES = list(rnn_xp.MODES)
N, T, D, H = 2, 4, 3, 4
EPS = 1e-6
CONFIGS = {
    "1_layer": ({"num_layers": 1}, None),
    "2_layers_bidirectional_lengths": ({"num_layers": 2, "bidirectional": True}, [T, 2]),
}


def check_against_finite_differences(penalty, theta, grads, seed=0):
    """``grads[k] . v`` against the central difference of ``penalty`` along ``v``, each k."""
    rng = np.random.default_rng(seed)
    assert set(grads) == set(theta)
    for name, value in theta.items():
        v = rng.standard_normal(value.shape)
        up = penalty(theta | {name: value + EPS * v})
        down = penalty(theta | {name: value - EPS * v})
        numeric = (up - down) / (2 * EPS)
        analytic = float(np.sum(np.asarray(grads[name]) * v))
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (
            f"{name}: second backward {analytic!r}, finite differences {numeric!r}"
        )


def model_problem(mode, config, seed=0):
    """A float64 NumPy model, its ``theta`` (parameters, xs, initial state), ``w``, lengths."""
    kwargs, lengths = CONFIGS[config]
    model = rnn_xp.Recurrent(mode, D, H, **kwargs, seed=seed, dtype="float64")
    rng = np.random.default_rng(seed + 1)
    S = model.num_layers * model.num_directions
    theta = dict(model.state_dict())
    theta["xs"] = rng.standard_normal((T, N, D))
    theta["h0"] = rng.standard_normal((S, N, H))
    if two_states(mode):
        theta["c0"] = rng.standard_normal((S, N, H))
    w = rng.standard_normal((T, N, model.num_directions * H))
    return model, theta, w, lengths


def forward_out(model, t, lengths):
    """``out`` of ``model`` run on the arrays ``t`` (parameters, xs, h0 and c0)."""
    model = copy.copy(model)  # its own parameters: a traced or recorded forward of its own
    model.load_state_dict({k: v for k, v in t.items() if k not in ("xs", "h0", "c0")})
    state = (t["h0"], t["c0"]) if "c0" in t else t["h0"]
    return model.forward(t["xs"], state, lengths=lengths, inference=True)[0]


# -- torch: autograd.grad with create_graph=True ------------------------------------


def torch_penalty(run, theta, w, second: bool):
    """``P`` and, if ``second``, ``dP/dtheta`` by torch's autograd."""
    torch = pytest.importorskip("torch")
    t = {k: torch.tensor(v, requires_grad=True) for k, v in theta.items()}
    out = run(t)
    (dxs,) = torch.autograd.grad(torch.sum(out * torch.tensor(w)), t["xs"], create_graph=True)
    p = torch.sum(dxs**2)
    if not second:
        return p.item(), None
    grads = torch.autograd.grad(p, list(t.values()))
    return p.item(), {k: g.numpy() for k, g in zip(t, grads)}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("mode", MODES)
def test_gradient_penalty_through_the_model_on_torch(mode, config):
    torch = pytest.importorskip("torch")
    model, theta, w, lengths = model_problem(mode, config)
    model = model.to(like=torch.zeros(1, dtype=torch.float64))
    n = None if lengths is None else torch.tensor(lengths)
    run = lambda t: forward_out(model, t, n)  # noqa: E731
    _, grads = torch_penalty(run, theta, w, second=True)
    check_against_finite_differences(lambda th: torch_penalty(run, th, w, False)[0], theta, grads)


# -- JAX: jax.grad of a function that itself calls jax.grad -------------------------


def jax_penalty(run, w):
    """``P`` as a function of ``theta``, for ``jax.value_and_grad``."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy

    def penalty(theta):
        dxs = jax.grad(lambda xs: jnp.sum(run(theta | {"xs": xs}) * w))(theta["xs"])
        return jnp.sum(dxs**2)

    return penalty


def jax_check(run, theta, w):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    # Compiled once each: the finite differences then reuse the compiled penalty.
    penalty = jax_penalty(run, jax.numpy.asarray(w))
    as_jax = lambda th: {k: jax.numpy.asarray(v) for k, v in th.items()}  # noqa: E731
    _, grads = jax.jit(jax.value_and_grad(penalty))(as_jax(theta))
    penalty = jax.jit(penalty)
    check_against_finite_differences(lambda th: float(penalty(as_jax(th))), theta, grads)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("mode", MODES)
def test_gradient_penalty_through_the_model_on_jax(mode, config):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    model, theta, w, lengths = model_problem(mode, config)
    model = model.to(like=jax.numpy.zeros(1, dtype=jax.numpy.float64))
    n = None if lengths is None else jax.numpy.asarray(lengths)
    jax_check(lambda t: forward_out(model, t, n), theta, w)


@pytest.mark.parametrize("mode", MODES)
def test_the_analytic_backward_is_recorded_by_autograd_too(mode):
    # When autograd records, the fused backward steps aside as the forward
    # does, and the generic backward's torch operations are recorded: the
    # penalty on Recurrent.backward's dxs has the same gradients. Where the
    # true gradient is zero (relu's second derivative), autograd finds no
    # path through the analytic backward's mask and returns None.
    torch = pytest.importorskip("torch")
    model, theta, w, lengths = model_problem(mode, "2_layers_bidirectional_lengths")
    model = model.to(like=torch.zeros(1, dtype=torch.float64))
    t = {k: torch.tensor(v, requires_grad=True) for k, v in theta.items()}
    model.load_state_dict({k: v for k, v in t.items() if k not in ("xs", "h0", "c0")})
    state = (t["h0"], t["c0"]) if "c0" in t else t["h0"]
    out, _ = model.forward(t["xs"], state, lengths=torch.tensor(lengths))
    (dxs,) = torch.autograd.grad(torch.sum(out * torch.tensor(w)), t["xs"], create_graph=True)
    analytic_dxs = model.backward(torch.tensor(w))
    expected = torch.autograd.grad(torch.sum(dxs**2), list(t.values()), retain_graph=True)
    got = torch.autograd.grad(torch.sum(analytic_dxs**2), list(t.values()), allow_unused=True)
    for name, a, b in zip(t, got, expected):
        a = torch.zeros_like(b) if a is None else a
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-12, err_msg=name)


# -- the sequence functions -------------------------------------------------------


def sequence_problem(kind, seed=2):
    """``theta`` of ``rnn_forward``, ``lstm_forward`` or ``gru_forward``, and ``w``."""
    rng = np.random.default_rng(seed)
    G = {"rnn": 1, "lstm": 4, "gru": 3}[kind] * H
    theta = {
        "xs": rng.standard_normal((N, T, D)),
        "Wx": rng.standard_normal((D, G)) / np.sqrt(D),
        "Wh": rng.standard_normal((H, G)) / np.sqrt(H),
        "b": rng.standard_normal(G),
        "h0": rng.standard_normal((N, H)),
    }
    if kind == "lstm":
        theta["c0"] = rng.standard_normal((N, H))
    if kind == "gru":
        theta["bh"] = rng.standard_normal(G)
    return theta, rng.standard_normal((N, T, H))


def sequence_out(kind, t):
    if kind == "rnn":
        return rnn_xp.rnn_forward(t["xs"], t["Wx"], t["Wh"], t["b"], h0=t["h0"])[0]
    if kind == "lstm":
        args = (t["xs"], t["Wx"], t["Wh"], t["b"], t["h0"], t["c0"])
        return rnn_xp.lstm_forward(*args, inference=True)[0]
    args = (t["xs"], t["Wx"], t["Wh"], t["b"], t["bh"], t["h0"])
    return rnn_xp.gru_forward(*args, inference=True)[0]


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_gradient_penalty_through_the_sequence_functions_on_torch(kind):
    theta, w = sequence_problem(kind)
    run = lambda t: sequence_out(kind, t)  # noqa: E731
    _, grads = torch_penalty(run, theta, w, second=True)
    check_against_finite_differences(lambda th: torch_penalty(run, th, w, False)[0], theta, grads)


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_gradient_penalty_through_the_sequence_functions_on_jax(kind):
    theta, w = sequence_problem(kind)
    jax_check(lambda t: sequence_out(kind, t), theta, w)


# -- context: torch.nn's own CPU kernels take a second backward too ----------------


@pytest.mark.parametrize("mode", TORCH_MODES)  # against torch.nn's own modules
def test_the_penalty_matches_torch_nn_on_the_cpu(mode):
    # cuDNN refuses this second backward (pytorch/pytorch#5261); torch's CPU
    # kernels are differentiable operations and take it. Both libraries'
    # penalty gradients agree here.
    torch = pytest.importorskip("torch")
    kinds = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}
    extra = {} if mode in kinds else {"nonlinearity": mode[4:]}
    torch.manual_seed(0)
    module = kinds.get(mode, torch.nn.RNN)(D, H, 2, dtype=torch.float64, **extra)
    model = rnn_xp.from_torch(module, like=torch.zeros(1, dtype=torch.float64))
    rng = np.random.default_rng(3)
    xs_np, w = rng.standard_normal((T, N, D)), torch.tensor(rng.standard_normal((T, N, H)))

    def penalty_grads(forward, params):
        xs = torch.tensor(xs_np, requires_grad=True)
        (dxs,) = torch.autograd.grad(torch.sum(forward(xs) * w), xs, create_graph=True)
        return torch.autograd.grad(torch.sum(dxs**2), params)

    names = [n for n, _ in module.named_parameters()]
    expected = penalty_grads(lambda xs: module(xs)[0], list(module.parameters()))
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in module.named_parameters()}
    model.load_state_dict(leaves)
    got = penalty_grads(lambda xs: model.forward(xs)[0], [leaves[n] for n in names])
    for name, a, b in zip(names, got, expected):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-12, err_msg=name)
