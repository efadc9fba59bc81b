"""The fused in-place time loops of NumPy and CuPy, and of torch through `_fused_torch`.

The loops are written once against a NumPy-like ``lib``: the NumPy or CuPy
module, or `_fused_torch._TorchOps`, which gives torch NumPy's signatures.
`_fastpath` chooses ``lib`` and calls them only without a mask, and only for
the cell kinds in `KINDS`; the generic loop of `_scan` runs everything else.

* Forward: the loop writes into preallocated buffers with ``out=``
  (``matmul``, ``tanh``, in-place gate arithmetic), so a step allocates
  nothing and the outputs are never copied into a stacked array. The Elman
  loop works in a time-major copy of the input projection, so every step's
  slice is contiguous, and each output overwrites its own projection. When
  the initial state is zero, the first step's recurrent product is skipped.
  On NumPy and CuPy the LSTM's gates are activated into gate-major order, so
  each gate is a contiguous array. Inference keeps only the input
  projection, the output and O(N*H) scratch.
* Backward (LSTM and GRU everywhere; Elman on torch only, see
  `_fused_backward_pays`): the loop too writes each step's gate gradients in
  place into one preallocated array, with no per-step arrays and no stack
  after the loop. NumPy and CuPy compute them gate-major, each gate a
  contiguous array, and copy them into the step's (N, G) rows in one go. That
  array is time-major, (T, N, G), so the step's rows are one contiguous block
  when the next step multiplies them by ``Wh.T``: cuBLAS takes only C- or
  F-contiguous operands, and CuPy copies any other before every product.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

from ._fused_torch import _TorchOps

KINDS = frozenset({"elman", "lstm", "gru"})
"""The values of ``cell.kind`` that have fused loops here."""


def forward(lib: Any, cell: Any, xs, Wx, bx, Wh, bh, state0, reverse, keep, zero_state):
    """``(outs, state_n, saved, h_prev)`` of one direction, input projection included.

    No mask; ``cell.kind`` in `KINDS`. ``zero_state`` says that ``state0`` is
    all zeros, so the first step's recurrent product is skipped.
    """
    loop = {"elman": _elman, "lstm": _lstm, "gru": _gru}[cell.kind]
    return loop(lib, cell, xs, Wx, bx, Wh, bh, state0, reverse, keep, zero_state)


def backward(lib: Any, cell: Any, tape: Any, douts, dstate_n):
    """``(dax3, dah3, dstate0)`` of one direction, time-major (T, N, G).

    Each step writes its gate gradients into its contiguous slice of ``dax3`` (no
    per-step arrays, no stack after the loop; NumPy and CuPy compute them in
    gate-major scratch first, see `_gate_major_pays`), with the gradients of
    ``sigmoid`` and ``tanh`` computed from their outputs in place; the
    recurrent ``dA @ Wh.T`` of the next step goes into the same product as
    that step's output gradient (torch: ``addmm``). ``dstate_n`` entries may
    be None (zero). The tape comes from either forward loop: both save the same.
    No mask; ``cell.kind`` in `KINDS`; the caller checks `_fused_backward_pays`.
    """
    loop = {"elman": _elman_backward, "lstm": _lstm_backward, "gru": _gru_backward}[cell.kind]
    return loop(lib, cell, tape, douts, dstate_n)


def input_grads(lib: Any, xs, Wx, dax):
    """``(dxs, dWx)`` from the time-major gate gradients ``dax`` (T, N, G) of `backward`.

    ``dWx = xs.T @ dax`` needs the rows of ``xs`` (N, T, D) in the same (t, n)
    order: one time-major copy, cheaper than copying the wider ``dax``
    batch-major, or than ``tensordot`` (which copies ``xs`` too, transposed
    further). That buffer then receives ``dxs = dax @ Wx.T``, returned as its
    (N, T, D) view, so the copy costs no allocation beyond the one ``dxs``
    needs anyway: filling a freshly mapped buffer costs more than the copying.
    """
    (T, N, G), D = dax.shape, xs.shape[2]
    rows = lib.empty((T, N, D), dtype=dax.dtype)
    lib.copyto(rows, lib.transpose(xs, (1, 0, 2)))
    rows2, dax2 = rows.reshape(T * N, D), dax.reshape(T * N, G)
    dWx = lib.matmul(rows2.T, dax2)
    lib.matmul(dax2, _blas_operand(lib, Wx.T), out=rows2)
    return lib.transpose(rows, (1, 0, 2)), dWx


# -- the forward loops ------------------------------------------------------------


def _order(T: int, reverse: bool) -> range:
    return range(T - 1, -1, -1) if reverse else range(T)


def _project(lib: ModuleType, xs, Wx, bx, time_major: bool):
    """``xs @ Wx + bx`` as one matrix product: (N, T, G), or (T, N, G) if ``time_major``.

    The time-major copy adds the bias on the way, so it costs no more than
    adding it in place, and makes each step's slice contiguous.
    """
    N, T, D = xs.shape
    G = Wx.shape[1]
    ax = lib.matmul(xs.reshape(N * T, D), Wx).reshape(N, T, G)
    if time_major:
        tm = lib.empty((T, N, G), dtype=ax.dtype)
        if bx is None:
            lib.copyto(tm, lib.transpose(ax, (1, 0, 2)))
        else:  # a 2-D bias (N, G) broadcasts over the leading time axis as it is
            lib.add(lib.transpose(ax, (1, 0, 2)), bx, out=tm)
        return tm
    if bx is not None:
        lib.add(ax, bx[:, None, :] if bx.ndim == 2 else bx, out=ax)
    return ax


def _plus_product(lib: Any, out, c, a, b, scratch=None) -> None:
    """``out <- c + a @ b``; ``scratch``, shaped like ``out``, is needed when ``out`` is ``c``.

    torch adds the product inside the matrix product itself (``addmm``, BLAS's
    beta = 1), which saves a pass over ``out``; NumPy and CuPy add it after.
    """
    if isinstance(lib, _TorchOps):
        lib.plus_product(out, c, a, b)
    elif out is c:
        lib.matmul(a, b, out=scratch)
        lib.add(out, scratch, out=out)
    else:
        lib.matmul(a, b, out=out)
        lib.add(out, c, out=out)


def _blas_operand(lib: Any, a):
    """The 2-D ``a`` itself when it is C- or F-contiguous, else a C-contiguous copy.

    For a matrix that a loop multiplies by at every step: cuBLAS takes only
    those two layouts (CuPy copies any other array before each product), and
    NumPy took 1.6x as long with every other column of a (256, 512) matrix as
    with a contiguous copy of it.
    """
    if isinstance(lib, _TorchOps):
        return lib.blas_operand(a)
    return a if a.flags.c_contiguous or a.flags.f_contiguous else lib.ascontiguousarray(a)


def _halve_columns(lib: Any, a, blocks, G: int):
    """A copy of the weight or bias ``a`` (``G`` columns) with the column ``blocks`` halved.

    A bias whose last axis broadcasts ((1,), (N, 1), 0-d) is widened to ``G``
    columns first: halving its one column would halve every gate.

    sigmoid(x) = 0.5 * tanh(x / 2) + 0.5: with the sigmoid gates' columns of
    every weight and bias halved (exactly: a power of two), one tanh over a
    step's whole contiguous row of gates activates all of them at once, and
    the sigmoid gates then need only ``0.5 * t + 0.5`` (`_tanh_to_sigmoid_`).
    """
    if a is None:
        return None
    if a.ndim and a.shape[-1] == G:
        out = lib.copy(a)
    else:  # a bias shared by every column, (1,), (N, 1) or 0-d: one entry per column
        out = lib.empty((*a.shape[:-1], G), dtype=a.dtype)
        lib.copyto(out, a)
    for lo, hi in blocks:
        lib.multiply(out[..., lo:hi], 0.5, out=out[..., lo:hi])
    return out


def _tanh_to_sigmoid_(lib: Any, a) -> None:
    """In place: a <- 0.5 * a + 0.5, turning tanh(x / 2) into sigmoid(x)."""
    lib.multiply(a, 0.5, out=a)
    lib.add(a, 0.5, out=a)


def _elman(lib, cell, xs, Wx, bx, Wh, bh, state0, reverse, keep, zero_state):
    # Each step's output overwrites its own (contiguous) slice of the
    # time-major projection, which so becomes hs without another buffer.
    hs = _project(lib, xs, Wx, bx, time_major=True)
    T, N, H = hs.shape
    Wh = _blas_operand(lib, Wh)
    a = lib.empty((N, H), dtype=hs.dtype)
    saved, h_prev = [None] * T, [None] * T
    (h,) = state0
    for k, t in enumerate(_order(T, reverse)):
        out = hs[t]
        if k or not zero_state:
            _plus_product(lib, out, out, h, Wh, scratch=a)
        if bh is not None:
            lib.add(out, bh, out=out)
        if cell.nonlinearity == "tanh":
            lib.tanh(out, out=out)
        else:
            lib.maximum(out, 0, out=out)
        if keep:
            saved[t], h_prev[t] = out, h
        h = out
    return _outputs(lib, hs, keep), (lib.copy(h),), saved, h_prev


def _outputs(lib: Any, hs, keep: bool):
    """The outputs, batch-major, from the time-major buffer ``hs`` (T, N, H).

    With a tape kept, the tape holds views of ``hs`` (each step's previous
    state, the Elman steps' outputs), so the caller gets a copy of its own:
    changing it in place must not change the gradients (the generic loop's
    stacked outputs are fresh arrays too). In inference it is a view.
    """
    out = lib.transpose(hs, (1, 0, 2))
    if not keep:
        return out
    if isinstance(lib, _TorchOps):
        return lib.contiguous_copy(out)
    return lib.array(out, copy=True, order="C")


def _gate_major_pays(lib: Any) -> bool:
    """Whether LSTM and GRU elementwise work goes through gate-major arrays, (gates, N, H).

    On NumPy (and CuPy) each gate is then one contiguous array: NumPy took
    2.5-5x as long on column blocks of (N, gates*H). torch's kernels are slower
    still on the transposing read (171 us against 43 us for a plain tanh at
    (64, 64, 256, 256)), so torch works on the column blocks.
    """
    return not isinstance(lib, _TorchOps)


def _gate_major(lib, a, n: int):
    """``(n, N, H)`` view of the ``(N, n*H)`` array ``a``: gate k's columns as ``[k]``."""
    N, G = a.shape
    return lib.transpose(a.reshape(N, n, G // n), (1, 0, 2))


def _lstm(lib, cell, xs, Wx, bx, Wh, bh, state0, reverse, keep, zero_state):
    H = Wh.shape[0]
    sigmoids = [(0, 2 * H), (3 * H, 4 * H)]  # i, f and o; g is a tanh
    halve = functools.partial(_halve_columns, lib, blocks=sigmoids, G=4 * H)
    ax = _project(lib, xs, halve(Wx), halve(bx), False)
    # the halved copies of Wx and bx are dropped as soon as the projection is done
    Wh, bh = halve(Wh), halve(bh)
    N, T, G = ax.shape
    dtype = ax.dtype
    hs = lib.empty((T, N, H), dtype=dtype)  # time-major: each step contiguous
    ig = lib.empty((N, H), dtype=dtype)
    # Gate-major: the tanh that reads a step's pre-activations also writes
    # them as (4, N, H), and the rest of the step works on whole arrays.
    transpose = _gate_major_pays(lib)
    shape = (4, N, H) if transpose else (N, G)
    pre = lib.empty((N, G), dtype=dtype) if transpose else None
    if keep:  # every step's gates and cell state stay alive for backward
        gates, cs, tcs = (lib.empty((T, *s), dtype=dtype) for s in (shape, (N, H), (N, H)))
    else:  # O(N*H) scratch, the cell state alternating between two buffers
        gate_buf, tc_buf = lib.empty(shape, dtype=dtype), lib.empty((N, H), dtype=dtype)
        c_bufs = (lib.empty((N, H), dtype=dtype), lib.empty((N, H), dtype=dtype))
    saved, h_prev = [None] * T, [None] * T
    h, c = state0
    for k, t in enumerate(_order(T, reverse)):
        g_t = gates[t] if keep else gate_buf
        a = pre if transpose else g_t  # the recurrent product lands here directly
        if k or not zero_state:
            _plus_product(lib, a, ax[:, t, :], h, Wh)
        else:
            lib.copyto(a, ax[:, t, :])
        if bh is not None:
            lib.add(a, bh, out=a)
        if transpose:  # g = tanh(a); i, f, o = tanh(a / 2) so far
            lib.tanh(_gate_major(lib, a, 4), out=g_t)
            (i, f, g, o), i_f = g_t, g_t[:2]
        else:
            lib.tanh(a, out=a)
            i, f, g, o = (a[:, j * H : (j + 1) * H] for j in range(4))
            i_f = a[:, : 2 * H]
        _tanh_to_sigmoid_(lib, i_f)
        _tanh_to_sigmoid_(lib, o)
        c_new = cs[t] if keep else c_bufs[k % 2]
        lib.multiply(f, c, out=c_new)
        lib.multiply(i, g, out=ig)
        lib.add(c_new, ig, out=c_new)
        tc = tcs[t] if keep else tc_buf
        lib.tanh(c_new, out=tc)
        out = hs[t]
        lib.multiply(o, tc, out=out)
        if keep:
            saved[t], h_prev[t] = (i, f, g, o, tc, c), h
        h, c = out, c_new
    return _outputs(lib, hs, keep), (lib.copy(h), lib.copy(c)), saved, h_prev


def _gru(lib, cell, xs, Wx, bx, Wh, bh, state0, reverse, keep, zero_state):
    H = Wh.shape[0]
    halve = functools.partial(_halve_columns, lib, blocks=[(0, 2 * H)], G=3 * H)  # r and z
    ax = _project(lib, xs, halve(Wx), halve(bx), False)
    Wh, bh = halve(Wh), halve(bh)
    N, T, G = ax.shape
    dtype = ax.dtype
    hs = lib.empty((T, N, H), dtype=dtype)  # time-major: each step contiguous
    ah = lib.empty((N, G), dtype=dtype)
    diff = lib.empty((N, H), dtype=dtype)
    if keep:
        rzs, ns, ahns = (lib.empty((T, N, n), dtype=dtype) for n in (2 * H, H, H))
    else:
        rz_buf, n_buf = lib.empty((N, 2 * H), dtype=dtype), lib.empty((N, H), dtype=dtype)
    saved, h_prev = [None] * T, [None] * T
    (h,) = state0
    for k, t in enumerate(_order(T, reverse)):
        if k == 0 and zero_state:  # h is zero: h @ Wh + bh is bh
            lib.copyto(ah, 0 if bh is None else bh)
        elif bh is None:
            lib.matmul(h, Wh, out=ah)
        else:
            _plus_product(lib, ah, bh, h, Wh)
        rz = rzs[t] if keep else rz_buf
        lib.add(ax[:, t, : 2 * H], ah[:, : 2 * H], out=rz)
        lib.tanh(rz, out=rz)
        _tanh_to_sigmoid_(lib, rz)
        r, z = rz[:, :H], rz[:, H:]
        n = ns[t] if keep else n_buf
        lib.multiply(r, ah[:, 2 * H :], out=n)
        lib.add(n, ax[:, t, 2 * H :], out=n)
        lib.tanh(n, out=n)
        out = hs[t]
        lib.subtract(h, n, out=diff)  # h_t = n + z * (h - n) = (1 - z) * n + z * h
        lib.multiply(diff, z, out=diff)
        lib.add(n, diff, out=out)
        if keep:
            ahn = ahns[t]
            lib.copyto(ahn, ah[:, 2 * H :])
            saved[t], h_prev[t] = (r, z, n, ahn, h), h
        h = out
    return _outputs(lib, hs, keep), (lib.copy(h),), saved, h_prev


# -- the backward loops ------------------------------------------------------------


def _fused_backward_pays(lib: Any, kind: str) -> bool:
    """Whether the fused backward loop of ``kind`` beats the generic loop on ``lib``.

    Measured on the CPU (BENCHMARKS.md), forward+backward against the generic
    loop: torch 0.82-0.99x; NumPy LSTM 0.85-0.94x and GRU 0.85-0.96x
    (gate-major scratch), but Elman 0.94-1.07x: NumPy's small temporaries cost
    little, so Elman keeps the generic loop there.
    """
    return isinstance(lib, _TorchOps) or kind != "elman"


def _steps_back(T: int, reverse: bool) -> range:
    return range(T) if reverse else range(T - 1, -1, -1)


def _tanh_grad(lib: Any, out, a, th, tmp) -> None:
    """``out <- a * (1 - th**2)`` for ``th = tanh(x)``, as ``a - a*th*th``; a may be out."""
    lib.multiply(a, th, out=tmp)
    lib.multiply(tmp, th, out=tmp)
    lib.subtract(a, tmp, out=out)


def _sigmoid_grad(lib: Any, out, a, s, tmp) -> None:
    """``out <- a * s * (1 - s)`` for ``s = sigmoid(x)``, as ``a*s - a*s*s``; a may be out."""
    lib.multiply(a, s, out=out)
    lib.multiply(out, s, out=tmp)
    lib.subtract(out, tmp, out=out)


def _output_grad(lib: Any, dh, d_t, carry, dA_prev, WhT):
    """The gradient reaching this step's output h: ``d_t + carry + dA_prev @ WhT``.

    ``carry`` is what reaches h other than through ``Wh`` (``dh_n`` at the
    first step, GRU's ``dh * z``), either term may be None; the result is
    ``d_t`` itself, unwritten, when both are.
    """
    if dA_prev is None and carry is None:
        return d_t
    if dA_prev is None:
        lib.add(d_t, carry, out=dh)
    elif carry is None:
        _plus_product(lib, dh, d_t, dA_prev, WhT)
    else:
        _plus_product(lib, dh, carry, dA_prev, WhT)
        lib.add(dh, d_t, out=dh)
    return dh


def _elman_backward(lib, cell, tape, douts, dstate_n):
    N, T, H = douts.shape
    WhT = _blas_operand(lib, tape.Wh.T)
    dax = lib.empty((T, N, H), dtype=douts.dtype)
    dh, tmp = lib.empty((N, H), dtype=douts.dtype), lib.empty((N, H), dtype=douts.dtype)
    (carry,) = dstate_n
    dt = None
    for t in _steps_back(T, tape.reverse):
        dh_t = _output_grad(lib, dh, douts[:, t, :], carry, dt, WhT)
        carry, h, dt = None, tape.saved[t], dax[t]
        if cell.nonlinearity == "tanh":
            _tanh_grad(lib, dt, dh_t, h, tmp)
        else:
            lib.multiply(dh_t, h > 0, out=dt)
    return dax, dax, (lib.matmul(dt, WhT),)


def _lstm_backward(lib, cell, tape, douts, dstate_n):
    N, T, H = douts.shape
    dtype, WhT = douts.dtype, _blas_operand(lib, tape.Wh.T)
    dA3 = lib.empty((T, N, 4 * H), dtype=dtype)
    # Gate-major: the gate gradients go into (4, N, H) scratch, like the
    # forward's saved gates, and into the (N, 4H) rows in one copy.
    transpose = _gate_major_pays(lib)
    if transpose:
        dA4 = dA3.reshape(T, N, 4, H)  # a view: dA3 is contiguous
        dgm = lib.empty((4, N, H), dtype=dtype)
        di, df, dg, do = dgm
    dh, dc, tmp, dtc = (lib.empty((N, H), dtype=dtype) for _ in range(4))
    carry, dc_n = dstate_n
    lib.copyto(dc, 0 if dc_n is None else dc_n)
    dA = None
    for t in _steps_back(T, tape.reverse):
        dh_t = _output_grad(lib, dh, douts[:, t, :], carry, dA, WhT)
        carry, (i, f, g, o, tc, c_prev), dA = None, tape.saved[t], dA3[t]
        if not transpose:
            di, df, dg, do = (dA[:, j * H : (j + 1) * H] for j in range(4))
        lib.multiply(dh_t, o, out=dtc)  # dc += dh * o * (1 - tc**2)
        _tanh_grad(lib, dtc, dtc, tc, tmp)
        lib.add(dc, dtc, out=dc)
        lib.multiply(dh_t, tc, out=do)
        _sigmoid_grad(lib, do, do, o, tmp)
        lib.multiply(dc, g, out=di)
        _sigmoid_grad(lib, di, di, i, tmp)
        lib.multiply(dc, c_prev, out=df)
        _sigmoid_grad(lib, df, df, f, tmp)
        lib.multiply(dc, i, out=dg)
        _tanh_grad(lib, dg, dg, g, tmp)
        lib.multiply(dc, f, out=dc)  # what reaches the previous cell state
        if transpose:
            lib.copyto(lib.transpose(dA4[t], (1, 0, 2)), dgm)
    return dA3, dA3, (lib.matmul(dA, WhT), dc)


def _gru_backward(lib, cell, tape, douts, dstate_n):
    N, T, H = douts.shape
    dtype, WhT = douts.dtype, _blas_operand(lib, tape.Wh.T)
    dax3, dah3 = lib.empty((T, N, 3 * H), dtype=dtype), lib.empty((T, N, 3 * H), dtype=dtype)
    transpose = _gate_major_pays(lib)  # gate-major scratch, as in `_lstm_backward`
    if transpose:
        dax4 = dax3.reshape(T, N, 3, H)  # a view: dax3 is contiguous
        dgm = lib.empty((3, N, H), dtype=dtype)
        dr, dz, dn = dgm
    dh, tmp, hz = (lib.empty((N, H), dtype=dtype) for _ in range(3))
    (carry,) = dstate_n
    dah = None
    for t in _steps_back(T, tape.reverse):
        dh_t = _output_grad(lib, dh, douts[:, t, :], carry, dah, WhT)
        (r, z, n, ahn, h_prev), dax, dah = tape.saved[t], dax3[t], dah3[t]
        if not transpose:
            dr, dz, dn = dax[:, :H], dax[:, H : 2 * H], dax[:, 2 * H :]
        lib.multiply(dh_t, z, out=hz)  # what reaches h_prev directly: dh * z
        lib.subtract(dh_t, hz, out=dn)  # dn = dh * (1 - z) * (1 - n**2)
        _tanh_grad(lib, dn, dn, n, tmp)
        lib.multiply(dn, ahn, out=dr)  # dr = dn * ahn * r * (1 - r)
        _sigmoid_grad(lib, dr, dr, r, tmp)
        lib.subtract(h_prev, n, out=dz)  # dz = dh * (h_prev - n) * z * (1 - z)
        lib.multiply(dz, dh_t, out=dz)
        _sigmoid_grad(lib, dz, dz, z, tmp)
        if transpose:
            lib.copyto(lib.transpose(dax4[t], (1, 0, 2)), dgm)
        lib.copyto(dah[:, : 2 * H], dax[:, : 2 * H])
        lib.multiply(dn, r, out=dah[:, 2 * H :])
        carry = hz
    dh0 = lib.matmul(dah, WhT)
    lib.add(dh0, hz, out=dh0)
    return dax3, dah3, (dh0,)
