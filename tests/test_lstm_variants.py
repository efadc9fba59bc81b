"""The cells built on the public protocol, and the README's IndRNN, proven three ways.

Every backend of the matrix agrees with a NumPy float64 reference written from
each cell's paper (`tests/reference_cells.py`), forward and backward; the
analytic gradients agree with finite differences in float64, and with
torch.autograd and jax.vjp through the same forward. Each case is a
two-layer bidirectional model with ``lengths`` (one of them the full T) and
given initial states.
"""

from __future__ import annotations

import numpy as np
import pytest

import rnn_xp
from rnn_xp.lstm_variants import LayerNormLSTMCell, PeepholeLSTMCell, ProjectedLSTMCell
from tests import reference_cells as ref
from tests.support import assert_close

IndRNN = ref.readme_cell("IndRNN")

# name -> (mode, proj_size, the reference step)
CASES = {
    "indrnn": (IndRNN(), 0, ref.indrnn_step),
    "peephole": ("lstm_peephole", 0, ref.peephole_step),
    "layernorm": ("lstm_layernorm", 0, ref.layernorm_step),
    "projected": ("lstm", 2, ref.projected_step),
}


def _model(case, bias=True, dropout=0.0, **kwargs):
    mode, proj_size, _ = CASES[case]
    model = rnn_xp.Recurrent(
        mode, 3, 4, 2, bias, True, True, dropout, seed=0, dtype="float64", proj_size=proj_size
    )
    model.load_state_dict(ref.perturbed(model, **kwargs))
    return model


def _numpy_gradients(model, xs, lengths, states0, dout, dstates):
    """The NumPy float64 analytic backward (proven against finite differences below)."""
    out, h_n = model.forward(xs, ref.state_arg(states0), lengths=lengths)
    dxs = model.backward(dout, ref.state_arg(dstates))
    return out, h_n, dxs, dict(model.grads), (model.dh0, model.dc0)


@pytest.mark.parametrize("case", list(CASES))
def test_every_backend_matches_the_paper_reference(backend, dtype, case):
    base = _model(case)
    xs, lengths, states0, dout, dstates = ref.problem(base)
    sd = {k: np.asarray(v) for k, v in base.state_dict().items()}
    ref_out, ref_finals = ref.run_model(
        CASES[case][2], sd, xs, lengths, states0, base.num_layers, base.bidirectional
    )
    dout = dout * (np.arange(xs.shape[1]) < lengths[:, None])[..., None]
    _, _, ref_dxs, ref_grads, ref_d0 = _numpy_gradients(base, xs, lengths, states0, dout, dstates)

    a = lambda v: backend.asarray(np.asarray(v, dtype))  # noqa: E731
    model = base.to(like=a(np.zeros(1)), dtype=dtype)
    out, h_n = model.forward(
        a(xs), ref.state_arg(tuple(map(a, states0))), lengths=backend.asarray(lengths)
    )
    dxs = model.backward(a(dout), ref.state_arg(tuple(map(a, dstates))))
    assert sorted(model.grads) == sorted(sd)
    got = {"out": out, "dxs": dxs, **model.grads}
    want = {"out": ref_out, "dxs": ref_dxs, **ref_grads}
    for i, (s, r) in enumerate(zip(ref.finals_of(h_n), ref_finals)):
        got[f"state_n[{i}]"], want[f"state_n[{i}]"] = s, r
    for name, d, r in zip(("dh0", "dc0"), (model.dh0, model.dc0), ref_d0):
        if r is not None:
            got[name], want[name] = d, r
    # One evaluation of everything (Dask computes its shared graph once).
    for name, value in zip(got, backend.to_numpy_all(list(got.values()))):
        assert value.shape == want[name].shape, name
        assert_close(value, want[name], dtype, name)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_gradients_match_finite_differences(case, bias):
    """Every parameter, ``xs`` and the initial states, along random directions, with dropout."""
    model = _model(case, bias=bias, dropout=0.3)
    xs, lengths, states0, dout, dstates = ref.problem(model, N=2, T=4)
    rng = np.random.default_rng(7)
    keep = [rng.random(dout.shape) > 0.3]
    params = model.state_dict()

    def loss(params, xs, states):
        model.load_state_dict(params)
        out, h_n = model.forward(xs, ref.state_arg(states), lengths=lengths, dropout_masks=keep)
        finals = ref.finals_of(h_n)
        return float(np.sum(out * dout) + sum(np.sum(f * d) for f, d in zip(finals, dstates)))

    model.forward(xs, ref.state_arg(states0), lengths=lengths, dropout_masks=keep)
    dxs = model.backward(dout, ref.state_arg(dstates))
    analytic = {"xs": dxs, **model.grads, "state0": (model.dh0, model.dc0)}
    eps = 1e-6
    for name, grad in analytic.items():
        if name == "state0":
            for i, (s, g) in enumerate(zip(states0, grad)):
                v = rng.standard_normal(s.shape)
                moved = [
                    tuple(t + sign * eps * v if j == i else t for j, t in enumerate(states0))
                    for sign in (1, -1)
                ]
                numeric = (loss(params, xs, moved[0]) - loss(params, xs, moved[1])) / (2 * eps)
                np.testing.assert_allclose(np.sum(g * v), numeric, rtol=1e-6, atol=1e-8)
            continue
        value = xs if name == "xs" else params[name]
        v = rng.standard_normal(value.shape)
        values = []
        for sign in (1, -1):
            moved = value + sign * eps * v
            if name == "xs":
                values.append(loss(params, moved, states0))
            else:
                values.append(loss({**params, name: moved}, xs, states0))
        numeric = (values[0] - values[1]) / (2 * eps)
        np.testing.assert_allclose(np.sum(grad * v), numeric, rtol=1e-6, atol=1e-8, err_msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_backward_matches_torch_autograd_through_the_same_forward(case):
    torch = pytest.importorskip("torch")
    base = _model(case)
    xs, lengths, states0, dout, dstates = ref.problem(base)
    model = base.to(like=torch.zeros(1))
    leaves = {k: v.clone().requires_grad_(True) for k, v in model.state_dict().items()}
    model.load_state_dict(leaves)
    x = torch.tensor(xs, requires_grad=True)
    s0 = tuple(torch.tensor(s, requires_grad=True) for s in states0)

    out, h_n = model.forward(x, ref.state_arg(s0), lengths=torch.tensor(lengths))
    finals = ref.finals_of(h_n)
    loss = torch.sum(out * torch.tensor(dout))
    loss = loss + sum(torch.sum(f * torch.tensor(d)) for f, d in zip(finals, dstates))
    loss.backward()
    model.load_state_dict({k: v.detach() for k, v in leaves.items()})
    model.forward(
        x.detach(), ref.state_arg(tuple(s.detach() for s in s0)), lengths=lengths.tolist()
    )
    dxs = model.backward(torch.tensor(dout), ref.state_arg(tuple(map(torch.tensor, dstates))))

    assert_close(dxs.numpy(), x.grad.numpy(), "float64", "dxs")
    for name, leaf in leaves.items():
        assert_close(model.grads[name].numpy(), leaf.grad.numpy(), "float64", name)
    for name, d, s in zip(("dh0", "dc0"), (model.dh0, model.dc0), s0):
        assert_close(d.numpy(), s.grad.numpy(), "float64", name)


@pytest.mark.parametrize("case", list(CASES))
def test_backward_matches_jax_vjp_through_the_same_forward(case):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    base = _model(case)
    xs, lengths, states0, dout, dstates = ref.problem(base)
    model = base.to(like=jnp.zeros(1))
    params = model.state_dict()
    x, s0 = jnp.asarray(xs), tuple(map(jnp.asarray, states0))
    mask = jnp.asarray(np.arange(xs.shape[1]) < lengths[:, None])

    def forward(params, x, s0):
        model.load_state_dict(params)
        out, h_n = model.forward(x, ref.state_arg(s0), mask=mask)
        return out, ref.finals_of(h_n)

    _, vjp = jax.vjp(forward, params, x, s0)
    cot = (jnp.asarray(dout), tuple(map(jnp.asarray, dstates)))
    dparams, dx, ds0 = vjp(cot)
    model.load_state_dict(params)
    model.forward(x, ref.state_arg(s0), mask=mask)
    dxs = model.backward(cot[0], ref.state_arg(cot[1]))

    assert_close(np.asarray(dxs), np.asarray(dx), "float64", "dxs")
    for name, g in dparams.items():
        assert_close(np.asarray(model.grads[name]), np.asarray(g), "float64", name)
    for name, d, g in zip(("dh0", "dc0"), (model.dh0, model.dc0), ds0):
        assert_close(np.asarray(d), np.asarray(g), "float64", name)


def test_cells_compare_equal_by_what_they_compute():
    assert ProjectedLSTMCell(3) == ProjectedLSTMCell(3) != ProjectedLSTMCell(2)
    assert PeepholeLSTMCell() == PeepholeLSTMCell() != LayerNormLSTMCell()
    assert len({ProjectedLSTMCell(3), ProjectedLSTMCell(3), LayerNormLSTMCell()}) == 2


def test_layernorm_starts_as_the_identity_norm():
    """Gains start at one and shifts at zero, the other parameters as torch draws them."""
    model = rnn_xp.Recurrent("lstm_layernorm", 3, 4, seed=0)
    sd = model.state_dict()
    assert np.all(sd["ln_ih_weight_l0"] == 1)
    assert np.all(sd["ln_c_bias_l0"] == 0)
    k = 1 / np.sqrt(4)
    assert np.all(np.abs(sd["weight_hh_l0"]) <= k)
    assert np.std(sd["weight_hh_l0"]) > 0
    assert "bias_l0" not in rnn_xp.Recurrent("lstm_layernorm", 3, 4, bias=False).state_dict()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "gru", "proj_size": 2}, "proj_size: only mode 'lstm'"),
        ({"mode": "lstm", "proj_size": 4}, "proj_size: expected 0 (none) or 0 < proj_size"),
        ({"mode": "lstm", "proj_size": -1}, "proj_size: expected 0 (none) or 0 < proj_size"),
        ({"mode": "lstm", "proj_size": 1.5}, "proj_size: expected a non-negative integer"),
    ],
)
def test_bad_proj_size_is_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        rnn_xp.Recurrent(input_size=3, hidden_size=4, **kwargs)
