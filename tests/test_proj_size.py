"""LSTM with projections: parity with ``torch.nn.LSTM(proj_size=P)``.

Outputs, ``h_n``, ``c_n`` and every ``param.grad``, for two layers,
bidirectional or not, batch-first or not, with ``lengths`` (torch: packed
sequences) and given initial states, on NumPy and on torch tensors.
"""

from __future__ import annotations

import numpy as np
import pytest

import rnn_xp
from tests.support import assert_close

torch = pytest.importorskip("torch")

T, N, D, H, P = 6, 4, 5, 7, 3
LENGTHS = [6, 3, 5, 1]


def _torch_run(module, x, h0, c0, dout, dh, dc):
    """torch's outputs and gradients, through packed sequences."""
    pack = torch.nn.utils.rnn.pack_padded_sequence
    packed = pack(x, LENGTHS, batch_first=module.batch_first, enforce_sorted=False)
    out, (h_n, c_n) = module(packed, (h0, c0))
    out, _ = torch.nn.utils.rnn.pad_packed_sequence(
        out, batch_first=module.batch_first, total_length=T
    )
    loss = (out * dout).sum() + (h_n * dh).sum() + (c_n * dc).sum()
    loss.backward()
    grads = {n: p.grad for n, p in module.named_parameters()}
    return out, h_n, c_n, grads


# torch's own float32 CPU LSTM warns that oneDNN does not take projections (and runs without).
@pytest.mark.filterwarnings("ignore:.*not supported with oneDNN:UserWarning")
@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_matches_torch_lstm_with_projections(bidirectional, batch_first, dtype, library):
    torch.manual_seed(0)
    tdtype = getattr(torch, dtype)
    module = torch.nn.LSTM(
        D, H, num_layers=2, bidirectional=bidirectional, batch_first=batch_first, proj_size=P
    ).to(tdtype)
    S = 2 * (2 if bidirectional else 1)
    shape = (N, T, D) if batch_first else (T, N, D)
    x = torch.randn(shape, dtype=tdtype, requires_grad=True)
    h0 = torch.randn(S, N, P, dtype=tdtype, requires_grad=True)
    c0 = torch.randn(S, N, H, dtype=tdtype, requires_grad=True)
    F = (2 if bidirectional else 1) * P
    dout = torch.randn((N, T, F) if batch_first else (T, N, F), dtype=tdtype)
    valid = torch.arange(T)[:, None] < torch.tensor(LENGTHS)[None, :]  # (T, N)
    dout = dout * (valid.T if batch_first else valid)[..., None]
    dh, dc = torch.randn(S, N, P, dtype=tdtype), torch.randn(S, N, H, dtype=tdtype)
    out, h_n, c_n, grads = _torch_run(module, x, h0, c0, dout, dh, dc)

    if library == "numpy":
        model = rnn_xp.from_torch(module)
        conv = lambda t: t.detach().numpy()  # noqa: E731
        back = np.asarray
    else:
        model = rnn_xp.from_torch(module, like=torch.zeros(1))
        conv = lambda t: t.detach().clone()  # noqa: E731
        back = lambda t: t.detach().numpy()  # noqa: E731
    assert (model.proj_size, model._widths) == (P, (P, H))
    got, (got_h, got_c) = model.forward(conv(x), (conv(h0), conv(c0)), lengths=LENGTHS)
    dxs = model.backward(conv(dout), (conv(dh), conv(dc)))
    pairs = [
        ("out", got, out),
        ("h_n", got_h, h_n),
        ("c_n", got_c, c_n),
        ("dxs", dxs, x.grad),
        ("dh0", model.dh0, h0.grad),
        ("dc0", model.dc0, c0.grad),
        *((name, model.grads[name], g) for name, g in grads.items()),
    ]
    assert sorted(model.grads) == sorted(grads)
    for name, mine, theirs in pairs:
        assert_close(back(mine), theirs.detach().numpy().astype(np.float64), dtype, name)


def test_shapes_follow_torch():
    model = rnn_xp.Recurrent("lstm", D, H, num_layers=2, bidirectional=True, proj_size=P)
    shapes = model._shapes()
    assert shapes["weight_hh_l0"] == (4 * H, P)
    assert shapes["weight_hr_l1_reverse"] == (P, H)
    assert shapes["weight_ih_l1"] == (4 * H, 2 * P)
    module = torch.nn.LSTM(D, H, num_layers=2, bidirectional=True, proj_size=P)
    assert list(shapes) == [n for n, _ in module.named_parameters()]
    assert all(shapes[n] == tuple(p.shape) for n, p in module.named_parameters())
    xs = np.zeros((T, N, D), np.float32)
    with pytest.raises(
        ValueError, match=r"h0: expected shape \(num_layers\*num_directions=4, N=4, proj_size=3\)"
    ):
        model.forward(xs, (np.zeros((4, N, H), np.float32), np.zeros((4, N, H), np.float32)))
