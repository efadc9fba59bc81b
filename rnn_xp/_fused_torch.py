"""torch's fast path: the in-place loops of `_fused_numpy`, run through `_TorchOps`.

torch has no loops of its own. `_TorchOps` gives it the NumPy signatures that
those loops call (``out=`` included), and `ops` hands it to them only when
autograd records none of the arrays: in-place writes would cut its graph. A
recorded forward or backward (a gradient penalty's, say) raises
NotImplementedError, and autograd then records the generic loop of `_scan`.

Where torch does better its own way, `_TorchOps` says so: the recurrent product
is added inside the matrix product (``addmm``, BLAS's beta = 1), which saves a
pass over the output. The loops themselves work on column blocks rather than
gate-major copies on torch (`_fused_numpy._gate_major_pays`), and fuse the
Elman backward too (`_fused_numpy._fused_backward_pays`).

On the CPU, for what torch's own sequence kernels express, `native_forward`
runs those instead: ``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh`` and
``torch.rnn_relu``, the ATen operators ``torch.nn.LSTM`` and its kin call
(oneDNN's RNN primitive in float32). They take the whole sequence in C++,
where the loops above pay torch's per-operation dispatch (~20 operations a
LSTM step) and its BLAS's per-step products; BENCHMARKS.md, "Ahead of each
library's own RNN", has the profile. The gradients then come from autograd
through the same operator (`native_backward`), as ``torch.nn``'s do.

torch itself is imported only when `ops` or `native_forward` is called.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, NamedTuple


def ops(arrays) -> _TorchOps:
    """`_TorchOps` on the device of ``arrays[0]``; None entries of ``arrays`` are skipped.

    NotImplementedError when autograd is recording any of ``arrays``.
    """
    import torch

    if torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in arrays):
        raise NotImplementedError
    return _TorchOps(torch, arrays[0].device)


class _TorchOps:
    """The NumPy functions the fused loops use, with NumPy's signatures, on torch."""

    def __init__(self, torch: ModuleType, device: Any) -> None:
        self.matmul, self.add, self.multiply = torch.matmul, torch.add, torch.mul
        self.subtract, self.tanh, self.copy = torch.sub, torch.tanh, torch.clone
        self.addmm = torch.addmm
        self._torch, self._device = torch, device

    def empty(self, shape, dtype):
        return self._torch.empty(shape, dtype=dtype, device=self._device)

    def maximum(self, a, value, out):
        return self._torch.clamp_min(a, value, out=out)

    def copyto(self, dst, src) -> None:
        dst.copy_(src) if isinstance(src, self._torch.Tensor) else dst.fill_(src)

    @staticmethod
    def transpose(a, axes):
        return a.permute(axes)

    # -- where torch differs from NumPy: the helpers of `_fused_numpy` call these

    def plus_product(self, out, c, a, b) -> None:
        """``out <- c + a @ b`` in one ``addmm`` (``out`` may be ``c``): no scratch needed."""
        if out is c:
            out.addmm_(a, b)
        else:
            self.addmm(c, a, b, out=out)

    @staticmethod
    def blas_operand(a):
        """The 2-D ``a`` itself when it is C- or F-contiguous, else a contiguous copy."""
        return a if a.is_contiguous() or a.T.is_contiguous() else a.contiguous()

    def contiguous_copy(self, a):
        """A C-contiguous copy of ``a``, whatever its strides."""
        return a.clone(memory_format=self._torch.contiguous_format)


# -- torch's own sequence kernels ---------------------------------------------------


class Native(NamedTuple):
    """The tape of `native_forward`: what autograd recorded, for `native_backward`.

    ``results`` are the operator's outputs (out, h_n[, c_n]) and ``leaves`` the
    detached inputs it was recorded from: xs, Wx, Wh, bx, bh and the initial
    states, None where absent.
    """

    results: tuple
    leaves: tuple


def _native_operator(torch: ModuleType, cell: Any):
    kind = getattr(cell, "kind", None)
    if kind == "lstm":
        return torch.lstm
    if kind == "gru":
        return torch.gru
    if kind == "elman":
        return {"tanh": torch.rnn_tanh, "relu": torch.rnn_relu}[cell.nonlinearity]
    raise NotImplementedError


def native_forward(cell, xs, Wx, bx, Wh, bh, state0, reverse: bool, keep: bool):
    """``(outs, state_n, tape)`` of one direction by torch's own operator, or NotImplementedError.

    CPU tensors of float32 or float64 that autograd is not recording, a cell
    of torch's (``elman``, ``lstm`` or ``gru``: their gate orders are torch's),
    biases each None or shared by every sequence (ndim <= 1), and no empty
    batch or sequence. The generic
    or fused loops run anything else. ``reverse`` flips the sequence in and
    out. With ``keep`` (not in ``torch.inference_mode``), the operator runs
    under autograd from detached copies of the inputs, and ``tape`` is a
    `Native` for `native_backward`; the outputs returned are copies. Else
    ``tape`` is None.
    """
    import torch

    operator = _native_operator(torch, cell)
    arrays = (xs, Wx, Wh, bx, bh, *state0)
    present = [a for a in arrays if a is not None]
    served = (torch.float32, torch.float64)
    if any(a.device.type != "cpu" or a.dtype not in served for a in present):
        raise NotImplementedError
    if len({a.dtype for a in present}) > 1 or any(b is not None and b.ndim > 1 for b in (bx, bh)):
        raise NotImplementedError
    if torch.is_grad_enabled() and any(a.requires_grad for a in present):
        raise NotImplementedError  # autograd records the generic loop instead
    if keep and (torch.is_inference_mode_enabled() or any(a.is_inference() for a in present)):
        raise NotImplementedError  # autograd cannot record from inference tensors
    H, G = Wh.shape
    if Wx.shape[1] != G or cell.gates * H != G or 0 in (*xs.shape, H):
        raise NotImplementedError
    with torch.enable_grad() if keep else torch.no_grad():
        leaves = tuple(None if a is None else a.detach().requires_grad_(keep) for a in arrays)
        x, wx, wh, b_x, b_h, *states = leaves
        zero = torch.zeros(G, dtype=xs.dtype, device=xs.device)
        # A bias of one entry (or 0-d) serves every column: expanded, autograd sums it back.
        b_x, b_h = (zero if b is None else b.expand(G) for b in (b_x, b_h))
        hx = tuple(s.unsqueeze(0) for s in states)
        if reverse:
            x = torch.flip(x, (1,))
        results = operator(
            x,
            hx if len(hx) > 1 else hx[0],
            [wx.T.contiguous(), wh.T.contiguous(), b_x, b_h],
            True,  # has_biases
            1,  # num_layers
            0.0,  # dropout
            False,  # train (dropout only)
            False,  # bidirectional
            True,  # batch_first
        )
        out, *finals = results  # (out, h_n[, c_n]), each state (1, N, H)
        # The flip is recorded too: the gradients of the outputs come in step order.
        outs = torch.flip(out, (1,)) if reverse else out
    if not keep:
        return outs, tuple(f[0] for f in finals), None
    # The caller's copies: autograd saved the operator's outputs, which an in-place
    # change of what we return (a ReLU after the RNN, say) must not reach.
    tape = Native((outs, *finals), leaves)
    return outs.detach().clone(), tuple(f[0].detach().clone() for f in finals), tape


def native_backward(tape: Native, douts, dstate_n):
    """``(dxs, dstate0, dWx, dWh, dbx, dbh)`` from a `native_forward` tape, by autograd.

    ``douts`` is (N, T, H), the gradient of the outputs as returned (for a
    reverse direction autograd runs back through the recorded flip); ``dstate_n``
    entries may be None (zero). A gradient autograd finds unused (an omitted
    initial state's) is zero. The tape is kept: backward may be called again.
    Where autograd records ``douts`` or ``dstate_n``, it records this too.
    """
    import torch

    out, *finals = tape.results
    outputs, grads = [out], [douts]
    for f, d in zip(finals, dstate_n):
        if d is not None:
            outputs.append(f)
            grads.append(d.unsqueeze(0))
    wanted = [leaf for leaf in tape.leaves if leaf is not None]
    # Gradients of a gradient: where autograd records the incoming gradients, so is
    # this backward (as the generic loop's would be).
    create_graph = torch.is_grad_enabled() and any(g.requires_grad for g in grads)
    with torch.enable_grad():
        found = torch.autograd.grad(
            outputs,
            wanted,
            grads,
            retain_graph=True,
            create_graph=create_graph,
            allow_unused=True,
        )
    found = iter(found)
    got = [None if leaf is None else next(found) for leaf in tape.leaves]
    got = [
        g if g is not None or leaf is None else torch.zeros_like(leaf)
        for g, leaf in zip(got, tape.leaves)
    ]
    dxs, dWx, dWh, dbx, dbh, *dstate0 = got
    return dxs, tuple(dstate0), dWx, dWh, dbx, dbh
