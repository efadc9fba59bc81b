"""torch's fast path: the in-place loops of `_fused_numpy`, run through `_TorchOps`.

torch has no loops of its own. `_TorchOps` gives it the NumPy signatures that
those loops call (``out=`` included), and `ops` hands it to them only when
autograd records none of the arrays: in-place writes would cut its graph. A
recorded forward or backward (a gradient penalty's, say), or a dual tensor of
forward-mode AD, raises NotImplementedError, and autograd then records the
generic loop of `_scan`.

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

Those operators take each weight as (G, K), the transpose of rnn_xp's (K, G),
and copy any other layout to it themselves. Without a tape, `_torch_layout`
copies it into a scratch buffer that the calling thread reuses from call to
call (the values are copied afresh every call; only the memory is kept).
Fresh copies each call slowed torch's LSTM at the notebook's size by an
amount that varied from process to process: 1.25-1.69x ``torch.nn``'s time,
against 1.27-1.28x with the buffers (BENCHMARKS.md).

torch itself is imported only when `ops` or `native_forward` is called.
"""

from __future__ import annotations

import threading
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

SCRATCH_BYTES = 1 << 20
"""The largest weight (bytes) whose transposed copy goes to a reused scratch buffer."""
SCRATCH_COUNT = 4
"""How many scratch buffers a thread keeps at most (the most recently used ones)."""

_scratch = threading.local()


def ops(arrays) -> _TorchOps:
    """`_TorchOps` on the device of ``arrays[0]``; None entries of ``arrays`` are skipped.

    NotImplementedError when autograd is recording any of ``arrays`` (`_recorded`).
    """
    import torch

    if _recorded(torch, [a for a in arrays if a is not None]):
        raise NotImplementedError
    return _TorchOps(torch, arrays[0].device)


def _recorded(torch: ModuleType, arrays) -> bool:
    """Whether autograd records any of ``arrays``, in reverse mode or in forward mode.

    Forward mode: a dual tensor of ``torch.autograd.forward_ad``, whose tangent
    the in-place loops, torch's operators from copies and NumPy's copies would
    drop; the generic loop carries it.
    """
    if torch.is_grad_enabled() and any(a.requires_grad for a in arrays):
        return True
    from torch.autograd import forward_ad

    # torch's own record of the dual level entered (-1: none, so no tangents anywhere);
    # private, so where it is missing every array is asked.
    if getattr(forward_ad, "_current_level", 0) < 0:
        return False
    return any(forward_ad.unpack_dual(a).tangent is not None for a in arrays)


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


def _scratch_buffer(torch: ModuleType, role: str, shape: tuple, dtype: Any):
    """This thread's (CPU) scratch buffer for ``role``, ``shape`` and ``dtype``.

    At most `SCRATCH_COUNT` are kept, the least recently used dropped first.
    A normal tensor even under ``torch.inference_mode``, so that later calls
    outside it can still write into it.
    """
    kept = getattr(_scratch, "buffers", None)
    if kept is None:
        kept = _scratch.buffers = {}
    key = (role, shape, dtype)
    buffer = kept.pop(key, None)
    if buffer is None:
        with torch.inference_mode(False):
            buffer = torch.empty(shape, dtype=dtype, device="cpu")
    kept[key] = buffer  # the most recently used last
    while len(kept) > SCRATCH_COUNT:
        kept.pop(next(iter(kept)))
    return buffer


def _torch_layout(torch: ModuleType, role: str, w, scratch: bool):
    """``w.T`` C-contiguous, as torch's sequence operators take a weight.

    ``w.T`` itself when it is (a view of a torch layer's weight, say). Else
    with ``scratch`` (no tape: nothing keeps the result after the call) and
    ``w`` at most `SCRATCH_BYTES`, a copy into this thread's scratch buffer for
    ``role``; else a fresh copy, which autograd records from ``w``. Never the
    buffer while ``torch.jit.trace`` or ``torch.compile`` records the call: the
    copy into it is invisible to them, and the trace would hold the buffer.
    """
    t = w.T
    if (
        not scratch
        or torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or t.is_contiguous()
        or w.numel() * w.element_size() > SCRATCH_BYTES
    ):
        return t.contiguous()
    buffer = _scratch_buffer(torch, role, tuple(t.shape), t.dtype)
    try:  # NumPy's transposing copy: 28 us against torch's 57 at (100, 400), equal at 1 MiB
        np.copyto(buffer.numpy(), w.detach().numpy().T)
    except (RuntimeError, TypeError):  # a tensor subclass or transform that refuses it
        return t.contiguous()
    return buffer


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
    if _recorded(torch, present):
        raise NotImplementedError  # autograd records the generic loop instead
    if keep and (torch.is_inference_mode_enabled() or any(a.is_inference() for a in present)):
        raise NotImplementedError  # autograd cannot record from inference tensors
    H, G = Wh.shape
    if Wx.shape[1] != G or cell.gates * H != G or 0 in (*xs.shape, H):
        raise NotImplementedError
    with torch.enable_grad() if keep else torch.no_grad():
        # Without a tape the arrays go in as they are (no autograd records them).
        leaves = (
            tuple(None if a is None else a.detach().requires_grad_() for a in arrays)
            if keep
            else arrays
        )
        x, wx, wh, b_x, b_h, *states = leaves
        # A bias of one entry (or 0-d) serves every column: expanded, autograd sums it back.
        b_x, b_h = (
            torch.zeros(G, dtype=xs.dtype, device=xs.device) if b is None else b.expand(G)
            for b in (b_x, b_h)
        )
        hx = tuple(s.unsqueeze(0) for s in states)
        if reverse:
            x = torch.flip(x, (1,))
        results = operator(
            x,
            hx if len(hx) > 1 else hx[0],
            [
                _torch_layout(torch, "x", wx, not keep),
                _torch_layout(torch, "h", wh, not keep),
                b_x,
                b_h,
            ],
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
