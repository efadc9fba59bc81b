"""`Recurrent` and `from_torch`: stacked, bidirectional, variable-length sequences."""

from __future__ import annotations

import numpy as np
import pytest

import rnn_xp
from rnn_xp.model import TORCH_MODES
from tests.support import assert_close, two_states

MODES = list(rnn_xp.MODES)
N, T, D, H = 3, 6, 4, 5


def numpy_copy(model: rnn_xp.Recurrent, to_numpy, dtype="float64") -> rnn_xp.Recurrent:
    """The same model on NumPy in ``dtype``, its parameters converted from ``model``'s."""
    twin = rnn_xp.Recurrent(
        model.mode,
        model.input_size,
        model.hidden_size,
        model.num_layers,
        model.bias,
        model.batch_first,
        model.bidirectional,
        model.dropout,
        dtype=dtype,
    )
    twin.load_state_dict({k: to_numpy(v).astype(dtype) for k, v in model.state_dict().items()})
    return twin


def step_mask(kind: str) -> np.ndarray | None:
    """Right-padded lengths, or a left-padded and gappy mask, for N=3, T=6."""
    if kind == "lengths":
        return np.array([6, 2, 4])
    if kind == "mask":
        return np.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [1, 0, 1, 0, 0, 1]], dtype=bool)
    return None


def outputs(model, xs, h0=None, steps=None, steps_kind=None, dout=None, dh_n=None, **kw):
    """Forward and backward; every output as a list, LSTM pairs flattened."""
    arg = {} if steps is None else {steps_kind: steps}
    out, h_n = model.forward(xs, h0, **arg, **kw)
    h_n = list(h_n) if isinstance(h_n, tuple) else [h_n]
    dxs = model.backward(dout, dh_n)
    grads = [model.grads[k] for k in sorted(model.grads)]
    return [out, *h_n, dxs, model.dh0, *([model.dc0] if model.dc0 is not None else []), *grads]


# -- every backend agrees with NumPy float64 --------------------------------------


@pytest.mark.parametrize("steps_kind", ["none", "lengths", "mask"])
@pytest.mark.parametrize("mode", MODES)
def test_model_matches_numpy_float64(backend, dtype, mode, steps_kind):
    rng = np.random.default_rng(1)
    like = backend.asarray(np.zeros(1, dtype=dtype))
    model = rnn_xp.Recurrent(
        mode,
        D,
        H,
        num_layers=2,
        bidirectional=True,
        batch_first=True,
        seed=3,
        like=like,
        dtype=dtype,
    )
    reference = numpy_copy(model, backend.to_numpy)
    xs = rng.standard_normal((N, T, D)).astype(dtype)
    dout = rng.standard_normal((N, T, 2 * H)).astype(dtype)
    S = 4
    h0 = rng.standard_normal((S, N, H)).astype(dtype)
    c0 = rng.standard_normal((S, N, H)).astype(dtype)
    steps = step_mask(steps_kind)

    def run(m, conv):
        state = (conv(h0), conv(c0)) if two_states(mode) else conv(h0)
        return outputs(
            m, conv(xs), state, None if steps is None else conv(steps), steps_kind, conv(dout)
        )

    got = run(model, backend.asarray)
    want = run(reference, lambda a: a.astype(np.float64) if a.dtype.kind == "f" else a)
    for i, (g, g_np, w) in enumerate(zip(got, backend.to_numpy_all(got), want)):
        assert g.dtype == getattr(backend.xp, dtype), i
        assert_close(g_np, w, dtype, f"output {i}")


# -- parity with torch.nn through from_torch -----------------------------------------
# Only the modes torch has a module for: from_torch maps nn.RNN/LSTM/GRU, nothing else.

TORCH_CASES = [
    pytest.param(
        mode,
        layers,
        bi,
        bias,
        id=f"{mode}-l{layers}-{'bi' if bi else 'uni'}-{'bias' if bias else 'nobias'}",
    )
    for mode in TORCH_MODES
    for layers in (1, 2)
    for bi in (False, True)
    for bias in (True, False)
]


def torch_module(torch, mode, layers, bi, bias, batch_first, dtype):
    cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}.get(mode, torch.nn.RNN)
    extra = {"nonlinearity": mode.removeprefix("rnn_")} if mode.startswith("rnn") else {}
    return cls(
        D,
        H,
        num_layers=layers,
        bias=bias,
        batch_first=batch_first,
        bidirectional=bi,
        dtype=getattr(torch, dtype),
        **extra,
    )


@pytest.mark.parametrize(("mode", "layers", "bi", "bias"), TORCH_CASES)
def test_from_torch_matches_torch_with_lengths(mode, layers, bi, bias):
    torch = pytest.importorskip("torch")
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    torch.manual_seed(0)
    module = torch_module(torch, mode, layers, bi, bias, batch_first=True, dtype="float64")
    xs = torch.randn(N, T, D, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor(step_mask("lengths"))
    packed = pack_padded_sequence(xs, lengths, batch_first=True, enforce_sorted=False)
    out, h_n = module(packed)
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=T)
    dout = torch.randn(out.shape, dtype=torch.float64)
    states = list(h_n) if isinstance(h_n, tuple) else [h_n]
    dstates = [torch.randn(s.shape, dtype=torch.float64) for s in states]
    (torch.sum(out * dout) + sum(torch.sum(s * d) for s, d in zip(states, dstates))).backward()

    model = rnn_xp.from_torch(module)
    got_out, got_h = model.forward(xs.detach().numpy(), lengths=lengths.numpy())
    got_states = list(got_h) if isinstance(got_h, tuple) else [got_h]
    dn = [d.numpy() for d in dstates]
    dxs = model.backward(dout.numpy(), tuple(dn) if two_states(mode) else dn[0])

    assert_close(got_out, out.detach().numpy(), "float64", "out")
    for i, (g, s) in enumerate(zip(got_states, states)):
        assert_close(g, s.detach().numpy(), "float64", f"state {i}")
    assert_close(dxs, xs.grad.numpy(), "float64", "dxs")
    assert set(model.grads) == {n for n, _ in module.named_parameters()}
    for name, p in module.named_parameters():
        assert_close(model.grads[name], p.grad.numpy(), "float64", name)


@pytest.mark.parametrize("mode", TORCH_MODES)
def test_from_torch_matches_torch_time_major_float32_with_h0(mode):
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    module = torch_module(torch, mode, 2, True, True, batch_first=False, dtype="float32")
    xs = torch.randn(T, N, D, requires_grad=True)
    h0 = torch.randn(4, N, H, requires_grad=True)
    c0 = torch.randn(4, N, H, requires_grad=True)
    out, _ = module(xs, (h0, c0) if two_states(mode) else h0)
    dout = torch.randn(out.shape)
    torch.sum(out * dout).backward()

    model = rnn_xp.from_torch(module)
    state = (h0.detach().numpy(), c0.detach().numpy()) if two_states(mode) else h0.detach().numpy()
    got, _ = model.forward(xs.detach().numpy(), state)
    dxs = model.backward(dout.numpy())

    assert got.dtype == np.float32
    assert_close(got, out.detach().numpy(), "float32", "out")
    assert_close(dxs, xs.grad.numpy(), "float32", "dxs")
    assert_close(model.dh0, h0.grad.numpy(), "float32", "dh0")
    if two_states(mode):
        assert_close(model.dc0, c0.grad.numpy(), "float32", "dc0")
    for name, p in module.named_parameters():
        assert_close(model.grads[name], p.grad.numpy(), "float32", name)


def test_from_torch_puts_parameters_on_like():
    torch = pytest.importorskip("torch")
    module = torch.nn.GRU(D, H, dtype=torch.float64)
    model = rnn_xp.from_torch(module, like=torch.zeros(1))
    for name, p in model.state_dict().items():
        assert isinstance(p, torch.Tensor), name
        assert p.dtype == torch.float64, name  # the module's dtype, not like's
        np.testing.assert_array_equal(p.numpy(), getattr(module, name).detach().numpy())


# -- masks --------------------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_masked_steps_are_skipped_as_if_absent(mode, bidirectional):
    """Keras' meaning: the result equals running each sequence without its masked steps."""
    rng = np.random.default_rng(2)
    model = rnn_xp.Recurrent(
        mode,
        D,
        H,
        num_layers=2,
        bidirectional=bidirectional,
        batch_first=True,
        seed=0,
        dtype="float64",
    )
    xs = rng.standard_normal((N, T, D))
    mask = step_mask("mask")
    out, h_n = model.forward(xs, mask=mask)
    h_n = h_n[0] if two_states(mode) else h_n
    for n in range(N):
        alone, alone_h = model.forward(xs[n : n + 1, mask[n]])
        alone_h = alone_h[0] if two_states(mode) else alone_h
        assert_close(out[n, mask[n]], alone[0], "float64", f"sequence {n}")
        assert_close(out[n, ~mask[n]], np.zeros_like(out[n, ~mask[n]]), "float64", "padding")
        assert_close(h_n[:, n], alone_h[:, 0], "float64", f"h_n of sequence {n}")


# -- gradients: finite differences, torch.autograd, jax.vjp ---------------------------


@pytest.mark.parametrize("mode", MODES)
def test_model_gradients_match_finite_differences(mode):
    rng = np.random.default_rng(4)
    n, t, d, h = 2, 4, 2, 3
    model = rnn_xp.Recurrent(
        mode,
        d,
        h,
        num_layers=2,
        bidirectional=True,
        batch_first=True,
        dropout=0.4,
        seed=1,
        dtype="float64",
    )
    xs = rng.standard_normal((n, t, d))
    h0 = rng.standard_normal((4, n, h))
    state0 = (h0, rng.standard_normal((4, n, h))) if two_states(mode) else h0
    mask = np.array([[True, False, True, True], [False, True, True, False]])
    keep = [rng.random((n, t, 2 * h)) > 0.4]
    dout = rng.standard_normal((n, t, 2 * h))
    dh_n = rng.standard_normal((4, n, h))

    def loss(m, x, s):
        out, h_n = m.forward(x, s, mask=mask, dropout_masks=keep)
        return float(np.sum(out * dout) + np.sum((h_n[0] if two_states(mode) else h_n) * dh_n))

    model.forward(xs, state0, mask=mask, dropout_masks=keep)
    dxs = model.backward(dout, (dh_n, None) if two_states(mode) else dh_n)
    analytic = {"xs": dxs, "h0": model.dh0, **model.grads}
    params = model.state_dict()
    eps = 1e-6
    for name, grad in analytic.items():
        value = xs if name == "xs" else h0 if name == "h0" else params[name]
        numeric = np.empty_like(value)
        for i in np.ndindex(value.shape):
            values = []
            for sign in (1, -1):
                v = value.copy()
                v[i] += sign * eps
                m = rnn_xp.Recurrent(mode, d, h, 2, True, True, True, 0.4, dtype="float64")
                m.load_state_dict(params | ({name: v} if name in params else {}))
                s = v if name == "h0" else h0
                values.append(
                    loss(m, v if name == "xs" else xs, (s, state0[1]) if two_states(mode) else s)
                )
            numeric[i] = (values[0] - values[1]) / (2 * eps)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8, err_msg=name)


@pytest.mark.parametrize("mode", MODES)
def test_backward_matches_torch_autograd_through_the_same_forward(mode):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    model = rnn_xp.Recurrent(
        mode, D, H, num_layers=2, bidirectional=True, seed=0, like=torch.zeros(1), dtype="float64"
    )
    leaves = {k: v.clone().requires_grad_(True) for k, v in model.state_dict().items()}
    model.load_state_dict(leaves)
    xs = torch.tensor(rng.standard_normal((T, N, D)), requires_grad=True)
    lengths = torch.tensor(step_mask("lengths"))
    dout = torch.tensor(rng.standard_normal((T, N, 2 * H)))

    out, _ = model.forward(xs, lengths=lengths)
    torch.sum(out * dout).backward()
    dxs = model.backward(dout)

    assert_close(dxs.detach().numpy(), xs.grad.numpy(), "float64", "dxs")
    for name, leaf in leaves.items():
        assert_close(model.grads[name].detach().numpy(), leaf.grad.numpy(), "float64", name)


@pytest.mark.parametrize("mode", MODES)
def test_backward_matches_jax_vjp_through_the_same_forward(mode):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    rng = np.random.default_rng(6)
    model = rnn_xp.Recurrent(
        mode,
        D,
        H,
        num_layers=2,
        bidirectional=True,
        batch_first=True,
        seed=0,
        like=jnp.zeros(1),
        dtype="float64",
    )
    params = model.state_dict()
    xs = jnp.asarray(rng.standard_normal((N, T, D)))
    mask = jnp.asarray(step_mask("mask"))
    dout = jnp.asarray(rng.standard_normal((N, T, 2 * H)))

    def forward(params, xs):
        model.load_state_dict(params)
        return model.forward(xs, mask=mask)[0]

    _, vjp = jax.vjp(forward, params, xs)
    dparams, dxs_jax = vjp(dout)
    model.load_state_dict(params)
    model.forward(xs, mask=mask)
    dxs = model.backward(dout)

    assert_close(np.asarray(dxs), np.asarray(dxs_jax), "float64", "dxs")
    for name, g in dparams.items():
        assert_close(np.asarray(model.grads[name]), np.asarray(g), "float64", name)


# -- initialization and dropout ------------------------------------------------------


def test_seed_gives_the_same_parameters_on_every_backend(backend, dtype):
    like = backend.asarray(np.zeros(1, dtype=dtype))
    model = rnn_xp.Recurrent(
        "lstm", D, H, num_layers=2, bidirectional=True, seed=7, like=like, dtype=dtype
    )
    reference = rnn_xp.Recurrent(
        "lstm", D, H, num_layers=2, bidirectional=True, seed=7, dtype="float64"
    )
    other = rnn_xp.Recurrent("lstm", D, H, num_layers=2, bidirectional=True, seed=8, dtype=dtype)
    bound = 1 / np.sqrt(H)
    for name, p in model.state_dict().items():
        assert p.dtype == getattr(backend.xp, dtype), name
        got = backend.to_numpy(p)
        np.testing.assert_array_equal(
            got, reference.state_dict()[name].astype(dtype), err_msg=name
        )
        assert np.all(np.abs(got) <= bound), name
        assert not np.array_equal(got, other.state_dict()[name]), name


def test_dropout_is_reproducible_and_off_in_eval():
    rng = np.random.default_rng(0)
    model = rnn_xp.Recurrent("gru", D, H, num_layers=3, dropout=0.5, seed=0, dtype="float64")
    xs = rng.standard_normal((T, N, D))
    with pytest.raises(
        ValueError, match=r"dropout_seed, dropout_masks: dropout=0\.5 in training mode needs"
    ):
        model.forward(xs)
    a, _ = model.forward(xs, dropout_seed=1)
    b, _ = model.forward(xs, dropout_seed=1)
    c, _ = model.forward(xs, dropout_seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    keep = [np.ones((T, N, H), dtype=bool)] * 2
    scaled, _ = model.forward(xs, dropout_masks=keep)
    plain, _ = model.eval().forward(xs)
    assert not np.allclose(scaled, plain)  # kept values are scaled by 1 / (1 - p)
    plain_again, _ = model.forward(xs, dropout_seed=1)  # eval: the seed changes nothing
    np.testing.assert_array_equal(plain, plain_again)
