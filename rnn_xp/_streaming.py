"""Streaming: one time step through every layer of a unidirectional `Recurrent`.

`step` is online inference: the input arrives one step at a time and each call
returns that step's output and the state to pass to the next call. Stepping
through a sequence computes what `Recurrent.forward` computes over it, in the
same order:

* On NumPy (model, input and state all plain ``numpy.ndarray`` of the model's
  dtype) each layer runs the elementwise operations of `_fastpath`'s fused
  loops, in place into a few fresh arrays: the gates pre-activation
  ``(h @ Wh) + ((x @ Wx) + b)``, the sigmoid gates as ``0.5 * tanh(a / 2) + 0.5``,
  and so on. Halving the sigmoid gates' columns *after* the products is exact
  (a power of two), so it needs no halved copies of the weights as `forward`
  makes them: what `step` keeps per model (`_plan`) is views of the parameters
  and never goes stale, even if a parameter is changed in place.
* Anywhere else (torch, JAX, CuPy, Dask, array-api-strict, mixed dtypes, and
  when ``_fastpath.DISABLED`` is set) it runs the cells' own ``step`` after
  ``x @ Wx + bx``, as the generic loop of `_scan` does. That path is
  differentiable (torch autograd, ``jax.grad``) and traceable by ``jax.jit``.

The products themselves are the BLAS's, and a row of ``xs @ Wx`` over the N*T
rows of a sequence need not come out with the bits of the same row in a product
of N rows (with OpenBLAS 0.3.31, float64, it does not at (N, T, D, G) =
(1, 7, 128, 512) or (4, 50, 64, 256)). So a step equals a one-step `forward`
to the last bit, and stepping through a sequence equals `forward` over it to
the last bit where the products agree, to rounding (an ulp or two) otherwise.
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

import numpy as np

from . import _checks, _fastpath, _mixed
from ._backends import on_model_device, zeros
from ._layer import cast

Array = Any
State = Array | tuple[Array | None, Array | None]

__all__ = ["step"]


class _Plan(NamedTuple):
    """What a model's steps share: sizes and views of its parameters, never copies."""

    params: dict  # the model's parameter dict the plan was made from
    numpy: bool  # the parameters are plain NumPy arrays: the in-place path may run
    kind: str  # the cell's kind
    relu: bool
    dtype: Any
    D: int
    H: int
    L: int
    # per layer (Wx, Wh, b_ih, b_hh): Wx = weight_ih.T (D, G), views of the parameters;
    # empty unless ``numpy``
    layers: tuple
    # LSTM on NumPy: the column scale that halves the sigmoid gates (i, f, o),
    # and the offset that with it turns their tanh(a / 2) into sigmoid(a)
    scale: Array | None
    offset: Array | None


# Keyed by the model, not stored on it: an attribute would travel with every
# pickled copy of the model (Dask ships the model to its workers), and views
# pickle as full copies of the parameters.
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plan(model: Any) -> _Plan:
    """The model's `_Plan`, made again when its parameters were replaced."""
    plan = _PLANS.get(model)
    if plan is not None and plan.params is model._params:
        return plan
    params = model._params
    # The in-place path has the fused kinds' steps only; a public cell's runs its own.
    numpy = model.cell.kind in _LAYER_STEPS and all(type(a) is np.ndarray for a in params.values())
    # Only NumPy's path uses the views; elsewhere even a transpose would be an
    # operation (a node of torch's graph, a JAX tracer kept past its trace).
    layers = []
    for layer in range(model.num_layers if numpy else 0):
        w_ih, w_hh, b_ih, b_hh = (params.get(n) for n in model._names(layer, 0))
        layers.append((w_ih.T, w_hh.T, b_ih, b_hh))
    kind, H, dtype = model.cell.kind, model.hidden_size, model._dtype
    scale = offset = None
    if numpy and kind == "lstm":  # gates i, f, g, o: g is a tanh
        half, one, zero = np.full(H, 0.5, dtype), np.ones(H, dtype), np.zeros(H, dtype)
        scale = np.concatenate([half, half, one, half])
        offset = np.concatenate([half, half, zero, half])
    plan = _Plan(
        params,
        numpy,
        kind,
        getattr(model.cell, "nonlinearity", None) == "relu",
        dtype,
        model.input_size,
        H,
        model.num_layers,
        tuple(layers),
        scale,
        offset,
    )
    _PLANS[model] = plan
    return plan


def step(model: Any, x_t: Array, state: State | None = None) -> tuple[Array, State]:
    """One time step through every layer of a unidirectional model: ``(y_t, new_state)``.

    Parameters
    ----------
    model : Recurrent
        Unidirectional, and in eval mode if it has dropout between layers.
    x_t : array, shape (N, D)
        This step's input, D = ``model.input_size``.
    state : array, shape (num_layers, N, H), optional
        The state the previous step returned; zeros when omitted (the start of
        a sequence). For LSTM a pair ``(h, c)``, each (num_layers, N, H). The
        layout of `Recurrent.forward`'s ``h0`` and ``h_n``.

    Returns
    -------
    y_t : array, shape (N, H)
        The last layer's output: ``out[t]`` of `Recurrent.forward`.
    new_state : array, shape (num_layers, N, H), or a pair for LSTM
        Pass it to the next call. ``y_t`` and ``new_state`` are new arrays,
        shared with nothing.

    Raises
    ------
    ValueError
        For a bidirectional model (its reverse direction starts at the end of
        the sequence); for a model in training mode whose dropout between
        layers would apply: ``step`` is inference and applies no dropout (as
        torch's ``nn.LSTM`` applies none in eval mode), so call
        ``model.eval()`` first. Also for arrays of the wrong shape.
    TypeError
        For arrays of another library than the model's, or not real floating.

    Notes
    -----
    Arrays, dtypes and devices follow `Recurrent.forward`: the step computes
    in the result dtype of ``x_t``, the state and the parameters, and returns
    arrays of that dtype; under the model's precision policy (``precision=``)
    it runs the policy as `forward` does: ``y_t`` in its output dtype, the
    state float32. Nothing is recorded for `Recurrent.backward`, and
    the model is not changed: a tape from an earlier ``forward`` survives.

    ``for t in range(T): y[t], state = step(model, xs[t], state)`` gives
    ``forward``'s ``out`` and ``h_n`` (time-major ``xs``): the same operations
    in the same order on every backend, up to the bits a BLAS gives a row of a
    product of another number of rows (on NumPy a step is bit for bit a
    one-step ``forward``). On NumPy, repeated steps of a model cost no
    validation beyond checking each array's type, dtype and shape.
    """
    if model.bidirectional:
        raise ValueError(
            "model: a bidirectional model cannot run one step at a time: its reverse "
            "direction starts from the last step of the sequence; run forward on the "
            "whole sequence"
        )
    if model.training and model.dropout > 0 and model.num_layers > 1:
        raise ValueError(
            f"model: dropout={model.dropout} between layers in training mode; step is "
            "inference and applies no dropout: call model.eval() first"
        )
    plan = _plan(model)
    if plan.numpy and not _fastpath.DISABLED and model.precision is None:
        states = _numpy_states(plan, x_t, state)
        if states is not None:
            return _numpy_step(plan, x_t, *states)
    return _generic_step(model, x_t, state)


def _numpy_states(plan: _Plan, x: Any, state: Any) -> tuple | None:
    """``(h, c, zero)`` when the in-place NumPy path takes these arrays, else None.

    Only cheap checks, each one exact: a plain ``numpy.ndarray`` of the model's
    dtype and of the right shape. Anything else goes the generic way, whose
    checks say what is wrong.
    """
    if not (type(x) is np.ndarray and x.dtype == plan.dtype and x.ndim == 2):
        return None
    if x.shape[1] != plan.D:
        return None
    if plan.kind == "lstm":
        if state is None:
            return None, None, True
        if type(state) is not tuple or len(state) != 2:
            return None
        h, c = state
    else:
        h, c = state, None
    shape = (plan.L, x.shape[0], plan.H)
    for s in (h, c):
        if s is not None and not (
            type(s) is np.ndarray and s.dtype == plan.dtype and s.shape == shape
        ):
            return None
    # forward's zero_state: every initial state omitted, so the first step
    # skips the recurrent products; one omitted of two is zeros.
    zero = h is None and c is None
    if not zero:
        h = np.zeros(shape, plan.dtype) if h is None else h
        if plan.kind == "lstm" and c is None:
            c = np.zeros(shape, plan.dtype)
    return h, c, zero


def _numpy_step(plan: _Plan, x: Any, h0: Any, c0: Any, zero: bool) -> tuple:
    """The step on NumPy: `_fastpath`'s operations, in its order, for one time step."""
    lstm = plan.kind == "lstm"
    shape = (plan.L, x.shape[0], plan.H)
    h_n = np.empty(shape, plan.dtype)
    c_n = np.empty(shape, plan.dtype) if lstm else None
    layer_step = _LAYER_STEPS[plan.kind]
    for layer, weights in enumerate(plan.layers):
        h = None if zero else h0[layer]
        c = None if zero or not lstm else c0[layer]
        layer_step(plan, x, h, c, *weights, h_n[layer], None if c_n is None else c_n[layer])
        x = h_n[layer]
    return x.copy(), ((h_n, c_n) if lstm else h_n)


def _projection(x, Wx, b_ih, b_hh, fold: bool):
    """``(x @ Wx) + b``, the row of `forward`'s input projection; ``b = b_ih + b_hh`` if ``fold``.

    The sum of the biases is made afresh each step, as `Recurrent._weights`
    makes it each forward: one addition of a (G,) array, and a plan that holds
    no copy of a parameter.
    """
    a = np.matmul(x, Wx)
    if b_ih is not None:
        np.add(a, (b_ih + b_hh) if fold else b_ih, out=a)
    return a


def _elman(plan, x, h, c, Wx, Wh, b_ih, b_hh, h_out, c_out) -> None:
    a = _projection(x, Wx, b_ih, b_hh, fold=True)
    if h is not None:
        np.add(a, np.matmul(h, Wh), out=a)
    if plan.relu:
        np.maximum(a, 0, out=h_out)
    else:
        np.tanh(a, out=h_out)


def _lstm(plan, x, h, c, Wx, Wh, b_ih, b_hh, h_out, c_out) -> None:
    H = plan.H
    a = _projection(x, Wx, b_ih, b_hh, fold=True)
    if h is not None:
        np.add(a, np.matmul(h, Wh), out=a)
    np.multiply(a, plan.scale, out=a)  # i, f, o: a / 2
    np.tanh(a, out=a)
    np.multiply(a, plan.scale, out=a)  # i, f, o: 0.5 * tanh(a / 2) + 0.5; g unchanged
    np.add(a, plan.offset, out=a)
    i, f, g, o = a[:, :H], a[:, H : 2 * H], a[:, 2 * H : 3 * H], a[:, 3 * H :]
    if c is None:  # f * 0 + i * g is i * g
        np.multiply(i, g, out=c_out)
    else:
        np.multiply(f, c, out=c_out)
        np.add(c_out, np.multiply(i, g), out=c_out)
    np.multiply(o, np.tanh(c_out), out=h_out)


def _gru(plan, x, h, c, Wx, Wh, b_ih, b_hh, h_out, c_out) -> None:
    H = plan.H
    ax = _projection(x, Wx, b_ih, None, fold=False)
    if h is None:  # h @ Wh + bh is bh
        ah_rz, ah_n = (0, 0) if b_hh is None else (b_hh[: 2 * H], b_hh[2 * H :])
    else:
        ah = np.matmul(h, Wh)
        if b_hh is not None:
            np.add(ah, b_hh, out=ah)
        ah_rz, ah_n = ah[:, : 2 * H], ah[:, 2 * H :]
    rz = np.add(ax[:, : 2 * H], ah_rz)
    np.multiply(rz, 0.5, out=rz)  # sigmoid(a) = 0.5 * tanh(a / 2) + 0.5
    np.tanh(rz, out=rz)
    np.multiply(rz, 0.5, out=rz)
    np.add(rz, 0.5, out=rz)
    r, z = rz[:, :H], rz[:, H:]
    n = np.multiply(r, ah_n)
    np.add(n, ax[:, 2 * H :], out=n)
    np.tanh(n, out=n)
    diff = np.subtract(0 if h is None else h, n)  # h_t = n + z * (h - n)
    np.multiply(diff, z, out=diff)
    np.add(n, diff, out=h_out)


_LAYER_STEPS = {"elman": _elman, "lstm": _lstm, "gru": _gru}


@on_model_device
def _generic_step(model: Any, x_t: Array, state: Any) -> tuple:
    """The step on any array library: validated as `forward` validates, the cells' own step."""
    lstm = model.cell.n_states == 2
    h0, c0 = model._split_state("state", state, lstm)
    names = ("state[0]", "state[1]") if lstm else ("state", "")
    first = model._names(0, 0)[0]
    given = {"x_t": x_t, names[0]: h0}
    if lstm:
        given[names[1]] = c0
    try:
        xp, dtype, dev = _checks.common(**given, **{first: model._params[first]})
    except TypeError:
        if _checks.common(**given)[0] is not model._xp:
            raise TypeError(
                f"x_t: expected an array of the model's library ({model._xp.__name__}), got "
                f"{type(x_t).__module__}.{type(x_t).__name__}; create or load the model with "
                "like= an array of the input's library and device"
            ) from None
        raise
    L = model.num_layers
    _checks.check_shape("x_t", x_t, [("N", None), ("D", model.input_size)])
    N = x_t.shape[0]
    for name, s, (label, w) in zip(names, (h0, c0), model._state_labels()):
        if s is not None:
            _checks.check_shape(name, s, [("num_layers", L), ("N", N), (label, w)])
    # The model's precision policy, as `forward` runs it: its products, float32 state.
    policy = model.precision
    run = xp if policy is None else _mixed.namespace(xp, policy)
    if policy is not None:
        dtype = xp.float32
    x, h0, c0 = cast(xp, dtype, x_t, h0, c0)

    h_n, c_n = [], []
    for layer in range(L):
        state0 = tuple(
            zeros(xp, (N, w), dtype, dev) if s is None else s[layer, ...]
            for s, w in zip((h0, c0) if lstm else (h0,), model._widths)
        )
        Wx, Wh, bx, bh = model._weights(run, dtype, layer, 0)
        ax = run.matmul(x, Wx)
        ax = ax if bx is None else ax + bx
        if getattr(model.cell, "generic", False):  # a public cell's input transform, one row
            ax = model.cell.prepare(run, xp.expand_dims(ax, axis=1), Wh, False)[0][:, 0, :]
        new, _ = model.cell.step(run, ax, state0, Wh, bh)
        x = new[0]
        h_n.append(x)
        c_n.extend(new[1:])
    h_n = xp.stack(h_n, axis=0)
    if policy is not None:
        x = cast(xp, getattr(xp, policy.output), x)[0]
    return x, ((h_n, xp.stack(c_n, axis=0)) if lstm else h_n)
