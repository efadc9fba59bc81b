"""Your own recurrent cells: the protocol a cell kind follows, and what runs one.

A cell kind is a subclass of `Cell` that says four things, and the library does
the rest, once for every cell (the time loop of `rnn_xp._scan`):

* **its parameters**, `Cell.parameters`: names, shapes and initialisation.
  ``weight_ih`` (gates*H, D) and, if the cell has it, ``bias_ih`` (gates*H,)
  feed the input projection ``ax = xs @ weight_ih.T + bias_ih``, computed for
  all N*T rows as one matrix product before the loop (`Cell.projection` names
  them). Every other parameter (recurrent weights, gains, peepholes,
  projections) is the cell's own: `Cell.step` receives it, and its gradient
  comes from `Cell.step_backward`.
* **its state**, `Cell.state_names` and `Cell.state_sizes`: one or two arrays
  (N, width); the first is the output ``h``.
* **one step**, `Cell.step`: the new state from this step's row of the
  projection and the old state.
* **optionally, the step's backward**, `Cell.step_backward`. Without it, on
  torch and JAX the backward is the library's own autodiff of ``step``
  (``torch.func.vjp``, ``jax.vjp``); on NumPy, CuPy, Dask and
  array-api-strict, `sequence_backward` and `rnn_xp.Recurrent.backward` raise
  a TypeError that says the cell needs one. ``rnn_xp.Recurrent.forward`` runs
  everywhere either way.

Every function receives ``xp``, the array namespace of the caller's arrays
(array-api-compat's), and must use only it: the cell then runs on every
library. A cell given to `rnn_xp.Recurrent` gets what the built-in ones have:
layers, directions, dropout, ``lengths`` and ``mask``, initial states and
their gradients, the compiled ``lax.scan`` loop on JAX, Dask chunks, and
save/load (`rnn_xp.load` takes the cell back with ``cells=``).

Example: IndRNN (Li et al. 2018), ``h_t = relu(x_t @ W.T + b + u * h_{t-1})``
with a vector ``u``; see the README for it run and checked.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from . import _checks, _scan
from ._backends import on_input_device, zeros
from ._generic import Kernel, Outer
from ._layer import Layer, cast, cast_back, check_cache

Array = Any

__all__ = [
    "Cell",
    "CellLayer",
    "Outer",
    "Param",
    "kernel",
    "sequence_backward",
    "sequence_forward",
]


class Param(NamedTuple):
    """One parameter of a cell: its shape and how it starts.

    ``init`` is ``"uniform"``, torch's ``U(-1/sqrt(H), 1/sqrt(H))`` drawn from
    the model's seed; ``"ones"`` or ``"zeros"`` (gains and shifts). A ``bias``
    parameter is left out of a model built with ``bias=False``. Shapes have at
    least one dimension.
    """

    shape: tuple[int, ...]
    init: str = "uniform"
    bias: bool = False


class Cell:
    """Base class of a cell kind; subclass it and define `parameters` and `step`.

    A cell object is a constant: equal cells (``==``; by default the same
    object) must compute the same thing, since JAX compiles the loop once per
    equal cell and reuses it. A cell with settings defines ``__eq__`` and
    ``__hash__`` over all of them, and does not change them after its first use.

    Attributes
    ----------
    kind : str
        The cell's name, in ``repr`` and in saved files (``mode``).
    gates : int
        The input projection has ``gates * hidden_size`` columns.
    state_names : tuple of str
        ``("h",)`` or ``("h", "c")``: the states, the output first.
    projection : tuple
        The parameters that feed the input projection: ``weight_ih`` and the
        name of its bias (None for none; the cell may then add a bias of its
        own where it wants it).
    """

    kind = "cell"
    gates = 1
    state_names: tuple[str, ...] = ("h",)
    projection: tuple[str, str | None] = ("weight_ih", "bias_ih")
    step_backward = None  # optional: a method, see `Cell.step_backward`'s docs below

    def state_sizes(self, hidden_size: int) -> tuple[int, ...]:
        """The width of each state array; ``hidden_size`` for each by default."""
        return (hidden_size,) * len(self.state_names)

    def parameters(self, input_size: int, hidden_size: int) -> dict[str, Param]:
        """Each parameter by name, ``weight_ih`` (gates*H, D) among them, in saving order."""
        raise NotImplementedError(f"{type(self).__name__}.parameters")

    def step(self, xp: ModuleType, ax: Array, state: tuple, params: dict) -> tuple[tuple, Any]:
        """One step: ``(new_state, saved)``.

        ``ax`` (N, gates*H) is this step's row of the input projection (after
        `prepare`), ``state`` the tuple of state arrays, ``params`` every
        parameter but those of the projection. ``saved`` is what
        ``step_backward`` needs: arrays, or a tuple, list or dict of them
        (JAX's loop stacks it over time); ignored without one. The new state
        is a tuple of arrays of the old state's shapes and dtypes (checked at
        every step). Write matrix products as ``xp.matmul(a, b)``: under a
        precision policy ``xp.matmul`` is the policy's product, while ``@``
        multiplies the float32 operands as they are.

        A ``step_backward(self, xp, dstate, saved, params)``, when defined,
        returns ``(dstate_prev, dax, dparams)``: the gradients with respect
        to the old state and ``ax`` given ``dstate``, those of the new state,
        and a dict of this step's gradient of each parameter (an array of the
        parameter's shape, or an `Outer`, the same kind at every step), which
        the loop sums over time. A parameter left out has a zero gradient at
        that step.
        """
        raise NotImplementedError(f"{type(self).__name__}.step")

    def prepare(self, xp: ModuleType, ax: Array, params: dict) -> tuple[Array, Any]:
        """Optional: transform the whole projection (N, T, gates*H) before the loop.

        Returns ``(ax, saved)``; the default is the identity. It must act on
        each (n, t) row on its own (as a layer norm does), never across steps
        or sequences: padding, masks and `rnn_xp.Recurrent.step` (one row at
        a time) would change its result otherwise. A cell that defines it and
        ``step_backward`` defines `prepare_backward` too.
        """
        return ax, None

    def prepare_backward(
        self, xp: ModuleType, dax: Array, saved: Any, params: dict
    ) -> tuple[Array, dict]:
        """The backward of `prepare`: ``(dax, dparams)``, gradients of its input and parameters."""
        return dax, {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def kernel(cell: Any) -> Kernel:
    """The time loop's view of ``cell``, a `Cell` instance; TypeError naming ``cell`` otherwise.

    Checks what the cell declares (kind, gates, states, projection, hashing)
    once, before any work; `specs` checks its parameters for given sizes.
    """
    if isinstance(cell, Kernel):
        return cell
    if not isinstance(cell, Cell):
        raise TypeError(
            f"cell: expected an instance of a subclass of rnn_xp.cells.Cell, got "
            f"{type(cell).__module__}.{type(cell).__name__}"
        )
    name = type(cell).__name__
    if not isinstance(cell.kind, str) or not cell.kind:
        raise ValueError(f"cell: {name}.kind: expected a non-empty string, got {cell.kind!r}")
    names = cell.state_names
    if (
        not isinstance(names, tuple)
        or len(names) not in (1, 2)
        or not all(isinstance(n, str) and n.isidentifier() for n in names)
    ):
        raise ValueError(
            f"cell: {name}.state_names: expected a tuple of one or two names, the output "
            f"first, got {names!r}"
        )
    gates = cell.gates
    if isinstance(gates, bool) or not isinstance(gates, (int, np.integer)) or gates < 1:
        raise ValueError(f"cell: {name}.gates: expected a positive integer, got {gates!r}")
    projection = cell.projection
    if (
        not isinstance(projection, tuple)
        or len(projection) != 2
        or projection[0] != "weight_ih"
        or not (projection[1] is None or isinstance(projection[1], str))
    ):
        raise ValueError(
            f"cell: {name}.projection: expected ('weight_ih', the name of its bias or None), "
            f"got {projection!r}"
        )
    try:
        hash(cell)
    except TypeError:
        raise TypeError(
            f"cell: {name} is not hashable; a cell that defines __eq__ defines __hash__ too "
            "(JAX compiles the loop once per equal cell)"
        ) from None
    own = type(cell)
    prepares = own.prepare is not Cell.prepare
    if prepares and own.prepare_backward is Cell.prepare_backward and cell.step_backward:
        raise TypeError(
            f"cell: {own.__name__} defines prepare and step_backward but no prepare_backward"
        )
    return Kernel(cell, prepares)


def _shape(value: Any) -> tuple[int, ...] | None:
    """``value`` as a shape of positive Python ints with at least one axis, or None."""
    if not isinstance(value, tuple) or not value:
        return None
    for n in value:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            return None
    return tuple(int(n) for n in value)


def specs(cell: Cell, D: int, H: int, bias: bool = True) -> dict[str, Param]:
    """``cell.parameters(D, H)``, checked, without the bias parameters when ``bias`` is False."""
    k = kernel(cell)
    name = type(cell).__name__
    found = cell.parameters(D, H)
    if not isinstance(found, Mapping) or not all(isinstance(p, Param) for p in found.values()):
        raise TypeError(f"cell: {name}.parameters must return a dict of rnn_xp.cells.Param")
    out = {}
    for key, p in found.items():
        shape = _shape(p.shape)
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"cell: {name}.parameters: a name {key!r} that is no identifier")
        if shape is None or p.init not in ("uniform", "ones", "zeros"):
            raise ValueError(
                f"cell: {name}.parameters: {key!r}: expected a Param with a tuple of "
                f"positive ints as shape and init 'uniform', 'ones' or 'zeros', got {p!r}"
            )
        if bias or not p.bias:
            out[key] = Param(shape, p.init, bool(p.bias))
    G = k.gates
    w, b = cell.projection
    if w not in found or found[w].bias or out[w].shape != (G * H, D):
        raise ValueError(
            f"cell: {name}.parameters: expected 'weight_ih' of shape (gates*H, D) = "
            f"{(G * H, D)}, not a bias, got {found.get(w)!r}"
        )
    if b is not None and (b not in found or _shape(found[b].shape) != (G * H,)):
        raise ValueError(
            f"cell: {name}.parameters: expected the projection's bias {b!r} of shape "
            f"(gates*H,) = {(G * H,)}, got {found.get(b)!r}"
        )
    widths = cell.state_sizes(H)
    if _shape(tuple(widths) if isinstance(widths, (tuple, list)) else None) is None or len(
        widths
    ) != len(cell.state_names):
        raise ValueError(
            f"cell: {name}.state_sizes({H}): expected one positive int per state "
            f"{cell.state_names}, got {widths!r}"
        )
    return out


def split(cell: Cell, params: Mapping[str, Array]) -> tuple[Array, Array | None, dict]:
    """``(Wx, bx, own)``: the projection's ``weight_ih.T`` and bias, and the cell's own."""
    w, b = cell.projection
    own = {k: v for k, v in params.items() if k not in (w, b)}
    return params[w].T, (params.get(b) if b else None), own


def _check(
    cell: Cell, xs: Array, params: Any, states: tuple, mask: Array | None
) -> tuple[ModuleType, Any, Any, dict[str, Param]]:
    """Validate a sequence call; return ``(xp, dtype, device, specs)``."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict of arrays by name, got {type(params).__name__}")
    w = params.get("weight_ih")
    if w is None:
        raise ValueError(f"params: expected 'weight_ih' among the keys, got {sorted(params)}")
    named = {f"params[{k!r}]": v for k, v in params.items()}
    named.update({f"state0[{i}]": s for i, s in enumerate(states)})
    _checks.real_floating(xs=xs, **named)
    xp, dtype, dev = _checks.common(xs=xs, **named)
    G = kernel(cell).gates
    if w.ndim != 2 or w.shape[0] % G:
        raise ValueError(
            f"params['weight_ih']: expected shape (gates*H, D) with gates={G}, "
            f"got {tuple(w.shape)}"
        )
    H, D = w.shape[0] // G, w.shape[1]
    expected = specs(cell, D, H)
    optional = {k for k, p in expected.items() if p.bias}
    missing = sorted(set(expected) - set(params) - optional)
    extra = sorted(set(params) - set(expected))
    if missing or extra:
        raise ValueError(f"params: missing keys {missing}, unexpected keys {extra}")
    for k, a in params.items():
        if tuple(a.shape) != expected[k].shape:
            raise ValueError(
                f"params[{k!r}]: expected shape {expected[k].shape} (D={D}, H={H}), "
                f"got {tuple(a.shape)}"
            )
    _checks.check_shape("xs", xs, [("N", None), ("T", None), ("D", D)], "to match weight_ih")
    N, T = xs.shape[0], xs.shape[1]
    if T < 1:
        raise ValueError(f"xs: expected at least one time step, got shape {tuple(xs.shape)}")
    widths = cell.state_sizes(H)
    if states and len(states) != len(widths):
        raise ValueError(
            f"state0: expected {len(widths)} arrays {cell.state_names}, got {len(states)}"
        )
    for i, (s, wd) in enumerate(zip(states, widths)):
        if s is not None:
            _checks.check_shape(f"state0[{i}]", s, [("N", N), ("width", wd)])
    if mask is not None:
        _checks.check_companion("mask", mask, xp, dev, "bool")
        _checks.check_shape("mask", mask, [("N", N), ("T", T)])
    return xp, dtype, dev, expected


class SequenceCache(NamedTuple):
    """What `sequence_backward` needs from `sequence_forward`; treat as opaque."""

    tape: _scan.Tape
    cell: Cell
    params: dict  # the caller's arrays, for the gradients' dtypes
    states: tuple


@on_input_device
def sequence_forward(
    cell: Cell,
    xs: Array,
    params: Mapping[str, Array],
    state0: tuple | None = None,
    *,
    mask: Array | None = None,
    reverse: bool = False,
    inference: bool = False,
) -> tuple[Array, tuple, SequenceCache | None]:
    """Run ``cell`` over ``xs``; return ``(hs, state_n, cache)``.

    Parameters
    ----------
    cell : Cell
    xs : array, shape (N, T, D)
    params : dict of arrays
        By the names and shapes of ``cell.parameters(D, H)``, H from
        ``weight_ih`` (gates*H, D). Bias parameters may be left out.
    state0 : tuple of arrays (N, width), or None entries, optional
        The initial states; zeros when omitted.
    mask : bool array, shape (N, T), optional
        A step where ``mask`` is False carries the state through and outputs zeros.
    reverse : bool, default False
        Run from the last step to the first.
    inference : bool, default False
        Keep nothing for backward; ``cache`` is then None.

    Returns
    -------
    hs : array, shape (N, T, width of h)
    state_n : tuple of arrays (N, width)
    cache : object or None, for `sequence_backward`
    """
    k = kernel(cell)
    if state0 is not None and not isinstance(state0, (tuple, list)):
        raise TypeError(
            f"state0: expected a tuple of {len(cell.state_names)} arrays {cell.state_names} "
            f"(or None entries), got {type(state0).__name__}"
        )
    states = tuple(state0) if state0 is not None else ()
    xp, dtype, dev, _ = _check(cell, xs, params, states, mask)
    N, H = xs.shape[0], params["weight_ih"].shape[0] // k.gates
    names = list(params)
    cast_params = dict(zip(names, cast(xp, dtype, *params.values())))
    xs_, *states_ = cast(xp, dtype, xs, *states)
    widths = cell.state_sizes(H)
    if not states_:
        states_ = [None] * len(widths)
    zero = all(s is None for s in states_)
    state = tuple(
        zeros(xp, (N, w), dtype, dev) if s is None else s for s, w in zip(states_, widths)
    )
    Wx, bx, own = split(cell, cast_params)
    hs, state_n, tape = _scan.forward(
        xp, k, xs_, Wx, own, bx, None, state, mask, bool(reverse), not inference, zero
    )
    if inference:
        return hs, state_n, None
    return hs, state_n, SequenceCache(tape, cell, dict(params), states or (None,) * len(widths))


@on_input_device
def sequence_backward(
    cell: Cell, dhs: Array, cache: SequenceCache, dstate_n: tuple | None = None
) -> tuple[Array, tuple, dict]:
    """Gradients of `sequence_forward`: ``(dxs, dstate0, dparams)``.

    ``dhs`` (N, T, width of h) is the gradient with respect to ``hs``,
    ``dstate_n`` (optional, None entries meaning zero) with respect to
    ``state_n``. ``dparams`` has a gradient for every array in ``params``,
    each of its dtype.
    """
    check_cache(cache, SequenceCache)
    k = kernel(cell)
    if type(cache.cell) is not type(cell):
        raise ValueError(
            f"cell: expected a {type(cache.cell).__name__}, the cell of the forward that made "
            f"this cache, got a {type(cell).__name__}"
        )
    tape = cache.tape
    n = len(tape.widths)
    if dstate_n is not None and not isinstance(dstate_n, (tuple, list)):
        raise TypeError(
            f"dstate_n: expected a tuple of {n} arrays (or None entries), got "
            f"{type(dstate_n).__name__}"
        )
    dstates = tuple(dstate_n) if dstate_n is not None else (None,) * n
    if len(dstates) != n:
        raise ValueError(f"dstate_n: expected {n} arrays (or None entries), got {len(dstates)}")
    named = {f"dstate_n[{i}]": d for i, d in enumerate(dstates)}
    xp, _, _ = _checks.common(dhs=dhs, **named, xs=tape.xs)
    N, T = tape.xs.shape[0], tape.xs.shape[1]
    _checks.check_shape(
        "dhs", dhs, [("N", N), ("T", T), ("width", tape.widths[0])], "to match the forward's hs"
    )
    for (name, d), w in zip(named.items(), tape.widths):
        if d is not None:
            _checks.check_shape(name, d, [("N", N), ("width", w)], "to match the forward's state")
    dhs_, *dstates_ = cast(xp, tape.xs.dtype, dhs, *dstates)
    dxs, dstate0, dWx, dparams, dbx, _ = _scan.backward(xp, k, tape, dhs_, tuple(dstates_))
    w, b = cell.projection
    grads = {**dparams, w: dWx.T}
    if b is not None and b in cache.params:
        grads[b] = dbx
    names = list(cache.params)
    out = cast_back(xp, [grads[n] for n in names], [cache.params[n] for n in names])
    (dxs,) = cast_back(xp, [dxs], [cache.tape.xs])
    dstate0 = tuple(cast_back(xp, list(dstate0), list(cache.states)))
    return dxs, dstate0, dict(zip(names, out))


class CellLayer(Layer):
    """A user cell over whole sequences, like `rnn_xp.LSTMLayer`: a stateful wrapper.

    Parameters
    ----------
    cell : Cell
    params : dict of arrays, as `sequence_forward` takes them
    stateful : bool, default False
        If True, the states after one `forward` are the initial states of the
        next, until `reset_state`.

    Attributes
    ----------
    params, grads : dicts of arrays by name (``grads`` after `backward`)
    h (and c, or the cell's state names) : arrays, or None
        The states after the last `forward`; ``dh`` (``dc``) their gradients
        at the start, after `backward`.
    """

    def __init__(self, cell: Cell, params: Mapping[str, Array], stateful: bool = False) -> None:
        kernel(cell)
        taken = {"cell", "params", "grads", "cache", "stateful", "forward", "backward"}
        clash = [n for n in cell.state_names if n in taken or "d" + n in taken]
        if clash:
            raise ValueError(
                f"cell: CellLayer keeps each state as an attribute, and {clash[0]!r} (or its "
                f"gradient 'd{clash[0]}') is one of the layer's own: rename the state"
            )
        self.cell = cell
        self._states = tuple(cell.state_names)
        super().__init__(dict(params), stateful)  # type: ignore[arg-type]

    def _forward(self, xs, *states0):
        return sequence_forward(self.cell, xs, self.params, states0)

    def _backward(self, dhs, cache):
        return sequence_backward(self.cell, dhs, cache)
