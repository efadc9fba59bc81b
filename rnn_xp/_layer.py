"""What the Elman, LSTM and GRU modules share: validation, dtype rules, the
stateful bookkeeping of the layer classes, and the sequence functions' core."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, NamedTuple

from . import _checks, _chunks, _scan
from ._backends import dtype_name, on_input_device, zeros

Array = Any


def check_weights(Wx: Array, Wh: Array, gates: int) -> tuple[int, int]:
    """``Wx`` (D, gates*H) and ``Wh`` (H, gates*H); return ``(D, H)``."""
    layout = "(D, H)" if gates == 1 else f"(D, {gates}*H)"
    if Wx.ndim != 2 or Wx.shape[1] % gates:
        raise ValueError(f"Wx: expected shape {layout}, got {tuple(Wx.shape)}")
    D, H = Wx.shape[0], Wx.shape[1] // gates
    label = "H" if gates == 1 else f"{gates}*H"
    _checks.check_shape(
        "Wh", Wh, [("H", H), (label, gates * H)], lambda: f"to match Wx of shape {tuple(Wx.shape)}"
    )
    return D, H


def check_states(N: int, H: int, why: str | Callable[[], str], **states: Array | None) -> None:
    for name, a in states.items():
        if a is not None:
            _checks.check_shape(name, a, [("N", N), ("H", H)], why)


def check_biases(N: int, G: int, **biases: Array | None) -> None:
    for name, b in biases.items():
        if b is not None:
            _checks.check_bias(name, b, N, G)


def cast(xp: ModuleType, dtype: Any, *arrays: Array | None) -> list[Array | None]:
    """Bring the inputs to the computation dtype (a no-op for those already in it)."""
    return [a if a is None or a.dtype == dtype else xp.astype(a, dtype) for a in arrays]


def cast_back(xp: ModuleType, grads: Sequence[Array | None], like: Sequence[Array | None]):
    """Give each gradient the dtype of the array it is the gradient of.

    A gradient whose input was omitted (None) keeps the computation dtype.
    """
    return [
        g if g is None or a is None or g.dtype == a.dtype else xp.astype(g, a.dtype)
        for g, a in zip(grads, like)
    ]


def check_sequence(
    gates: int,
    xs: Array,
    Wx: Array,
    Wh: Array,
    biases: dict[str, Array | None],
    states: dict[str, Array | None],
) -> tuple[int, int, int, int]:
    """Shapes of a sequence function's inputs; return ``(N, T, D, H)``."""
    D, H = check_weights(Wx, Wh, gates)
    _checks.check_shape(
        "xs",
        xs,
        [("N", None), ("T", None), ("D", D)],
        lambda: f"to match Wx of shape {tuple(Wx.shape)}",
    )
    N, T = xs.shape[0], xs.shape[1]
    if T < 1:
        raise ValueError(f"xs: expected at least one time step, got shape {tuple(xs.shape)}")
    check_states(N, H, lambda: f"to match xs {tuple(xs.shape)} and Wh {tuple(Wh.shape)}", **states)
    check_biases(N, gates * H, **biases)
    return N, T, D, H


def result_dtype(*arrays: Array | None) -> Any:
    """The NumPy result type of arrays of possibly different libraries (by dtype name)."""
    import numpy as np

    return np.result_type(*(dtype_name(a.dtype) for a in arrays if a is not None))


def _check_step(
    cell: _scan.Cell,
    x: Array,
    Wx: Array,
    Wh: Array,
    biases: dict[str, Array | None],
    states: dict[str, Array | None],
) -> tuple[ModuleType, list]:
    xp, dtype, _ = _checks.common(x=x, Wx=Wx, Wh=Wh, **biases, **states)
    D, H = check_weights(Wx, Wh, cell.gates)
    _checks.check_shape(
        "x", x, [("N", None), ("D", D)], lambda: f"to match Wx of shape {tuple(Wx.shape)}"
    )
    N = x.shape[0]
    check_states(N, H, lambda: f"to match x {tuple(x.shape)} and Wh {tuple(Wh.shape)}", **states)
    check_biases(N, cell.gates * H, **biases)
    return xp, cast(xp, dtype, x, Wx, Wh, *biases.values(), *states.values())


def cell_forward(
    cell: _scan.Cell,
    x: Array,
    Wx: Array,
    Wh: Array,
    biases: dict[str, Array | None],
    states: dict[str, Array | None],
) -> tuple:
    """One step of ``cell`` from ``states`` (h_prev, and c_prev for LSTM); the new state."""
    xp, (x, Wx, Wh, bx, bh, *state) = _check_step(cell, x, Wx, Wh, biases, states)
    ax = x @ Wx
    new, _ = cell.step(xp, ax if bx is None else ax + bx, tuple(state), Wh, bh)
    return new


def cell_backward(
    cell: _scan.Cell,
    dnew: dict[str, Array],
    x: Array,
    Wx: Array,
    Wh: Array,
    biases: dict[str, Array | None],
    states: dict[str, Array | None],
) -> list:
    """Gradients ``[dx, *dstates_prev, dWx, dWh, dbx, dbh]`` of `cell_forward`.

    The step is recomputed from its inputs (one matrix product), which keeps the
    cell functions free of any cache.
    """
    xp, (x_, Wx_, Wh_, bx, bh, *rest) = _check_step(cell, x, Wx, Wh, biases, {**states, **dnew})
    state, dstate = tuple(rest[: len(states)]), tuple(rest[len(states) :])
    ax = x_ @ Wx_
    _, saved = cell.step(xp, ax if bx is None else ax + bx, state, Wh_, bh)
    dprev, dax, dah = cell.step_backward(xp, dstate, saved, Wh_)
    grads = [
        dax @ Wx_.T,
        *dprev,
        x_.T @ dax,
        state[0].T @ dah,
        None if bx is None else _checks.sum_to_shape(xp, dax, tuple(bx.shape)),
        None if bh is None else _checks.sum_to_shape(xp, dah, tuple(bh.shape)),
    ]
    return cast_back(xp, grads, [x, *states.values(), Wx, Wh, *biases.values()])


class SequenceCache(NamedTuple):
    """What a sequence function's backward needs from its forward; treat as opaque."""

    tape: _scan.Tape
    inputs: tuple  # the caller's arrays, for their dtypes and shapes


def sequence_forward(
    cell: _scan.Cell,
    xs: Array,
    Wx: Array,
    Wh: Array,
    bx: Array | None,
    bh: Array | None,
    states: dict[str, Array | None],
    bias_names: tuple[str, str],
    inference: bool = False,
) -> tuple[Array, tuple, SequenceCache | None]:
    """Validate, cast and run ``cell`` over ``xs``; return ``(hs, state_n, cache)``.

    With ``inference=True`` nothing is kept for backward and ``cache`` is None.
    """
    biases = {bias_names[0]: bx, bias_names[1]: bh}

    def outputs():
        _checks.real_floating(xs=xs, Wx=Wx, Wh=Wh, **biases, **states)
        _, T, _, H = check_sequence(cell.gates, xs, Wx, Wh, biases, states)
        dtype = result_dtype(xs, Wx, Wh, bx, bh, *states.values())
        return [(0, (None, T, H), dtype)] + [(0, (None, H), dtype)] * len(states)

    if inference:
        # A bias of one row per sequence is split along the batch with xs; any
        # other goes whole to every task, as the weights do.
        named = {"bx": bx, "bh": bh}
        rows = {k for k, b in named.items() if getattr(b, "ndim", 0) == 2 and b.shape[0] != 1}
        per_sequence = {k: b for k, b in named.items() if k in rows}
        whole = {k: b for k, b in named.items() if k not in rows}
        try:  # Dask: each batch chunk runs this same function where it lives
            hs, *state_n = _chunks.on_dask_chunks(
                _sequence_chunk,
                {
                    "xs": (xs, 0),
                    **{k: (s, 0) for k, s in states.items()},
                    **{k: (b, 0) for k, b in per_sequence.items()},
                },
                outputs,
                {
                    "cell": cell,
                    "Wx": Wx,
                    "Wh": Wh,
                    **whole,
                    "names": bias_names,
                    "state_names": tuple(states),
                },
            )
            return hs, tuple(state_n), None
        except NotImplementedError:
            pass
    xp, dtype, dev = _checks.common(xs=xs, Wx=Wx, Wh=Wh, **biases, **states)
    N, _, _, H = check_sequence(cell.gates, xs, Wx, Wh, biases, states)

    xs_, Wx_, Wh_, bx_, bh_, *states_ = cast(xp, dtype, xs, Wx, Wh, bx, bh, *states.values())
    state0 = tuple(zeros(xp, (N, H), dtype, dev) if s is None else s for s in states_)
    hs, state_n, tape = _scan.forward(
        xp,
        cell,
        xs_,
        Wx_,
        Wh_,
        bx_,
        bh_,
        state0,
        keep_tape=not inference,
        zero_state=all(s is None for s in states_),
    )
    if inference:
        return hs, state_n, None
    inputs = (xs, *states.values(), Wx, Wh, bx, bh)
    return hs, state_n, SequenceCache(tape, inputs)


def _sequence_chunk(xs, cell, Wx, Wh, bx, bh, names, state_names, **states):
    states = {k: states.get(k) for k in state_names}  # omitted ones were not sent
    hs, state_n, _ = sequence_forward(cell, xs, Wx, Wh, bx, bh, states, names, inference=True)
    return (hs, *state_n)


def check_cache(cache: Any, kind: type) -> None:
    """A sequence backward's ``cache``: what a forward of ``kind``'s functions returned."""
    if cache is None:
        raise ValueError(
            "cache: None comes from an inference-mode forward; run it with inference=False"
        )
    if not isinstance(cache, kind):
        raise TypeError(
            f"cache: expected the cache the forward returned, got {type(cache).__name__}"
        )


def sequence_backward(
    cell: _scan.Cell,
    dhs: Array,
    cache: SequenceCache,
    dstates: dict[str, Array | None],
) -> list[Array | None]:
    """Gradients ``[dxs, *dstate0, dWx, dWh, dbx, dbh]`` of `sequence_forward`."""
    check_cache(cache, SequenceCache)
    tape, inputs = cache
    xp, _, _ = _checks.common(dhs=dhs, **dstates, xs=tape.xs)
    N, T = tape.xs.shape[0], tape.xs.shape[1]
    H = tape.Wh.shape[0]
    why = f"to match the forward's xs {tuple(tape.xs.shape)} and Wh {tuple(tape.Wh.shape)}"
    _checks.check_shape("dhs", dhs, [("N", N), ("T", T), ("H", H)], why)
    check_states(N, H, why, **dstates)
    # The forward's computation dtype is the dtype of its (cast) xs.
    dhs_, *dstates_ = cast(xp, tape.xs.dtype, dhs, *dstates.values())
    dxs, dstate0, dWx, dWh, dbx, dbh = _scan.backward(xp, cell, tape, dhs_, tuple(dstates_))
    return cast_back(xp, [dxs, *dstate0, dWx, dWh, dbx, dbh], inputs)


class Layer:
    """Stateful bookkeeping shared by `RNNLayer`, `LSTMLayer` and `GRULayer`.

    Subclasses set ``_states`` (the state attribute names, ``("h",)`` or
    ``("h", "c")``) and implement ``_forward(xs, *states0)`` returning
    ``(hs, states_n, cache)`` and ``_backward(dhs, cache)`` returning
    ``(dxs, dstates0, grads)``.
    """

    _states: tuple[str, ...] = ("h",)

    def __init__(self, params: list, stateful: bool) -> None:
        self.params = params
        self.stateful = stateful
        self.grads: list | None = None
        self.cache: Any = None
        for name in self._states:
            setattr(self, name, None)
            setattr(self, "d" + name, None)

    def _set_states(self, **states: Array | None) -> None:
        """Validate and set the states a stateful layer starts from (None: zeros).

        Each is an (N, H) real floating array of the parameters' library and
        device, H from ``Wh``; nothing is set unless all pass.
        """
        Wh = self.params[1]
        _checks.common(Wh=Wh, **states)
        given = {k: v for k, v in states.items() if v is not None}
        N = next(iter(given.values())).shape[0] if given else None
        why = f"to match Wh {tuple(Wh.shape)}"
        for name, a in given.items():
            _checks.check_shape(name, a, [("N", N), ("H", Wh.shape[0])], why)
        for name, a in states.items():
            setattr(self, name, a)

    def reset_state(self) -> None:
        """Forget the hidden state: the next `forward` starts from zeros."""
        for name in self._states:
            setattr(self, name, None)

    @on_input_device
    def forward(self, xs: Array) -> Array:
        """Run the layer over ``xs`` of shape (N, T, D); return ``hs`` of shape (N, T, H)."""
        states0 = [getattr(self, n) if self.stateful else None for n in self._states]
        shape = getattr(xs, "shape", None)
        for name, s in zip(self._states, states0):
            if s is not None and shape is not None and len(shape) == 3 and shape[0] != s.shape[0]:
                raise ValueError(
                    f"xs: this stateful layer holds a state {name} for batch size N={s.shape[0]}, "
                    f"got xs of shape {tuple(shape)}; call reset_state() to start a new batch"
                )
        hs, states_n, self.cache = self._forward(xs, *states0)
        for name, s in zip(self._states, states_n):
            setattr(self, name, s)
        return hs

    @on_input_device
    def backward(self, dhs: Array) -> Array:
        """Backpropagate ``dhs`` of shape (N, T, H); return ``dxs`` of shape (N, T, D)."""
        if self.cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward: call forward first")
        dxs, dstates0, self.grads = self._backward(dhs, self.cache)
        for name, d in zip(self._states, dstates0):
            setattr(self, "d" + name, d)
        return dxs

    def _forward(self, xs: Array, *states0: Array | None) -> tuple[Array, Sequence, Any]:
        raise NotImplementedError

    def _backward(self, dhs: Array, cache: Any) -> tuple[Array, Sequence, list]:
        raise NotImplementedError
